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
from distillad.scoring import AnomalyScorer, Calibration, fit_map_statistics
from distillad.scoring.calibration import ThresholdRule
from distillad.scoring.maps import image_score, position_references, upsample


def fit_normal_statistics(scorer: AnomalyScorer, dataset: ImageDataset, *, threshold: ThresholdRule, batch_size: int,
                          device: torch.device | str) -> tuple[Calibration, dict[str, Any] | None, np.ndarray]:
    """(calibration, map statistics for meta.json or None, the validation scores) of `scorer` on `dataset`.

    With position_norm=max or score the reference is the per-position maximum over all validation images, but each
    validation image is scored against the maximum over the *other* images (leave one out): scored against a
    reference that contains itself, every validation score would be <= 0 and the threshold far too low."""
    statistics: dict[str, Any] = {}
    if scorer.map_norm != "none":
        batches = (batch["image"].to(device) for batch in DataLoader(dataset, batch_size=batch_size))
        low, high = fit_map_statistics(scorer, batches)
        scorer.set_map_statistics(low, high)
        statistics.update({"kind": scorer.map_norm, "low": low.tolist(), "high": high.tolist()})
    if scorer.position_norm != "none":
        maps = []
        with torch.inference_mode():
            for batch in DataLoader(dataset, batch_size=batch_size):
                maps.append(scorer.normal_map(batch["image"].to(device)).float().cpu())
        normal_maps = torch.cat(maps)
        reference, leave_one_out = position_references(normal_maps)
        scorer.set_position_reference(reference)
        statistics["position_reference"] = reference.tolist()
        size = normal_maps.shape[-2:]
        excess = normal_maps - upsample(leave_one_out, size)
        scores = image_score(excess, scorer.score_topk).numpy()
    else:
        _, scores = score_dataset(scorer, dataset, batch_size=batch_size, device=device, keep_maps=False)
    return threshold.fit(scores), statistics or None, scores


def apply_map_statistics(scorer: AnomalyScorer, statistics: dict[str, Any] | None) -> None:
    if statistics and "low" in statistics:
        scorer.set_map_statistics(torch.tensor(statistics["low"]), torch.tensor(statistics["high"]))
    if statistics and "position_reference" in statistics:
        scorer.set_position_reference(torch.tensor(statistics["position_reference"]))
