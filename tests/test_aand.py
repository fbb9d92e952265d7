"""AAND: the RAA gate and residual, the stage-1 losses by hand, what each stage trains, and a tiny end-to-end run."""

import json
import math

import pytest
import torch

from distillad.data import discover_mvtec, make_synthetic_dataset
from distillad.engine import evaluate_split, load_run, resolve_config, train_run
from distillad.engine.checkpoint import META_FILE
from distillad.methods import AAND, build_model
from distillad.methods.aand import (
    AANDOptions,
    ResidualAnomalyAmplifier,
    amplification_loss,
    focal_loss,
    sinusoidal_position_encoding,
)
from distillad.methods.parts import global_cosine_distance, hard_pixel_distance
from distillad.scoring import AnomalyScorer

BACKBONE = "efficientnet_lite0"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("aand", BACKBONE, {}, pretrained=False)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


# -- RAA ------------------------------------------------------------------------------------------------------------

def test_gate_range_and_hand_built_prototypes():
    torch.manual_seed(0)
    raa = ResidualAnomalyAmplifier(64, prototypes=100, temperature=0.05)   # hidden width 128 >= 100 prototypes
    x = torch.randn(2, 64, 5, 7)
    gate = raa.predict_gate(x)
    assert gate.shape == (2, 1, 5, 7) and gate.min() >= 0 and gate.max() <= 1
    with torch.no_grad():
        raa.prototypes.copy_(torch.eye(100, 128))                       # orthonormal prototypes
    query = torch.zeros(3, 128, 1, 1)
    query[0, 70] = 2.0      # matches anomalous prototype 70 exactly (cosine ignores the length)
    query[1, 10] = 1.0      # matches normal prototype 10
    query[2, 120] = 1.0     # orthogonal to every prototype: uniform softmax
    g = raa.gate_from_query(query).flatten()
    expected_match = math.exp(20) / (math.exp(20) + 99)                 # cos 1 / T=0.05 vs 99 x cos 0
    assert g[0].item() == pytest.approx(expected_match, abs=1e-6) and g[0] > 0.999
    assert g[1].item() == pytest.approx(50 / (math.exp(20) + 99), abs=1e-7) and g[1] < 1e-6
    assert g[2].item() == pytest.approx(0.5, abs=1e-6)


def test_residual_shape_and_identity_where_gate_is_zero():
    torch.manual_seed(0)
    raa = ResidualAnomalyAmplifier(24)
    x = torch.randn(2, 24, 6, 6)
    r = raa.residual(x)
    assert r.shape == x.shape
    assert (r.abs() <= x.abs() + 1e-6).all()                            # tanh(.) * x: a bounded rescaling
    gate = torch.zeros(2, 1, 6, 6)
    gate[..., 3:] = 1.0
    amplified = raa(x, gate)
    assert torch.equal(amplified[..., :3], x[..., :3])
    assert torch.allclose(amplified[..., 3:], (x + r)[..., 3:])
    assert not torch.allclose(amplified, x)


def test_position_encoding_distinguishes_positions():
    pe = sinusoidal_position_encoding(24, 4, 5)
    assert pe.shape == (1, 24, 4, 5) and pe.abs().max() <= 1
    flat = pe[0].flatten(1).T                                           # (20 positions, 24)
    assert torch.cdist(flat, flat).add(torch.eye(20)).min() > 1e-3      # every position has its own code
    assert sinusoidal_position_encoding(7, 3, 3).shape == (1, 7, 3, 3)  # odd widths work too


# -- stage-1 losses by hand -----------------------------------------------------------------------------------------

def test_focal_loss_hand_computed():
    p = torch.tensor([0.9, 0.2, 0.6, 0.1])
    y = torch.tensor([1.0, 0.0, 0.0, 1.0])
    terms = [-0.8 * 0.1 ** 2 * math.log(0.9), -0.2 * 0.2 ** 2 * math.log(0.8),
             -0.2 * 0.6 ** 2 * math.log(0.4), -0.8 * 0.9 ** 2 * math.log(0.1)]
    assert focal_loss(p, y, gamma=2.0, alpha=0.8).item() == pytest.approx(sum(terms) / 4, rel=1e-5)
    # gamma 0, alpha 0.5: half the binary cross-entropy
    bce = torch.nn.functional.binary_cross_entropy(p, y).item()
    assert focal_loss(p, y, gamma=0.0, alpha=0.5).item() == pytest.approx(0.5 * bce, rel=1e-5)


def test_amplification_hinge_hand_computed():
    normal = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    anomalous = torch.tensor([[1.0, 1.0]])            # cos 1/sqrt2 with both normals
    pushed = torch.tensor([[1.0, -1.0]])              # amplified: cos 1/sqrt2 and -1/sqrt2
    s = 2 ** -0.5
    # pairs: relu(s - (s - .3)) = .3 and relu(-s - (s - .3)) = 0
    assert amplification_loss(normal, anomalous, pushed, margin=0.3).item() == pytest.approx(0.15, abs=1e-6)
    # unchanged features pay the full margin; features pushed far enough pay nothing
    assert amplification_loss(normal, anomalous, anomalous, margin=0.3).item() == pytest.approx(0.3, abs=1e-6)
    away = torch.tensor([[-1.0, -1.0]])
    assert amplification_loss(normal, anomalous, away, margin=0.3).item() == 0.0
    halfway = torch.tensor([[1.0, 0.5]])              # cos 1/sqrt1.25 and 0.5/sqrt1.25
    c1, c2 = 1 / math.sqrt(1.25), 0.5 / math.sqrt(1.25)
    expected = (max(0.0, c1 - (s - 0.3)) + max(0.0, c2 - (s - 0.3))) / 2
    assert amplification_loss(normal, anomalous, halfway, margin=0.3).item() == pytest.approx(expected, abs=1e-6)


def test_stage1_loss_without_anomalous_pixels_is_the_focal_loss(model):
    vanilla = [torch.randn(2, c, s, s) for c, s in zip(model.teacher.channels, (16, 8, 4))]
    masks = torch.zeros(2, 1, 64, 64)
    foreground = torch.ones(2, 1, 64, 64)
    loss = model.amplification_loss(vanilla, masks, foreground)
    focal = sum(focal_loss(raa.predict_gate(x), torch.zeros(2, 1, x.shape[-2], x.shape[-1]))
                for raa, x in zip(model.amplifiers, vanilla))
    assert loss.item() == pytest.approx(focal.item(), rel=1e-6)
    masks[..., 16:48, 16:48] = 1.0                                       # now the hinge joins in
    assert model.amplification_loss(vanilla, masks, foreground).item() > loss.item()


# -- what each stage trains -----------------------------------------------------------------------------------------

def test_stage1_trains_only_the_amplifiers_and_never_touches_the_teacher(images):
    torch.manual_seed(0)
    model = build_model("aand", BACKBONE, {"anomaly_probability": 1.0, "foreground": "whole"}, pretrained=False)
    amplify, distill = model.training_stages()
    assert (amplify.name, distill.name) == ("amplify", "distill")
    assert not amplify.cache_teacher and distill.cache_teacher
    assert amplify.length_ratio == pytest.approx(100 / 120)
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    model.train()
    amplify.on_train(model)
    optimizer = torch.optim.Adam(amplify.parameters(), lr=0.01)
    loss = amplify.loss(images, None)
    loss.backward()
    raa_names = {f"amplifiers.{n}" for n, _ in model.amplifiers.named_parameters()}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and with_grad <= raa_names
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("amplifiers.0.scale"))
    optimizer.step()
    for key, value in model.teacher.state_dict().items():              # weights and BatchNorm statistics
        assert torch.equal(value, teacher_before[key]), key
    assert not model.teacher.training


def test_stage2_trains_only_the_student_and_keeps_amplifiers_in_eval(images):
    torch.manual_seed(0)
    model = build_model("aand", BACKBONE, {}, pretrained=False)
    distill = model.training_stages()[1]
    model.train()
    distill.on_train(model)
    assert not model.amplifiers.training and model.decoder.training and not model.teacher.training
    model.zero_grad()
    distill.loss(images, None).backward()
    with_grad = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"bottleneck", "decoder"}
    student = {id(p) for p in distill.parameters()}
    assert student == {id(p) for m in (model.bottleneck, model.decoder) for p in m.parameters()}


def force_anomalous_gate(model):
    """Every query becomes the same vector v; anomalous prototypes = v, normal ones = -v: gate ~ 1 everywhere."""
    with torch.no_grad():
        for raa in model.amplifiers:
            last = raa.query[-1]
            last.weight.zero_()
            v = torch.randn(last.bias.shape[0])
            last.bias.copy_(v)
            half = raa.prototypes.shape[0] // 2
            raa.prototypes[:half] = -v
            raa.prototypes[half:] = v


def test_amplified_teacher_features(images):
    torch.manual_seed(0)
    model = build_model("aand", BACKBONE, {}, pretrained=False).eval()
    force_anomalous_gate(model)
    vanilla = model.vanilla_features(images)
    amplified = model.teacher_features(images)
    assert all(a.shape == v.shape for a, v in zip(amplified, vanilla))
    assert all(not a.requires_grad for a in amplified)
    gates = [raa.predict_gate(v) for raa, v in zip(model.amplifiers, vanilla)]
    assert all(g.min() > 0.999 for g in gates)
    for a, v, raa, g in zip(amplified, vanilla, model.amplifiers, gates):
        assert not torch.allclose(a, v)
        assert torch.allclose(a, v + g * raa.residual(v), atol=1e-6)
    cached = [f.clone() for f in amplified]
    assert model.teacher_features(images, cached) is cached
    pairs = model.feature_pairs(images)
    assert [torch.equal(t, a) for (t, _), a in zip(pairs[0], amplified)] == [True, True, True]

    plain = build_model("aand", BACKBONE, {"amplify": False}, pretrained=False).eval()
    assert plain.amplifiers is None and [s.name for s in plain.training_stages()] == ["distill"]
    assert not any(k.startswith("amplifiers") for k in plain.state_dict())
    assert all(torch.equal(a, v) for a, v in zip(plain.teacher_features(images), plain.vanilla_features(images)))


def test_hkd_loss_is_hard_pixels_plus_global_cosine(model, images):
    pairs = model.feature_pairs(images)
    expected = sum(hard_pixel_distance(t, s, 10).mean() + global_cosine_distance(t, s).mean() for t, s in pairs[0])
    assert model.loss(pairs).item() == pytest.approx(expected.item(), rel=1e-6)
    model.eval()
    maps, scores = AnomalyScorer(model)(images)
    assert maps.shape == (2, 64, 64) and scores.shape == (2,)


@pytest.mark.parametrize("values,match", [
    ({"hard_k": 0}, "hard_k"),
    ({"prototypes": 7}, "prototypes"),
    ({"temperature": 0}, "temperature"),
    ({"focal_alpha": 1.5}, "focal_alpha"),
    ({"amplify": "yes"}, "amplify"),
    ({"foreground": "sky"}, "foreground"),
    ({"foreground": "mask"}, "foreground_mask"),
    ({"texture_dir": 3}, "texture_dir"),
    ({"normal_pixels": 2.5}, "normal_pixels"),
])
def test_options_are_validated(values, match):
    with pytest.raises(ValueError, match=match):
        AANDOptions.from_dict(values)


def test_options_round_trip_as_json():
    options = AANDOptions.from_dict({"texture_dir": "/data/dtd", "hard_k": 5, "levels": [2, 3]})
    assert AANDOptions.from_dict(json.loads(json.dumps(options.to_dict()))) == options


def test_resnet_teacher_without_weights(images):
    torch.manual_seed(0)
    model = build_model("aand", "resnet18", {"anomaly_probability": 1.0}, pretrained=False)
    assert [raa.channels for raa in model.amplifiers] == model.teacher.channels == [64, 128, 256]
    loss = model.training_stages()[0].loss(images, None)
    assert torch.isfinite(loss)
    pairs = model.eval().feature_pairs(images)
    assert all((t >= 0).all() for t, _ in pairs[0])          # ReLU taps stay non-negative when amplified


# -- end to end -----------------------------------------------------------------------------------------------------

def test_train_load_evaluate_end_to_end(tmp_path):
    category = make_synthetic_dataset(tmp_path / "data", seed=1, n_train=12, n_test_good=3, n_test_defect=3,
                                      image_size=64)
    data = discover_mvtec(category, val_fraction=0.25, seed=0)
    config = resolve_config("aand", overrides={"image_size": 64, "epochs": 1, "batch_size": 4})
    assert config.optimizer.milestones == (0.8, 0.9) and config.optimizer.lr == 0.005
    messages = []
    result = train_run(config, data, tmp_path / "run", progress=False, log=messages.append)
    assert any("stage 1/2 (amplify)" in m for m in messages) and any("stage 2/2 (distill)" in m for m in messages)
    meta = json.loads((tmp_path / "run" / META_FILE).read_text())
    assert meta["method"] == "aand"
    assert [s["name"] for s in meta["training"]["stages"]] == ["amplify", "distill"]
    assert all(s["epochs"] == 1 for s in meta["training"]["stages"])
    run = load_run(tmp_path / "run")
    assert isinstance(run.model, AAND)
    metrics = evaluate_split(run.scorer, data, 64, calibration=run.calibration, progress=False)
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1max", "pixel_f1max"):
        assert 0.0 <= metrics[key] <= 1.0
    probe = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    result.model.eval()
    with torch.no_grad():
        expected = AnomalyScorer(result.model)(probe)[1]
        assert torch.allclose(run.scorer(probe)[1], expected, atol=1e-6)
