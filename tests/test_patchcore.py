"""PatchCore against hand-computed and brute-force cases, and end to end through train / test / predict / load."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist

from distillad.errors import ConfigError
from distillad.methods import PatchCore, build_model
from distillad.methods.base import TrainingStage
from distillad.methods.patchcore import (channel_pooling_matrix, greedy_coreset, image_weights, local_average,
                                         nearest_neighbours)
from distillad.scoring import AnomalyScorer

BACKBONE = "efficientnet_lite0"


def naive_greedy(points: np.ndarray, k: int, start: int) -> tuple[list[int], float]:
    """Textbook greedy k-center: recompute every distance to the newest center at every step."""
    chosen = [start]
    nearest = np.linalg.norm(points - points[start], axis=1)
    while len(chosen) < k:
        index = int(nearest.argmax())
        chosen.append(index)
        nearest = np.minimum(nearest, np.linalg.norm(points - points[index], axis=1))
    return chosen, float(nearest.max())


# ------------------------------------------------------------------------------------------------------- coreset


def test_greedy_coreset_on_a_line_hand_computed():
    line = torch.tensor([0.0, 1.0, 3.0, 4.5, 10.0]).unsqueeze(1)
    # from 0: the farthest is 10; then 4.5 (4.5 from 0, 5.5 from 10); then 3 (1.5 from 4.5, against 1 for the point 1)
    selected, radius = greedy_coreset(line, 3, start=0)
    assert selected.tolist() == [0, 4, 3] and radius == pytest.approx(1.5)
    selected, radius = greedy_coreset(line, 4, start=0)
    assert selected.tolist() == [0, 4, 3, 2] and radius == pytest.approx(1.0)
    selected, radius = greedy_coreset(line, 2, start=2)          # from 3: 10 is farthest (7); radius: 0 to 3
    assert selected.tolist() == [2, 4] and radius == pytest.approx(3.0)
    # asking for more centers than distinct points stops once every point is covered: no duplicates
    twice = torch.cat([line, line])
    selected, radius = greedy_coreset(twice, 10, start=0)
    assert len(selected) == 5 and radius == 0.0 and sorted(twice[selected, 0].tolist()) == line[:, 0].tolist()


@pytest.mark.parametrize("dim,n,k", [(2, 600, 40), (16, 1500, 120), (128, 800, 200)])
def test_greedy_coreset_is_exact_greedy_and_covers_every_point(dim, n, k):
    rng = np.random.default_rng(dim)
    # clustered data (as patch features are), where the pruning skips most points
    centers = rng.normal(scale=5.0, size=(8, dim))
    points = centers[rng.integers(0, 8, size=n)] + rng.normal(size=(n, dim))
    selected, radius = greedy_coreset(torch.tensor(points, dtype=torch.float64), k, start=7, refresh=16)
    expected, expected_radius = naive_greedy(points, k, start=7)
    assert selected.tolist() == expected
    assert radius == pytest.approx(expected_radius, rel=1e-9)
    to_coreset = cdist(points, points[selected.numpy()]).min(axis=1)
    assert to_coreset.max() == pytest.approx(radius, rel=1e-9)       # the radius is the coverage radius
    assert (to_coreset <= radius + 1e-9).all()


# ------------------------------------------------------------------------------------------- nearest neighbours


def test_nearest_neighbours_match_brute_force():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(1000, 24)).astype(np.float32)
    queries = rng.normal(size=(300, 24)).astype(np.float32)
    queries[:5] = bank[[3, 999, 500, 0, 128]]                 # exact hits, also in the last, partial block
    expected = cdist(queries.astype(np.float64), bank.astype(np.float64))
    for chunk in (1000, 333, 64):                              # one block; blocks of uneven size
        distance, index = nearest_neighbours(torch.from_numpy(queries), torch.from_numpy(bank), chunk=chunk)
        np.testing.assert_allclose(distance.numpy(), expected.min(axis=1), rtol=1e-5, atol=1e-5)
        assert (index.numpy() == expected.argmin(axis=1)).all()
        assert index[:5].tolist() == [3, 999, 500, 0, 128] and distance[:5].tolist() == [0.0] * 5


def test_model_map_is_the_nearest_bank_distance_per_position():
    torch.manual_seed(0)
    model = build_model("patchcore", BACKBONE, {"sigma": 0}, pretrained=False).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        patches = model.patch_features(images)                                 # (2, 8, 8, 152): stride 8
        assert patches.shape == (2, 8, 8, 40 + 112)
        flat = patches.reshape(-1, patches.shape[-1]).numpy().astype(np.float64)
        model.bank = torch.from_numpy(flat[::5] + np.random.default_rng(1).normal(size=flat[::5].shape)).float()
        [[maps]] = model.discrepancy_maps(images)
        expected = cdist(flat, model.bank.numpy().astype(np.float64)).min(axis=1).reshape(2, 8, 8)
        np.testing.assert_allclose(maps.numpy(), expected, rtol=1e-5, atol=1e-4)
        # the shared scorer: bilinear upsampling to the image, no blur at sigma 0, image score = max of the map
        full, scores = AnomalyScorer(model)(images)
        assert full.shape == (2, 64, 64)
        up = F.interpolate(maps.unsqueeze(1), size=(64, 64), mode="bilinear", align_corners=False).squeeze(1)
        assert torch.allclose(full, up) and torch.allclose(scores, up.flatten(1).amax(1))


def test_empty_bank_scores_the_distance_to_the_origin():
    model = build_model("patchcore", BACKBONE, {}, pretrained=False).eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        [[maps]] = model.discrepancy_maps(images)
        assert torch.allclose(maps, model.patch_features(images).norm(dim=-1), rtol=1e-4, atol=1e-3)


# -------------------------------------------------------------------------------------------------- features


def test_local_aggregation_hand_computed():
    grid = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)   # rows 0-3, 4-7, 8-11, 12-15
    out = local_average(grid, 3)
    assert out.shape == grid.shape
    assert out[0, 0, 1, 1].item() == pytest.approx((0 + 1 + 2 + 4 + 5 + 6 + 8 + 9 + 10) / 9)
    assert out[0, 0, 2, 2].item() == pytest.approx((5 + 6 + 7 + 9 + 10 + 11 + 13 + 14 + 15) / 9)
    assert out[0, 0, 0, 0].item() == pytest.approx((0 + 1 + 4 + 5) / 4)        # only neighbours inside the map
    assert out[0, 0, 0, 1].item() == pytest.approx((0 + 1 + 2 + 4 + 5 + 6) / 6)
    assert out[0, 0, 3, 3].item() == pytest.approx((10 + 11 + 14 + 15) / 4)
    assert torch.equal(local_average(grid, 1), grid)
    two = torch.stack([grid[0, 0], -grid[0, 0]]).unsqueeze(0)                    # channels are separate
    assert torch.allclose(local_average(two, 3)[0, 1], -out[0, 0])
    padded = local_average(grid, 3, count_padding=True)                          # missing neighbours count as 0
    assert padded[0, 0, 1, 1].item() == pytest.approx(out[0, 0, 1, 1].item())
    assert padded[0, 0, 0, 0].item() == pytest.approx((0 + 1 + 4 + 5) / 9)
    assert padded[0, 0, 0, 1].item() == pytest.approx((0 + 1 + 2 + 4 + 5 + 6) / 9)
    assert padded[0, 0, 3, 3].item() == pytest.approx((10 + 11 + 14 + 15) / 9)


def test_patch_features_concatenate_aggregated_levels_on_the_shallow_grid():
    model = build_model("patchcore", BACKBONE, {}, pretrained=False).eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        levels = model.teacher_features(images)
        patches = model.patch_features(images)
    level2 = local_average(levels[1], 3, count_padding=True)        # the reference's zero-padded 3x3 average
    level3 = F.interpolate(local_average(levels[2], 3, count_padding=True), size=level2.shape[-2:],
                           mode="bilinear", align_corners=False)
    expected = torch.cat([level2, level3], 1).permute(0, 2, 3, 1)
    assert torch.allclose(patches, expected, atol=1e-6)
    inside = build_model("patchcore", BACKBONE, {"patch_padding": "inside"}, pretrained=False).eval()
    inside.teacher.load_state_dict(model.teacher.state_dict())
    with torch.no_grad():
        border_inside = inside.patch_features(images)
    assert torch.allclose(border_inside[0, 0, 0, :40], local_average(levels[1], 3)[0, :, 0, 0], atol=1e-6)
    assert torch.allclose(border_inside[0, 3, 3], patches[0, 3, 3], atol=1e-6)     # the interior is the same
    pooled = build_model("patchcore", BACKBONE, {"feature_dim": 64}, pretrained=False).eval()
    pooled.teacher.load_state_dict(model.teacher.state_dict())
    with torch.no_grad():
        small = pooled.patch_features(images)
    adaptive = F.adaptive_avg_pool1d(expected.reshape(-1, 1, 152), 64).reshape(1, 8, 8, 64)
    assert small.shape == (1, 8, 8, 64) and torch.allclose(small, adaptive, atol=1e-5)
    assert pooled.bank.shape == (0, 64)


def test_channel_pooling_matrix_is_adaptive_average_pooling():
    x = torch.randn(5, 152)
    for dim in (1, 7, 64, 100, 152):
        expected = F.adaptive_avg_pool1d(x.unsqueeze(1), dim).squeeze(1)
        assert torch.allclose(x @ channel_pooling_matrix(152, dim), expected, atol=1e-5), dim


def test_options_are_checked():
    with pytest.raises(ConfigError, match="coreset_ratio"):
        build_model("patchcore", BACKBONE, {"coreset_ratio": 0}, pretrained=False)
    with pytest.raises(ConfigError, match="patch_size"):
        build_model("patchcore", BACKBONE, {"patch_size": 2}, pretrained=False)
    with pytest.raises(ConfigError, match="patch_padding"):
        build_model("patchcore", BACKBONE, {"patch_padding": "reflect"}, pretrained=False)
    with pytest.raises(ConfigError, match="wider"):
        build_model("patchcore", BACKBONE, {"feature_dim": 500}, pretrained=False)
    with pytest.raises(ValueError, match="exactly one"):
        TrainingStage("nothing")
    with pytest.raises(ValueError, match="exactly one"):
        TrainingStage("both", lambda: [], lambda images, teacher: images.sum(), fit=lambda context: {})


# ------------------------------------------------------------------------------------------------- reweighting


def test_image_weight_hand_computed():
    bank = torch.tensor([[0.0], [10.0], [11.0], [12.0]])
    queries = torch.tensor([[[0.5], [13.0]]])                    # one image, two positions
    distance, index = nearest_neighbours(queries.view(-1, 1), bank)
    assert distance.tolist() == pytest.approx([0.5, 1.0]) and index.tolist() == [0, 3]
    # worst position: 13, its nearest entry m* = 12; the 3 entries nearest to m*: 12, 11, 10 at 1, 2, 3 from 13
    weight = image_weights(queries, distance.view(1, -1), index.view(1, -1), bank, neighbours=3)
    expected = 1 - math.exp(1) / (math.exp(1) + math.exp(2) + math.exp(3))
    assert weight.tolist() == pytest.approx([expected])
    # one neighbour: m* alone, weight 0; an isolated m* (the others far away): weight near 1
    assert image_weights(queries, distance.view(1, -1), index.view(1, -1), bank, neighbours=1).item() == 0.0
    far = torch.tensor([[12.0], [60.0], [70.0], [80.0]])
    d, i = nearest_neighbours(queries.view(-1, 1), far)
    assert image_weights(queries, d.view(1, -1), i.view(1, -1), far, neighbours=3).item() == pytest.approx(1.0)


def test_reweight_scales_each_images_map_and_score():
    torch.manual_seed(0)
    plain = build_model("patchcore", BACKBONE, {"sigma": 0}, pretrained=False).eval()
    weighted = build_model("patchcore", BACKBONE, {"sigma": 0, "reweight": True}, pretrained=False).eval()
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        flat = plain.patch_features(images[:1]).reshape(-1, 152)
        plain.bank = flat[::3].clone()
        weighted.load_state_dict(plain.state_dict())
        maps, scores = AnomalyScorer(plain)(images)
        weighted_maps, weighted_scores = AnomalyScorer(weighted)(images)
    ratio = weighted_scores / scores
    assert ((ratio > 0) & (ratio < 1)).all()
    assert torch.allclose(weighted_maps, maps * ratio.view(3, 1, 1), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from distillad.data import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("patchcore") / "data", n_train=12, n_test_good=3,
                                  n_test_defect=3, image_size=64)


def test_train_test_predict_load_round_trip(synthetic, tmp_path):
    import distillad
    from distillad.engine.checkpoint import MODEL_FILE, load_run

    out = tmp_path / "run"
    messages: list[str] = []
    run = distillad.train(synthetic, out=out, method="patchcore", image_size=64, progress=False,
                          log=messages.append)
    assert run.method == "patchcore" and run.threshold is not None
    assert any("no optimizer" in message for message in messages)
    training = json.loads((out / "meta.json").read_text())["training"]
    [stage] = training["stages"]
    assert stage["name"] == "memory_bank" and stage["epochs"] == 1 and stage["seconds"] > 0
    [entry] = training["history"]
    n_train = json.loads((out / "meta.json").read_text())["data"]["n_train"]
    assert entry["patches"] == n_train * 8 * 8                          # every position of every image, stride 8
    assert entry["bank_size"] == math.ceil(0.1 * entry["patches"])
    assert training["final_train_loss"] == entry["coreset_radius"] > 0
    assert math.isfinite(training["val_loss"]) and training["val_loss"] > 0

    state = torch.load(out / MODEL_FILE, map_location="cpu", weights_only=True)
    assert state["bank"].shape == (entry["bank_size"], 152)
    assert run.scorer.model.bank.shape == state["bank"].shape

    metrics = run.evaluate(synthetic)
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["image_auroc"] >= 0.8          # the synthetic defects are obvious
    predictions = run.predict(synthetic / "test")
    assert len(predictions) == 6 and predictions[0].anomaly_map.shape == (64, 64)

    loaded = distillad.load(out)                   # rebuilt with an empty bank, resized from model.pt
    assert torch.equal(loaded.scorer.model.bank, state["bank"])
    assert loaded.loaded.batchnorm_folded > 0      # folding the teacher is harmless: checked on a probe, and below
    again = loaded.predict(synthetic / "test")
    assert [p.score for p in again] == [p.score for p in predictions]
    assert all(np.array_equal(a.anomaly_map, b.anomaly_map) for a, b in zip(again, predictions))
    timing = ("seconds", "inference_seconds")
    assert {k: v for k, v in loaded.evaluate(synthetic).items() if k not in timing} == \
        {k: v for k, v in metrics.items() if k not in timing}

    # the padding is saved explicitly; a run saved before the option existed was built with "inside" and loads so
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"]["options"]["patch_padding"] == "zeros"
    assert loaded.scorer.model.options.patch_padding == "zeros"
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / MODEL_FILE).write_bytes((out / MODEL_FILE).read_bytes())
    del meta["config"]["options"]["patch_padding"]
    (legacy / "meta.json").write_text(json.dumps(meta))
    assert load_run(legacy).model.options.patch_padding == "inside"

    unfolded = load_run(out, fold_batchnorm=False)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(unfolded.scorer(images)[1], loaded.scorer(images)[1], rtol=1e-4)

    # the same seed gives the same bank; another seed another coreset (the start and projection are random)
    same = distillad.train(synthetic, out=tmp_path / "same", method="patchcore", image_size=64, progress=False,
                           log=lambda _: None)
    assert torch.equal(same.scorer.model.bank, state["bank"])
    other = distillad.train(synthetic, out=tmp_path / "other", method="patchcore", image_size=64, seed=1,
                            progress=False, log=lambda _: None)
    assert not torch.equal(other.scorer.model.bank, state["bank"])


def test_max_bank_caps_the_patches_and_a_bank_of_another_width_is_refused(synthetic, tmp_path):
    import distillad
    from distillad.errors import RunError

    out = tmp_path / "capped"
    distillad.train(synthetic, out=out, method="patchcore", image_size=64, progress=False, log=lambda _: None,
                    options={"max_bank": 110, "coreset_ratio": 1.0})
    meta = json.loads((out / "meta.json").read_text())
    [entry] = meta["training"]["history"]
    per_image = 110 // meta["data"]["n_train"]
    assert entry["patches"] == entry["bank_size"] == per_image * meta["data"]["n_train"] <= 110

    model = PatchCore(BACKBONE, PatchCore.options_class.from_dict({"feature_dim": 64}), pretrained=False)
    state = torch.load(out / "model.pt", weights_only=True)
    with pytest.raises(RuntimeError, match="bank"):
        model.load_state_dict(state)
    meta["config"]["options"]["feature_dim"] = 64       # a run folder whose meta and model disagree
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(RunError):
        distillad.load(out)


def test_scorer_exports_with_the_bank_search():
    """The map is plain torch ops over a fixed number of bank blocks: torch.export captures the whole scorer."""
    from distillad.methods.patchcore import BANK_CHUNK
    from distillad.scoring import make_scorer

    torch.manual_seed(0)
    for reweight in (False, True):
        model = build_model("patchcore", BACKBONE, {"reweight": reweight}, pretrained=False).eval()
        model.bank = torch.randn(2 * BANK_CHUNK + 100, 152) * 3                  # three blocks, the last partial
        scorer, _ = make_scorer(model, channels_last=True, image_size=64)
        images = torch.rand(2, 3, 64, 64)
        with torch.no_grad():
            exported = torch.export.export(scorer, (images,)).module()
            for expected, got in zip(scorer(images), exported(images)):
                assert torch.allclose(expected, got, rtol=1e-5, atol=1e-5)
