"""Batched scoring of a dataset through the shared AnomalyScorer, and the evaluation of a run on a test split."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from distillad.data import CategorySplit, DataError, ImageDataset
from distillad import metrics
from distillad.metrics import METRIC_KEYS
from distillad.heatmaps import content_map
from distillad.scoring import AnomalyScorer, Calibration


def score_dataset(scorer: AnomalyScorer, dataset: ImageDataset, *, batch_size: int = 16,
                  device: torch.device | str = "cpu", keep_maps: bool = True, progress: bool = False,
                  on_batch: Callable[[dict[str, Any]], None] | None = None) -> tuple[np.ndarray | None, np.ndarray]:
    """Maps (N,H,W) float32 (None unless keep_maps) and image scores (N,) for every image, in dataset order.

    `on_batch` sees each loaded batch (labels, masks), so callers need not load the dataset a second time."""
    maps: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    scorer.eval()
    with torch.inference_mode():
        for batch in tqdm(DataLoader(dataset, batch_size=batch_size), disable=not progress, unit="batch",
                          desc="scoring"):
            anomaly_map, score = scorer(batch["image"].to(device))
            if on_batch is not None:
                on_batch(batch)
            scores.append(score.float().cpu().numpy())
            if keep_maps:
                maps.append(anomaly_map.float().cpu().numpy())
    all_scores = np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)
    return (np.concatenate(maps) if maps else None), all_scores


class _TargetCollector:
    """Gathers labels, masks and whether each mask is real ground truth from the scored batches."""

    def __init__(self) -> None:
        self.labels: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.has_mask: list[np.ndarray] = []
        self.boxes: list[np.ndarray] = []

    def __call__(self, batch: dict[str, Any]) -> None:
        labels = batch["label"].numpy()
        self.labels.append(labels)
        self.masks.append(batch["mask"].numpy())
        self.has_mask.append(batch["has_mask"].numpy() | (labels == 0))
        self.boxes.append(batch["box"].numpy())

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.concatenate(self.labels), np.concatenate(self.masks), np.concatenate(self.has_mask)


def threshold_report(scores: np.ndarray, labels: np.ndarray, calibration: Calibration | None) -> dict[str, Any] | None:
    """How the normal-only threshold performs on labelled test images (never used to choose anything)."""
    if calibration is None:
        return None
    predicted = scores > calibration.threshold
    normal, defective = labels == 0, labels == 1
    return {
        "value": calibration.threshold,
        "rule": calibration.describe(),
        "false_alarm_rate": float(predicted[normal].mean()) if normal.any() else None,
        "detection_rate": float(predicted[defective].mean()) if defective.any() else None,
        "accuracy": float((predicted == defective).mean()),
    }


def maps_in_mask_frame(maps: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(N,S,S) maps of letterboxed inputs -> the part each image fills (`boxes`: top, left, h, w), resized to S x S:
    the stretched frame the masks, hence the metrics, are in."""
    return np.stack([content_map(m, box, m.shape[0], m.shape[1]) for m, box in zip(maps, boxes)])


def evaluate_split(scorer: AnomalyScorer, data: CategorySplit, image_size: int, *, batch_size: int = 16,
                   device: torch.device | str = "cpu", calibration: Calibration | None = None,
                   progress: bool = False, resize: str = "stretch") -> dict[str, Any]:
    """The evaluation protocol on data.test: five metrics, counts, timing and threshold behaviour. `resize` is
    the run's (TrainConfig.resize): letterboxed inputs' maps are brought to the masks' stretched frame first, and
    each image's entry says where it lies in its input (`box`)."""
    if not data.test:
        raise DataError(f"{data.name} has no test images to evaluate")
    dataset = ImageDataset(data.test, image_size, resize=resize)
    start = time.perf_counter()
    targets = _TargetCollector()
    maps, scores = score_dataset(scorer, dataset, batch_size=batch_size, device=device, progress=progress,
                                 on_batch=targets)
    inference_seconds = time.perf_counter() - start
    labels, masks, has_mask = targets.arrays()
    assert maps is not None
    boxes = np.concatenate(targets.boxes)
    if resize != "stretch":
        maps = maps_in_mask_frame(maps, boxes)
    result: dict[str, Any] = {
        "category": data.name,
        "n_images": int(len(labels)),
        "n_defective": int(labels.sum()),
        "image_auroc": metrics.image_auroc(scores, labels),
        "image_f1max": metrics.f1_max(scores, labels),
    }
    result.update(metrics.pixel_metrics(maps[has_mask], masks[has_mask]))
    result["n_images_without_mask"] = int((~has_mask).sum())
    result["inference_seconds"] = inference_seconds
    result["seconds"] = time.perf_counter() - start
    result["threshold"] = threshold_report(scores, labels, calibration)
    result["images"] = [{"path": str(sample.path), "defect_type": sample.defect_type, "label": int(label),
                         "score": float(score)} for sample, label, score in zip(data.test, labels, scores)]
    if resize != "stretch":
        for image, box in zip(result["images"], boxes):
            image["box"] = [int(v) for v in box]
    return result


def format_metrics(result: dict[str, Any]) -> str:
    """The evaluation as a person reads it: counts, the five metrics, and how the calibrated threshold did."""
    width = max(len(k) for k in METRIC_KEYS)
    lines = [f"{result['category']}: {result['n_images']} test images ({result['n_defective']} defective), "
             f"{result['seconds']:.1f} s"]
    lines += [f"  {key:<{width}}  {result[key]:.4f}" for key in METRIC_KEYS]
    threshold = result.get("threshold")
    if threshold:
        far, det = threshold["false_alarm_rate"], threshold["detection_rate"]
        lines.append(f"  calibrated threshold {threshold['value']:.4g}: false alarms "
                     f"{'n/a' if far is None else f'{far:.1%}'}, detections {'n/a' if det is None else f'{det:.1%}'}")
    return "\n".join(lines)
