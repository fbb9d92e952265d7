"""Methods against hand-computed cases: discrepancy, losses, shapes, switches, and the scorer on a perfect student."""

import pytest
import torch

from distillad.methods import DSKD, STFPM, ReverseDistillation, build_model
from distillad.methods.parts import (
    MirroredDecoder,
    PyramidEmbedding,
    cosine_distance_map,
    global_cosine_distance,
    hard_pixel_distance,
    hardest_share_mean,
    negative_similarity,
)
from distillad.scoring import AnomalyScorer

BACKBONE = "efficientnet_lite0"


def vec(*values):
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def test_cosine_distance_hand_computed():
    assert cosine_distance_map(vec(1, 0), vec(0, 1)).item() == pytest.approx(1.0)
    assert cosine_distance_map(vec(1, 0), vec(-1, 0)).item() == pytest.approx(2.0)
    assert cosine_distance_map(vec(1, 0), vec(3, 0)).item() == pytest.approx(0.0, abs=1e-7)
    assert cosine_distance_map(vec(1, 1), vec(1, 0)).item() == pytest.approx(1 - 2 ** -0.5)
    # normalised L2 = 2 (1 - cos): STFPM's loss is covered by the cosine distance
    t, s = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)
    n = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
    assert torch.allclose(((n(t) - n(s)) ** 2).sum(1), 2 * cosine_distance_map(t, s), atol=1e-5)


def test_global_cosine_and_hard_pixels_hand_computed():
    t = torch.zeros(1, 2, 1, 2)
    t[0, 0] = 1.0                         # both pixels (1, 0)
    s = t.clone()
    s[0, :, 0, 1] = torch.tensor([0.0, 1.0])  # second pixel (0, 1): pixel distances [0, 1]
    # flattened t = (1, 1, 0, 0), s = (1, 0, 0, 1): cos = 1/2
    assert global_cosine_distance(t, s).item() == pytest.approx(0.5)
    assert hard_pixel_distance(t, s, k=1).item() == pytest.approx(1.0)
    assert hard_pixel_distance(t, s, k=2).item() == pytest.approx(0.5)
    assert hard_pixel_distance(t, s, k=99).item() == pytest.approx(0.5)


def test_hardest_share_mean_hand_computed():
    """The mean of each image's largest `share` of map values; share 1 is the plain mean."""
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[4.0, 4.0], [0.0, 8.0]]])     # 2 images, 2x2
    assert hardest_share_mean(maps, 1.0).tolist() == pytest.approx([1.5, 4.0])
    assert hardest_share_mean(maps, 0.5).tolist() == pytest.approx([2.5, 6.0])   # top 2 of 4
    assert hardest_share_mean(maps, 0.3).tolist() == pytest.approx([2.5, 6.0])   # ceil(1.2) = 2
    assert hardest_share_mean(maps, 0.01).tolist() == pytest.approx([3.0, 8.0])  # at least one pixel


def test_negative_similarity_hand_computed():
    """The cosine similarity 1 - d floored at 0, averaged over the anomalous pixels weighted by their area share."""
    distances = torch.tensor([[[0.2, 0.5], [1.5, 0.0]]])                  # similarities 0.8, 0.5, 0 (floored), 1
    anomalous = torch.tensor([[[1.0, 0.5], [1.0, 0.0]]])
    assert negative_similarity(distances, anomalous).item() == pytest.approx((0.8 + 0.25 + 0.0) / 2.5)
    assert negative_similarity(distances, torch.zeros_like(anomalous)).item() == 0.0   # no anomaly: no term


@pytest.mark.parametrize(("weight", "pushed"), [(1.0, "both"), (0.25, "both"), (1.0, "decoder"), (1.0, "encoder")])
def test_negative_students_are_pushed_off_the_teacher_on_anomalous_pixels(images, weight, pushed):
    """negative: in training, the students and the teacher both see the synthetic-anomaly images; each pushed
    student's (negative_students) and level's term is the negative similarity on the anomalous pixels (mask
    area-resized to the level), times negative_weight, and every student has the hard-pixel loss over the other
    pixels; in eval mode the held-out loss is the plain one on the clean images."""
    model = build_model("dskd", BACKBONE, {"negative": 0.5, "negative_weight": weight, "foreground": "whole",
                                           "hard_share": 0.5, "negative_students": pushed}, pretrained=False)
    torch.manual_seed(3)
    model.train()
    with torch.no_grad():
        model.training_loss(images)
        saved = model.anomalies.state()
        # the clean (cached) targets are replaced by the teacher's features of the images that got an anomaly
        loss = model.training_loss(images, model.teacher_features(images))
        model.anomalies.load_state(saved)
        batch = model.anomalies(images)
        assert batch.applied.any() and not batch.applied.all() and batch.masks.sum() > 0
        hand = torch.zeros(())
        for name, student in zip(("encoder", "decoder"), model.feature_pairs(batch.images)):
            for t, s in student:
                d = cosine_distance_map(t, s)
                area = torch.nn.functional.interpolate(batch.masks, size=d.shape[-2:], mode="area")[:, 0]
                assert 0 < area.sum() < area.numel()
                if pushed in ("both", name):
                    hand += weight * (area * (1 - d).clamp(min=0)).sum() / area.sum()
                kept = torch.where(area > 0, torch.zeros_like(d), d).flatten(1)
                hand += kept.topk(kept.shape[1] // 2, dim=1).values.mean()
        assert torch.allclose(loss, hand, atol=1e-5)
        model.eval()
        assert torch.allclose(model.training_loss(images), model.loss(model.feature_pairs(images)))
    with pytest.raises(ValueError, match="set one of them"):
        build_model("dskd", BACKBONE, {"negative": 0.5, "denoise": 0.5}, pretrained=False)
    with pytest.raises(ValueError, match="negative must be in"):
        build_model("dskd", BACKBONE, {"negative": -0.1}, pretrained=False)
    with pytest.raises(ValueError, match="negative_weight must be > 0"):
        build_model("dskd", BACKBONE, {"negative": 0.5, "negative_weight": 0.0}, pretrained=False)
    with pytest.raises(ValueError, match="does not train"):
        build_model("dskd", BACKBONE, {"negative": 0.5, "negative_students": "decoder", "students": "encoder"},
                    pretrained=False)


def test_dskd_hard_share_loss_is_the_hardest_pixels_mean(images):
    """hard_share: every student's and level's term averages only its hardest pixels, image by image."""
    model = build_model("dskd", BACKBONE, {"hard_share": 0.25}, pretrained=False)
    pairs = model.feature_pairs(images)
    hand = torch.zeros(())
    for student in pairs:
        for t, s in student:
            d = cosine_distance_map(t, s).flatten(1)
            k = -(-d.shape[1] // 4)
            hand = hand + d.sort(dim=1, descending=True).values[:, :k].mean()
    assert torch.allclose(model.loss(pairs), hand, atol=1e-6)
    plain = build_model("dskd", BACKBONE, {"hard_share": 1.0}, pretrained=False)
    assert torch.allclose(plain.loss(pairs), sum(cosine_distance_map(t, s).mean() for p in pairs for t, s in p))
    assert build_model("dskd", BACKBONE, {}, pretrained=False).options.hard_share == 0.1   # the default
    with pytest.raises(ValueError, match="hard_share must be in"):
        build_model("dskd", BACKBONE, {"hard_share": 0.0}, pretrained=False)


def test_dskd_encoder_init_from_another_backbone(monkeypatch):
    """encoder_init: Se starts from another backbone's weights (here stood in by a seeded random Lite1), and only
    when weights are being loaded: a checkpoint being rebuilt gets the structure; channels must match the teacher."""
    import distillad.methods.dskd as dskd_module

    calls = []
    real = dskd_module.create_backbone

    def spy(name, *, levels, pretrained=True, weights=None):
        calls.append((name, pretrained))
        return real(name, levels=levels, pretrained=False)

    monkeypatch.setattr(dskd_module, "create_backbone", spy)
    model = DSKD(BACKBONE, DSKD.options_class.from_dict({"encoder_init": "efficientnet_lite1"}), pretrained=False)
    assert calls == [("efficientnet_lite1", False)]
    assert model.encoder_student.name == "efficientnet_lite1"
    calls.clear()
    DSKD(BACKBONE, DSKD.options_class.from_dict({}), pretrained=False)
    assert calls == [(BACKBONE, False)]
    with pytest.raises(ValueError, match="Se must match the teacher's channels"):
        DSKD(BACKBONE, DSKD.options_class.from_dict({"encoder_init": "efficientnet_lite2"}), pretrained=False)
    with pytest.raises(ValueError, match="encoder_init"):
        DSKD.options_class.from_dict({"encoder_init": "vgg"})


def test_embedding_and_decoder_restore_pyramid_shapes():
    channels = [24, 40, 112]
    pyramid = [torch.randn(2, c, 64 // 2 ** i, 64 // 2 ** i) for i, c in enumerate(channels)]
    embed = PyramidEmbedding(channels, 224)
    code = embed(pyramid)
    assert code.shape == (2, 224, 8, 8)  # stride 32 of a 256-pixel input
    restored = MirroredDecoder(224, channels, relu_output=False)(code)
    assert [tuple(r.shape) for r in restored] == [tuple(p.shape) for p in pyramid]
    assert (restored[0] < 0).any()  # linear output for signed teachers
    assert (MirroredDecoder(224, channels, relu_output=True)(code)[0] >= 0).all()


def test_four_level_embedding_and_three_level_parameter_names():
    """A fourth (stride-32) level: every level reduced to stride 32, the code at stride 64, restored shallow first.
    Three levels keep the parameter names (and so the checkpoints) of the original three-level module."""
    channels = [24, 40, 112, 320]
    pyramid = [torch.randn(2, c, 64 // 2 ** i, 64 // 2 ** i) for i, c in enumerate(channels)]
    embed = PyramidEmbedding(channels, 640, blocks=1)
    code = embed(pyramid)
    assert code.shape == (2, 640, 4, 4)
    assert [embed.reduce1[i][0].out_channels for i in range(3)] == [80, 160, 320]
    restored = MirroredDecoder(640, channels, relu_output=False)(code)
    assert [tuple(r.shape) for r in restored] == [tuple(p.shape) for p in pyramid]
    with pytest.raises(ValueError, match="built for 4 levels"):
        embed(pyramid[:3])
    three = PyramidEmbedding([24, 40, 112], 224).state_dict()
    assert {k.split(".")[0] for k in three} == {"reduce1", "reduce2", "reduce3", "fuse"}
    assert three["reduce1.0.0.weight"].shape == (56, 24, 3, 3) and three["reduce1.1.0.weight"].shape == (112, 56, 3, 3)
    assert three["reduce2.0.weight"].shape == (112, 40, 3, 3) and three["reduce3.0.weight"].shape == (112, 112, 3, 3)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return torch.rand(2, 3, 64, 64)


@pytest.mark.parametrize("method,options,n_students", [
    ("dskd", {}, 2),
    ("dskd", {"students": "encoder"}, 1),
    ("dskd", {"students": "decoder", "df_input": "teacher"}, 1),
    ("dskd", {"df_input": "both", "global_cosine": True, "levels": [2]}, 2),
    ("dskd", {"levels": [1, 2, 3, 4]}, 2),
    ("dskd", {"levels": [2, 3, 4]}, 2),
    ("dskd", {"teacher_pool": 3}, 2),
    ("stfpm", {}, 1),
    ("rd", {}, 1),
])
def test_feature_pairs_loss_and_maps(images, method, options, n_students):
    model = build_model(method, BACKBONE, options, pretrained=False)
    pairs = model.feature_pairs(images)
    levels = options.get("levels", [1, 2, 3])
    assert len(pairs) == n_students and all(len(p) == len(levels) for p in pairs)
    for student in pairs:
        for (t, s), level in zip(student, levels):
            assert t.shape == s.shape and t.shape[-1] == 64 // 2 ** (level + 1)
            assert not t.requires_grad
    loss = model.loss(pairs)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    grads = [p.grad for p in model.trainable_parameters()]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    maps, scores = AnomalyScorer(model.eval())(images)
    assert maps.shape == (2, 64, 64) and torch.allclose(scores, maps.flatten(1).amax(1))


def test_interaction_switch_controls_gradient_into_encoder(images):
    def encoder_grad(interaction: bool) -> float:
        torch.manual_seed(0)
        model = DSKD(BACKBONE, DSKD.options_class.from_dict({"interaction_grad": interaction}), pretrained=False)
        pairs = model.feature_pairs(images)
        model.loss(pairs[1:]).backward()  # the decoder student's loss only
        return sum(float(p.grad.abs().sum()) for p in model.encoder_student.parameters() if p.grad is not None)

    assert encoder_grad(True) > 0
    assert encoder_grad(False) == 0


def test_teacher_stays_frozen_in_train_mode():
    model = build_model("dskd", BACKBONE, {}, pretrained=False).train()
    assert not model.teacher.training
    assert model.encoder_student.training
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert not any(n.startswith("teacher.") for n, p in model.named_parameters()
                   if any(p is q for q in model.trainable_parameters()))


def test_perfect_student_gives_zero_map_and_loss(images):
    """A student that is an exact copy of the teacher has no discrepancy anywhere."""
    model = STFPM(BACKBONE, STFPM.options_class.from_dict({"level_fusion": "sum"}), pretrained=False)
    model.student.load_state_dict(model.teacher.state_dict())
    model.eval()
    assert model.loss(model.feature_pairs(images)).item() == pytest.approx(0.0, abs=1e-5)
    maps, scores = AnomalyScorer(model)(images)
    assert maps.abs().max().item() < 1e-4


def test_scorer_fusion_hand_computed(images):
    """Two students with known constant discrepancies: mean, max and product fusion after summing 3 levels."""
    model = build_model("dskd", BACKBONE, {"sigma": 0}, pretrained=False).eval()

    def fake_pairs(x):
        one = torch.ones(x.shape[0], 4, 8, 8)
        first = [(one, one)] * 3                            # distance 0 on every level
        second = [(one, torch.cat([-one[:, :1], one[:, 1:]], 1))] * 3   # cos = 2/4 -> distance 0.5 per level
        return [first, second]

    model.feature_pairs = fake_pairs
    for fusion, expected in (("mean", 0.75), ("max", 1.5), ("product", 0.0)):
        model.options.student_fusion = fusion
        maps, scores = AnomalyScorer(model)(images)
        assert torch.allclose(maps, torch.full_like(maps, expected), atol=1e-6), fusion


def test_teacher_pool_target_is_the_local_average_of_the_teacher(images):
    """teacher_pool=k: the students are matched to the k x k average of each teacher level (borders averaged over
    the pixels inside the image), computed from the same (cacheable) raw teacher features."""
    model = build_model("dskd", BACKBONE, {"teacher_pool": 3}, pretrained=False)
    raw = model.teacher_features(images)
    pairs = model.feature_pairs(images, raw)
    t = raw[1]
    hand = torch.zeros_like(t)
    h, w = t.shape[-2:]
    for y in range(h):
        for x in range(w):
            hand[..., y, x] = t[..., max(0, y - 1):y + 2, max(0, x - 1):x + 2].mean(dim=(-2, -1))
    assert torch.allclose(pairs[0][1][0], hand, atol=1e-5) and torch.allclose(pairs[1][1][0], hand, atol=1e-5)
    with pytest.raises(ValueError, match="teacher_pool must be an odd number"):
        build_model("dskd", BACKBONE, {"teacher_pool": 2}, pretrained=False)


def test_denoising_students_see_anomalies_but_learn_the_clean_teacher(images):
    """denoise: in training, the students get the synthetic-anomaly version of each image while the targets stay
    the teacher's features of the clean image; in eval mode (the held-out loss) nothing is added; the anomaly
    stream is seeded from torch's seed at the first batch and resumes from its saved state."""
    model = build_model("dskd", BACKBONE, {"denoise": 1.0, "foreground": "whole"}, pretrained=False)
    clean_teacher = model.teacher_features(images)
    torch.manual_seed(7)
    saved = None
    model.train()
    with torch.no_grad():
        first = model.training_loss(images, clean_teacher)
        assert model.anomalies.seeded and model.anomalies.generator.seed == 7
        saved = model.anomalies.state()
        second = model.training_loss(images, clean_teacher)
        # by hand: the same anomalies from a generator put back in the saved state
        model.anomalies.load_state(saved)
        batch = model.anomalies(images)
        assert batch.applied.all() and batch.masks.sum() > 0
        hand = model.loss(model.feature_pairs(batch.images, clean_teacher))
        assert torch.allclose(second, hand)
        assert not torch.allclose(first, model.loss(model.feature_pairs(images, clean_teacher)))
        model.eval()
        assert torch.allclose(model.training_loss(images), model.loss(model.feature_pairs(images)))
    stages = model.training_stages()
    assert len(stages) == 1 and stages[0].state is not None and stages[0].loss == model.training_loss
    plain = build_model("dskd", BACKBONE, {}, pretrained=False)
    assert plain.anomalies is None and plain.training_stages()[0].state is None


def test_invalid_options_are_rejected_with_names():
    with pytest.raises(ValueError, match="unknown option"):
        build_model("dskd", BACKBONE, {"df_imput": "student"}, pretrained=False)
    with pytest.raises(ValueError, match="df_input"):
        build_model("dskd", BACKBONE, {"df_input": "nobody"}, pretrained=False)
    with pytest.raises(ValueError, match="use df_input=teacher"):
        build_model("dskd", BACKBONE, {"students": "decoder"}, pretrained=False)
    with pytest.raises(ValueError, match="levels"):
        build_model("rd", BACKBONE, {"levels": [4]}, pretrained=False)
    with pytest.raises(ValueError, match="subset of 1, 2, 3, 4"):
        build_model("dskd", BACKBONE, {"levels": [5]}, pretrained=False)
    with pytest.raises(ValueError, match="unknown method"):
        build_model("no_such_method", BACKBONE)
    with pytest.raises(ValueError, match="denoise must be in"):
        build_model("dskd", BACKBONE, {"denoise": 1.5}, pretrained=False)
    with pytest.raises(ValueError, match="foreground=mask needs"):
        build_model("dskd", BACKBONE, {"denoise": 0.5, "foreground": "mask"}, pretrained=False)


def test_rd_decoder_sees_only_the_teacher(images):
    model = ReverseDistillation(BACKBONE, ReverseDistillation.options_class.from_dict({}), pretrained=False)
    teacher = model.teacher_features(images)
    assert [f.shape[1] for f in teacher] == model.teacher.channels
    assert len(model.decode(teacher)) == 3
