"""Normal-only statistics of a trained scorer: the map normalisation (when the run uses one) and the threshold.

Both come from defect-free validation images only. Training fits them once; loading a run with other map options
fits them again on the same validation images (listed in meta.json), so a changed map rule keeps a threshold.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from distillad.data import ImageDataset
from distillad.engine.inference import score_dataset
from distillad.scoring import AnomalyScorer, Calibration, calibrate, fit_map_statistics


def fit_normal_statistics(scorer: AnomalyScorer, dataset: ImageDataset, *, threshold_k: float, batch_size: int,
                          device: torch.device | str) -> tuple[Calibration, dict[str, Any] | None, np.ndarray]:
    """(calibration, map statistics for meta.json or None, the validation scores) of `scorer` on `dataset`."""
    statistics = None
    if scorer.map_norm != "none":
        batches = (batch["image"].to(device) for batch in DataLoader(dataset, batch_size=batch_size))
        low, high = fit_map_statistics(scorer, batches)
        scorer.set_map_statistics(low, high)
        statistics = {"kind": scorer.map_norm, "low": low.tolist(), "high": high.tolist()}
    _, scores = score_dataset(scorer, dataset, batch_size=batch_size, device=device, keep_maps=False)
    return calibrate(scores, k=threshold_k), statistics, scores


def apply_map_statistics(scorer: AnomalyScorer, statistics: dict[str, Any] | None) -> None:
    if statistics:
        scorer.set_map_statistics(torch.tensor(statistics["low"]), torch.tensor(statistics["high"]))
