"""Tests of the exact evaluation metrics (sklearn as oracle, hand-derived AUPRO cases, slow reference)."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from distillad.metrics import aupro, evaluate_all, f1_max, image_auroc, pixel_auroc, pixel_f1_max


# --------------------------------------------------------------------------- #
# oracles
# --------------------------------------------------------------------------- #
def sk_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(np.ravel(labels), np.ravel(scores))
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def label_8conn_bfs(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """Obvious flood fill: 8-connected components of one 2-D bool mask."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for i in range(h):
        for j in range(w):
            if mask[i, j] and not seen[i, j]:
                comp, queue = [], deque([(i, j)])
                seen[i, j] = True
                while queue:
                    a, b = queue.popleft()
                    comp.append((a, b))
                    for da in (-1, 0, 1):
                        for db in (-1, 0, 1):
                            y, x = a + da, b + db
                            if 0 <= y < h and 0 <= x < w and mask[y, x] and not seen[y, x]:
                                seen[y, x] = True
                                queue.append((y, x))
                comps.append(comp)
    return comps


def slow_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Direct definition: one (FPR, PRO) point per distinct threshold, trapezoid up to the limit."""
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks) > 0
    comps = [(n, c) for n in range(maps.shape[0]) for c in label_8conn_bfs(masks[n])]
    normal = maps[~masks]
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        pro = np.mean([np.mean([maps[n, a, b] >= t for a, b in c]) for n, c in comps])
        fpr = np.mean(normal >= t)
        points.append((float(fpr), float(pro)))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < fpr_limit:  # cut the segment at the limit
                y_lim = y0 + (fpr_limit - x0) * (y1 - y0) / (x1 - x0)
                area += (fpr_limit - x0) * (y0 + y_lim) / 2
            break
    return area / fpr_limit


# --------------------------------------------------------------------------- #
# AUROC / F1-max against scikit-learn
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_auroc_and_f1_match_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300) + 0.3 * labels, 1)  # ~14 distinct values: heavy ties
    assert len(np.unique(scores)) < 20
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), rel=1e-12, abs=1e-12)
    assert f1_max(scores, labels) == pytest.approx(sk_f1_max(scores, labels), rel=1e-12)
    # no ties at all
    cont = rng.standard_normal(300) + labels
    assert image_auroc(cont, labels) == pytest.approx(roc_auc_score(labels, cont), rel=1e-12)
    assert f1_max(cont, labels) == pytest.approx(sk_f1_max(cont, labels), rel=1e-12)


def test_float16_and_torch_inputs() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 500)
    s16 = (rng.random(500) * 0.05 + 0.01 * labels).astype(np.float16)  # float16 granularity -> ties
    ref = s16.astype(np.float64)
    assert len(np.unique(ref)) < 500
    expected_auc = roc_auc_score(labels, ref)
    expected_f1 = sk_f1_max(ref, labels)
    assert image_auroc(s16, labels) == pytest.approx(expected_auc, rel=1e-12)
    assert f1_max(s16, labels) == pytest.approx(expected_f1, rel=1e-12)
    t16, tlab = torch.from_numpy(s16), torch.from_numpy(labels).bool()
    assert image_auroc(t16, tlab) == pytest.approx(expected_auc, rel=1e-12)
    assert image_auroc(t16.bfloat16(), tlab) == pytest.approx(
        roc_auc_score(labels, t16.bfloat16().float().numpy()), rel=1e-12
    )
    assert f1_max(t16, tlab) == pytest.approx(expected_f1, rel=1e-12)
    # plain Python sequences
    assert image_auroc(ref.tolist(), labels.tolist()) == pytest.approx(expected_auc, rel=1e-12)


def test_pixel_auroc_and_f1_match_sklearn() -> None:
    rng = np.random.default_rng(4)
    masks = rng.random((6, 16, 16)) < 0.15
    maps = np.round(rng.random((6, 16, 16)) + 0.4 * masks, 1).astype(np.float32)
    exp_auc = roc_auc_score(masks.ravel(), maps.ravel())
    exp_f1 = sk_f1_max(maps.ravel(), masks.ravel())
    masks255 = masks.astype(np.uint8) * 255
    assert pixel_auroc(maps, masks255) == pytest.approx(exp_auc, rel=1e-12)
    assert pixel_f1_max(maps, masks255) == pytest.approx(exp_f1, rel=1e-12)
    assert f1_max(maps, masks) == pytest.approx(exp_f1, rel=1e-12)
    tmaps = torch.from_numpy(maps).half()
    ref16 = tmaps.float().numpy()
    assert pixel_auroc(tmaps, torch.from_numpy(masks)) == pytest.approx(
        roc_auc_score(masks.ravel(), ref16.ravel()), rel=1e-12
    )
    # (N, 1, H, W) masks are accepted
    assert pixel_auroc(maps, masks[:, None]) == pytest.approx(exp_auc, rel=1e-12)


def test_perfect_and_inverted_separation() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert image_auroc(scores, labels) == 1.0
    assert image_auroc(-scores, labels) == 0.0
    assert f1_max(scores, labels) == 1.0
    # all tied: AUROC 0.5, F1 = 2P / (N + P) at the single threshold
    assert image_auroc(np.zeros(5), labels) == 0.5
    assert f1_max(np.zeros(5), labels) == pytest.approx(2 * 2 / (5 + 2))


# --------------------------------------------------------------------------- #
# AUPRO
# --------------------------------------------------------------------------- #
def test_aupro_perfect_map() -> None:
    rng = np.random.default_rng(5)
    masks = np.zeros((3, 12, 12), dtype=bool)
    masks[0, 2:5, 2:6] = True
    masks[0, 9, 9] = True
    masks[2, 6:11, 1:3] = True
    maps = np.where(masks, 1.0 + rng.random(masks.shape), rng.random(masks.shape))
    assert aupro(maps, masks) == pytest.approx(1.0, abs=1e-12)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(1.0, abs=1e-12)


def test_aupro_hand_computed_two_components() -> None:
    # Two 1x4 images.
    #   image 0: mask [1 1 0 0], map [0.9 0.5 0.7 0.1] -> component A = {0.9, 0.5}, size 2
    #   image 1: mask [0 0 0 1], map [0.2 0.3 0.6 0.6] -> component B = {0.6},      size 1
    # Normal pixels (5, two of them in the defective image 0): 0.7 0.1 0.2 0.3 0.6.
    # Thresholds (descending), PRO = mean over the 2 components of covered fraction:
    #   t=0.9: A 1/2, B 0 -> PRO 0.25, FPR 0/5   -> (0.0, 0.25)
    #   t=0.7: (normal 0.7)        -> PRO 0.25, FPR 1/5   -> (0.2, 0.25)
    #   t=0.6: B covered, normal 0.6 (tie) -> PRO (0.5+1)/2 = 0.75, FPR 2/5 -> (0.4, 0.75)
    #   t=0.5: A complete -> PRO 1.0, FPR 0.4; then t=0.3, 0.2, 0.1 -> (0.6,1), (0.8,1), (1,1)
    # Curve from (0,0). Limit 0.3 falls inside the sloped segment (0.2,0.25)-(0.4,0.75):
    #   PRO(0.3) = 0.25 + (0.1/0.2) * 0.5 = 0.5
    #   area = 0 (vertical at 0) + 0.2*0.25 + 0.1*(0.25+0.5)/2 = 0.05 + 0.0375 = 0.0875
    #   AUPRO@0.3 = 0.0875 / 0.3 = 7/24
    # Full range (limit 1): 0.05 + 0.2*(0.25+0.75)/2 + 0 + 0.6*1 = 0.75.
    # (Pixel-weighted instead of component-weighted PRO would give different values.)
    maps = np.array([[[0.9, 0.5, 0.7, 0.1]], [[0.2, 0.3, 0.6, 0.6]]])
    masks = np.array([[[1, 1, 0, 0]], [[0, 0, 0, 1]]])
    assert aupro(maps, masks, fpr_limit=0.3) == pytest.approx(7 / 24, rel=1e-12)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.75, rel=1e-12)
    # limit exactly on a curve point (0.2): area 0.05 -> 0.25
    assert aupro(maps, masks, fpr_limit=0.2) == pytest.approx(0.25, rel=1e-12)
    assert slow_aupro(maps, masks, 0.3) == pytest.approx(7 / 24, rel=1e-12)


def test_aupro_constant_map() -> None:
    # One threshold: the curve jumps from (0,0) to (1,1); PRO(0.3) = 0.3 by interpolation,
    # area = 0.5 * 0.3 * 0.3 = 0.045, normalised 0.045 / 0.3 = 0.15.
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    masks[0, 1:3, 1:3] = 255
    masks[1, 5, 5:8] = 255
    maps = np.full(masks.shape, 0.7, dtype=np.float32)
    assert aupro(maps, masks) == pytest.approx(0.15, rel=1e-12)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.5, rel=1e-12)


def test_aupro_uses_8_connectivity() -> None:
    # Anomalous pixels (0,0), (1,1), (1,2): one 8-connected component of size 3
    # (4-connectivity would give {(0,0)} and {(1,1),(1,2)}).
    # Map: (0,0) = 0.9, other anomalous = 0.0, the 6 normal pixels = 0.5.
    # 8-conn: (0,0) -> (0,1/3) -> (1,1/3) -> (1,1); AUPRO@0.3 = 0.3*(1/3)/0.3 = 1/3.
    # 4-conn would give PRO 1/2 at FPR 0 and AUPRO@0.3 = 1/2.
    mask = np.zeros((3, 3), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[1, 2] = True
    amap = np.full((3, 3), 0.5)
    amap[mask] = 0.0
    amap[0, 0] = 0.9
    assert aupro(amap[None], mask[None]) == pytest.approx(1 / 3, rel=1e-12)
    assert aupro(amap[None], mask[None]) != pytest.approx(0.5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_aupro_matches_slow_reference_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, h, w = 4, 10, 10
    masks = ndimage.gaussian_filter(rng.random((n, h, w)), (0, 1, 1)) > 0.6  # blobs
    masks[2] = rng.random((h, w)) < 0.2  # scattered pixels: many diagonal-only contacts
    masks[0] = False  # one defect-free image
    masks[1, 0, 0] = True  # guarantee at least one component
    maps = np.round(rng.random((n, h, w)) + 0.3 * masks, 1)  # heavy ties
    for limit in (0.05, 0.3, 1.0):
        assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(slow_aupro(maps, masks, limit), rel=1e-10)
    # continuous scores, float16 through torch
    maps16 = torch.from_numpy(rng.random((n, h, w)) + 0.3 * masks).half()
    ref = slow_aupro(maps16.float().numpy(), masks, 0.3)
    assert aupro(maps16, torch.from_numpy(masks)) == pytest.approx(ref, rel=1e-10)


def test_evaluate_all_consistent_with_individual_metrics() -> None:
    rng = np.random.default_rng(7)
    masks = np.zeros((8, 32, 32), dtype=np.uint8)
    masks[4, 3:9, 3:12] = 255
    masks[5, 20:30, 5:7] = 1
    masks[6, 10:12, 10:12] = 255
    masks[7, 0:3, 29:32] = 255
    labels = (masks.reshape(8, -1).max(1) > 0).astype(int)
    maps = (rng.random(masks.shape) + 0.5 * (masks > 0)).astype(np.float32)
    scores = maps.reshape(8, -1).max(1)
    res = evaluate_all(scores, labels, maps, masks)
    assert set(res) == {"image_auroc", "pixel_auroc", "aupro", "image_f1max", "pixel_f1max"}
    assert res["image_auroc"] == image_auroc(scores, labels)
    assert res["pixel_auroc"] == pixel_auroc(maps, masks)
    assert res["aupro"] == aupro(maps, masks)
    assert res["image_f1max"] == f1_max(scores, labels)
    assert res["pixel_f1max"] == pixel_f1_max(maps, masks)
    assert res["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel() > 0, maps.ravel()), rel=1e-12)
    assert all(isinstance(v, float) for v in res.values())


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #
def test_validation_errors() -> None:
    s = np.array([0.1, 0.2, 0.3, 0.4])
    y = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="shape mismatch"):
        image_auroc(s, y[:3])
    with pytest.raises(ValueError, match="shape mismatch"):
        pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="non-finite"):
        image_auroc(np.array([0.1, np.nan, 0.3, 0.4]), y)
    with pytest.raises(ValueError, match="non-finite"):
        pixel_auroc(np.full((1, 2, 2), np.inf), np.eye(2)[None])
    with pytest.raises(ValueError, match="only one class"):
        image_auroc(s, np.zeros(4))
    with pytest.raises(ValueError, match="only one class"):
        pixel_auroc(np.random.rand(2, 4, 4), np.ones((2, 4, 4)))
    with pytest.raises(ValueError, match="binary"):
        image_auroc(s, np.array([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="no positive"):
        f1_max(s, np.zeros(4))
    with pytest.raises(ValueError, match="no ground-truth"):
        aupro(np.random.rand(2, 4, 4), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="no defect-free"):
        aupro(np.random.rand(2, 4, 4), np.ones((2, 4, 4)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.random.rand(2, 4, 4), np.eye(4)[None].repeat(2, 0), fpr_limit=0.0)
    with pytest.raises(ValueError, match="maps has 2 images"):
        evaluate_all(s, y, np.random.rand(2, 4, 4), np.eye(4)[None].repeat(2, 0))
