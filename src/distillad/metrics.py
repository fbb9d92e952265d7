"""Exact evaluation metrics for anomaly detection (docs/evaluation.md#metrics).

All metrics are computed exactly: no threshold binning and no sampling. Every
distinct score value is a threshold, and tied scores are handled as one
threshold (a pixel / image counts as "anomalous" when ``score >= threshold``).

* :func:`image_auroc` / :func:`pixel_auroc` give the same value as
  ``sklearn.metrics.roc_auc_score`` (ties count one half).
* :func:`f1_max` gives the maximum of ``2PR / (P + R)`` over
  ``sklearn.metrics.precision_recall_curve`` (0/0 counts as 0).
* :func:`aupro` is the standard AUPRO of the MVTec AD paper and its evaluation
  code (not the RD / STFPM variants): components with 8-connectivity, PRO
  averaged over all components of all images, FPR over all defect-free pixels
  of all images, curve cut at ``fpr_limit`` by linear interpolation, trapezoid
  rule, divided by ``fpr_limit``.

Why one module of this length: every metric shares the same exact tie-aware threshold sweep, and the protocol is
easier to audit (against scikit-learn in tests/test_metrics.py) when it is read in one place.

Undefined cases raise ``ValueError`` instead of returning NaN, so a broken
evaluation cannot silently produce a number: AUROC needs both classes, F1-max
needs at least one positive, AUPRO needs at least one ground-truth component
and at least one defect-free pixel.

Inputs may be numpy arrays, torch tensors (any device, any float dtype
including float16 / bfloat16) or nested sequences. Low-precision floats are
widened exactly (float16 -> float32), so ties are neither created nor broken.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "ArrayLike",
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "roc_curve",
    "pro_curve",
    "f1_max",
    "pixel_f1_max",
    "evaluate_all",
]

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]

# 8-connectivity for ground-truth components, as in the MVTec AD evaluation code.
_STRUCTURE_8 = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------- #
# input handling
# --------------------------------------------------------------------------- #
# The five numbers of an evaluation, in the order every table prints them.
METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "image_f1max", "pixel_f1max")


def _to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    """Convert an input to numpy without losing precision or ties."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()  # exact widening; numpy has no bfloat16
        return t.numpy()
    if isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(e, torch.Tensor) for e in x):
        return _to_numpy(torch.stack([e.detach().cpu() for e in x]), name)
    arr = np.asarray(x)
    if arr.dtype == object:
        raise ValueError(f"{name} could not be converted to a numeric array")
    return arr


def _as_scores(x: ArrayLike, name: str) -> np.ndarray:
    """Scores as a float array (float32 or float64), checked to be finite.

    float16 is widened to float32 and integers to float64: both are exact, so
    the ordering and the ties of the scores are preserved.
    """
    arr = _to_numpy(x, name)
    if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float64)
    elif np.issubdtype(arr.dtype, np.floating):
        if arr.dtype not in (np.float32, np.float64):
            arr = arr.astype(np.float32 if arr.dtype.itemsize < 4 else np.float64)
    else:
        raise ValueError(f"{name} must be real numbers, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return arr


def _as_binary_labels(x: ArrayLike, name: str) -> np.ndarray:
    """Image labels as bool; only 0/1 (or bool) values are accepted."""
    arr = _to_numpy(x, name)
    if arr.dtype == np.bool_:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must be binary (0/1 or bool), got dtype {arr.dtype}")
    if arr.size and np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    if not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must be binary (only 0 and 1), got values {np.unique(arr)[:10]}")
    return arr.astype(bool)


def _as_masks(x: ArrayLike, name: str) -> np.ndarray:
    """Masks as bool, binarised at > 0 (accepts bool, 0/1 and 0/255 masks)."""
    arr = _to_numpy(x, name)
    if arr.dtype == np.bool_:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must be numeric or bool, got dtype {arr.dtype}")
    if arr.size and np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    if arr.size and (arr < 0).any():
        raise ValueError(f"{name} must be non-negative (binarised at > 0)")
    return arr > 0


def _as_nhw(arr: np.ndarray, name: str) -> np.ndarray:
    """Bring a map / mask stack to (N, H, W); (H, W) and (N, 1, H, W) are accepted."""
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 4 and arr.shape[1] == 1:
        return arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W), got {tuple(arr.shape)}")
    return arr


def _check_same_shape(a: np.ndarray, b: np.ndarray, na: str, nb: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {na} has shape {tuple(a.shape)} but {nb} has {tuple(b.shape)}")


def _maps_masks(maps: ArrayLike, masks: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    m = _as_nhw(_as_scores(maps, "maps"), "maps")
    g = _as_nhw(_as_masks(masks, "masks"), "masks")
    _check_same_shape(m, g, "maps", "masks")
    return m, g


# --------------------------------------------------------------------------- #
# exact curve machinery
# --------------------------------------------------------------------------- #
def _descending_order(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort once; return the descending order and the index of the last element of every tie group.

    Only the ends of tie groups are thresholds: all elements with the same
    score enter the "anomalous" side together.
    """
    order = np.argsort(scores, kind="quicksort")[::-1]
    s = scores[order]
    ends = np.flatnonzero(s[1:] != s[:-1])
    del s
    ends = np.append(ends, scores.size - 1)
    return order, ends


def _counts_at_ends(pos_sorted: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True / false positive counts (int64, exact) at every distinct threshold, descending."""
    tps = np.cumsum(pos_sorted, dtype=np.int64)[ends]
    fps = (ends + 1) - tps
    return tps, fps


def _auroc_from_counts(tps: np.ndarray, fps: np.ndarray, what: str) -> float:
    """Trapezoid area under the ROC curve, computed in exact integer arithmetic.

    Twice the area in count units is ``sum(dFP * (TP_i + TP_{i-1}))``, an
    integer; Python's int / int division then rounds once, correctly.
    """
    n_pos, n_neg = int(tps[-1]), int(fps[-1])
    if n_pos == 0 or n_neg == 0:
        present = "positive (anomalous)" if n_pos else "negative (normal)"
        raise ValueError(
            f"{what} AUROC is undefined: only one class is present (all {present}); "
            "both normal and anomalous samples are needed"
        )
    tp = np.concatenate(([0], tps))
    fp = np.concatenate(([0], fps))
    twice_area = int(np.dot(np.diff(fp), tp[1:] + tp[:-1]))
    return twice_area / (2 * n_pos * n_neg)


def _f1max_from_counts(tps: np.ndarray, fps: np.ndarray, what: str) -> float:
    """Best F1 = 2TP / (2TP + FP + FN) = 2TP / (TP + FP + P) over all thresholds."""
    n_pos = int(tps[-1])
    if n_pos == 0:
        raise ValueError(f"{what} F1-max is undefined: no positive (anomalous) samples are present")
    f1 = 2.0 * tps / (tps + fps + n_pos).astype(np.float64)
    return float(f1.max())


def _binary_counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = scores.ravel()
    labels = labels.ravel()
    order, ends = _descending_order(scores)
    return _counts_at_ends(labels[order], ends)


def _label_components(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Label 8-connected components per image, with ids unique over the whole stack (0 = normal)."""
    comp = np.zeros(masks.shape, dtype=np.int32)
    offset = 0
    for i in range(masks.shape[0]):
        n = ndimage.label(masks[i], structure=_STRUCTURE_8, output=comp[i])
        if n:
            comp[i][comp[i] > 0] += offset
            offset += n
    return comp, offset


def _pixel_curves(
    maps: np.ndarray, masks: np.ndarray, with_pro: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """One sort of all pixels, shared by pixel AUROC, pixel F1-max and AUPRO.

    Returns TP and FP counts at every distinct threshold (descending), and if
    ``with_pro`` the PRO value at every threshold and the number of components.
    """
    flat = maps.reshape(-1)
    order, ends = _descending_order(flat)
    if not with_pro:
        tps, fps = _counts_at_ends(masks.reshape(-1)[order], ends)
        return tps, fps, None, 0

    comp, n_comps = _label_components(masks)
    comp_sorted = comp.reshape(-1)[order]
    del order, comp
    tps, fps = _counts_at_ends(comp_sorted > 0, ends)
    if n_comps == 0:
        return tps, fps, None, 0
    sizes = np.bincount(comp_sorted, minlength=n_comps + 1).astype(np.float64)
    # Weight of one anomalous pixel: 1 / (|component| * n_components), so that a
    # component fully above the threshold adds exactly 1 / n_components to PRO.
    weights = np.zeros(n_comps + 1, dtype=np.float64)
    weights[1:] = 1.0 / (sizes[1:] * n_comps)
    pro = np.cumsum(weights[comp_sorted])[ends]
    return tps, fps, pro, n_comps


def _cut_curve(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve from (0, 0) up to FPR = ``fpr_limit``; if no point lies exactly at ``fpr_limit`` the
    PRO there is linearly interpolated between its neighbours."""
    x = np.concatenate(([0.0], fpr))
    y = np.concatenate(([0.0], pro))
    k = int(np.searchsorted(x, fpr_limit, side="right"))  # x[:k] <= fpr_limit
    xs, ys = x[:k], y[:k]
    if xs[-1] < fpr_limit and k < x.size:
        x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
        y_lim = y0 + (fpr_limit - x0) * (y1 - y0) / (x1 - x0)
        xs = np.append(xs, fpr_limit)
        ys = np.append(ys, y_lim)
    return xs, ys


def _aupro_from_curve(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Integrate PRO over FPR in [0, fpr_limit] (trapezoid, curve cut by `_cut_curve`), normalised by fpr_limit."""
    xs, ys = _cut_curve(fpr, pro, fpr_limit)
    area = float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1])) * 0.5)
    return area / fpr_limit


def _pro_points(fps: np.ndarray, pro: np.ndarray | None, n_comps: int) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct threshold, checked to be defined."""
    if n_comps == 0 or pro is None:
        raise ValueError("AUPRO is undefined: the masks contain no ground-truth anomaly (no connected component)")
    n_normal = int(fps[-1])
    if n_normal == 0:
        raise ValueError("AUPRO is undefined: the masks contain no defect-free (normal) pixel")
    return fps / n_normal, pro


def _aupro_checked(
    fps: np.ndarray, pro: np.ndarray | None, n_comps: int, fpr_limit: float
) -> float:
    return _aupro_from_curve(*_pro_points(fps, pro, n_comps), fpr_limit)


def _check_fpr_limit(fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not (0.0 < fpr_limit <= 1.0):
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return fpr_limit


# --------------------------------------------------------------------------- #
# public API
# --------------------------------------------------------------------------- #
def image_auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Exact image-level AUROC (equals sklearn ``roc_auc_score``, ties count one half).

    ``labels`` must be binary (1 = anomalous). Raises ``ValueError`` if the
    shapes differ, a score is NaN/inf, or only one class is present (AUROC is
    undefined then).
    """
    s = _as_scores(scores, "scores")
    y = _as_binary_labels(labels, "labels")
    _check_same_shape(s, y, "scores", "labels")
    tps, fps = _binary_counts(s, y)
    return _auroc_from_counts(tps, fps, "image")


def pixel_auroc(maps: ArrayLike, masks: ArrayLike) -> float:
    """Exact pixel AUROC pooled over all pixels of all images.

    ``maps`` (N, H, W) float, ``masks`` (N, H, W) bool / 0-1 / 0-255
    (binarised at > 0). Raises ``ValueError`` if only one class is present.
    """
    m, g = _maps_masks(maps, masks)
    tps, fps, _, _ = _pixel_curves(m, g, with_pro=False)
    return _auroc_from_counts(tps, fps, "pixel")


def aupro(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Exact area under the per-region-overlap curve up to ``fpr_limit``, normalised to [0, 1].

    Standard MVTec AD definition: 8-connected ground-truth components per image;
    PRO is the mean over all components of all images of the covered fraction;
    FPR is over all defect-free pixels of all images (defective images
    included). Raises ``ValueError`` if there is no component or no normal pixel.
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    m, g = _maps_masks(maps, masks)
    _, fps, pro, n_comps = _pixel_curves(m, g, with_pro=True)
    return _aupro_checked(fps, pro, n_comps, fpr_limit)


def roc_curve(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The exact ROC curve behind :func:`image_auroc` / :func:`pixel_auroc`: (FPR, TPR) float64 arrays from
    (0, 0) to (1, 1), one point per distinct score (descending threshold). Inputs are flattened, so pixel maps
    and masks work too; the trapezoid area under the curve is the AUROC. Raises ``ValueError`` like the AUROC."""
    s = _as_scores(scores, "scores")
    y = _as_binary_labels(labels, "labels")
    _check_same_shape(s, y, "scores", "labels")
    tps, fps = _binary_counts(s, y)
    if tps[-1] == 0 or fps[-1] == 0:
        raise ValueError("the ROC curve is undefined: only one class is present; both normal and anomalous "
                         "samples are needed")
    return (np.concatenate(([0.0], fps / fps[-1])), np.concatenate(([0.0], tps / tps[-1])))


def pro_curve(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """The exact per-region-overlap curve behind :func:`aupro`: (FPR, PRO) float64 arrays from (0, 0) to
    FPR = ``fpr_limit`` (the last point interpolated as in :func:`aupro`), one point per distinct map value.

    ``np.trapezoid(pro, fpr) / fpr_limit`` is :func:`aupro`. Raises ``ValueError`` like :func:`aupro`.
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    m, g = _maps_masks(maps, masks)
    _, fps, pro, n_comps = _pixel_curves(m, g, with_pro=True)
    return _cut_curve(*_pro_points(fps, pro, n_comps), fpr_limit)


def f1_max(scores: ArrayLike, labels: ArrayLike) -> float:
    """Best F1 over all thresholds (inputs are flattened; labels binary 0/1).

    Equals the max over sklearn ``precision_recall_curve`` of ``2PR/(P+R)``
    (0/0 as 0). Raises ``ValueError`` if there is no positive sample.
    """
    s = _as_scores(scores, "scores")
    y = _as_binary_labels(labels, "labels")
    _check_same_shape(s, y, "scores", "labels")
    tps, fps = _binary_counts(s, y)
    return _f1max_from_counts(tps, fps, "")


def pixel_f1_max(maps: ArrayLike, masks: ArrayLike) -> float:
    """Best pixel-level F1 over all thresholds, masks binarised at > 0."""
    m, g = _maps_masks(maps, masks)
    tps, fps, _, _ = _pixel_curves(m, g, with_pro=False)
    return _f1max_from_counts(tps, fps, "pixel")


def pixel_metrics(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> dict[str, float]:
    """``pixel_auroc``, ``aupro`` (at ``fpr_limit``) and ``pixel_f1max`` from one sort of the pixels."""
    fpr_limit = _check_fpr_limit(fpr_limit)
    m, g = _maps_masks(maps, masks)
    tps, fps, pro, n_comps = _pixel_curves(m, g, with_pro=True)
    return {
        "pixel_auroc": _auroc_from_counts(tps, fps, "pixel"),
        "aupro": _aupro_checked(fps, pro, n_comps, fpr_limit),
        "pixel_f1max": _f1max_from_counts(tps, fps, "pixel"),
    }


def evaluate_all(
    scores: ArrayLike, labels: ArrayLike, maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3
) -> dict[str, float]:
    """All metrics of one category; the pixels are sorted only once for the three pixel metrics.

    Returns ``image_auroc``, ``pixel_auroc``, ``aupro`` (at ``fpr_limit``),
    ``image_f1max`` and ``pixel_f1max``.
    """
    s = _as_scores(scores, "scores")
    y = _as_binary_labels(labels, "labels")
    _check_same_shape(s, y, "scores", "labels")
    n_maps = _as_nhw(_to_numpy(maps, "maps"), "maps").shape[0]
    if s.size != n_maps:
        raise ValueError(f"scores has {s.size} entries but maps has {n_maps} images")
    itps, ifps = _binary_counts(s, y)
    return {
        "image_auroc": _auroc_from_counts(itps, ifps, "image"),
        "image_f1max": _f1max_from_counts(itps, ifps, "image"),
        **pixel_metrics(maps, masks, fpr_limit),
    }
