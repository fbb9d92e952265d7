"""The one map/score pipeline: per-level discrepancy -> upsample -> fuse levels -> fuse students -> blur -> max.

Test, predict, calibration, benchmark, speed and export all go through `AnomalyScorer`, so a number measured by one
of them describes what the others compute.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

import torch
import torch.nn.functional as F
from torch import nn

from distillad.methods.base import DistillationModel, FeaturePairs
from distillad.methods.parts import cosine_distance_map
from distillad.ops import gaussian_kernel1d, separable_blur


class GaussianBlur(nn.Module):
    """Separable Gaussian blur of (B,H,W) maps in torch (exportable), reflect padding; sigma 0 is the identity."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = float(sigma)
        kernel = gaussian_kernel1d(sigma) if sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if self.sigma <= 0:
            return maps
        radius = self.kernel.numel() // 2
        height, width = maps.shape[-2:]
        # Reflect padding needs the pad to be smaller than the side; fall back to replicate for tiny maps.
        mode = "reflect" if radius < min(height, width) else "replicate"
        return separable_blur(maps.unsqueeze(1), self.kernel, mode).squeeze(1)


def fuse(maps: Sequence[torch.Tensor], mode: str) -> torch.Tensor:
    """Combine same-sized maps: sum | mean | max | product."""
    stacked = torch.stack(list(maps), dim=0)
    if mode == "sum":
        return stacked.sum(0)
    if mode == "mean":
        return stacked.mean(0)
    if mode == "max":
        return stacked.amax(0)
    if mode == "product":
        return stacked.prod(0)
    raise ValueError(f"unknown fusion {mode!r}")


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def level_maps(pairs: FeaturePairs) -> list[list[torch.Tensor]]:
    """Per student, per level: the per-pixel 1 - cos(T, S) discrepancy (B,h,w)."""
    return [[cosine_distance_map(t, s) for t, s in student] for student in pairs]


class AnomalyScorer(nn.Module):
    """Wraps a trained model: images in [0,1] (B,3,H,W) -> anomaly maps (B,H,W) and image scores (B,)."""

    def __init__(self, model: DistillationModel, *, channels_last: bool = False) -> None:
        super().__init__()
        self.model = model
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        options = model.options
        self.level_fusion = options.level_fusion
        self.student_fusion = options.student_fusion
        self.map_norm = options.map_norm
        self.position_norm = options.position_norm
        self.score_topk = options.score_topk
        self.blur = GaussianBlur(options.sigma)
        # Per (student, level): the low and high quantile of the map on defect-free validation images (map_norm).
        self.register_buffer("norm_low", torch.zeros(0, 0))
        self.register_buffer("norm_high", torch.zeros(0, 0))
        # position_norm: the per-position maximum of the validation maps at POSITION_GRID x POSITION_GRID. Zero
        # until calibration installs it (a fresh, uncalibrated scorer - speed, tests - scores the plain map at the
        # same cost); every run folder holds its fitted reference in meta.json.
        self.register_buffer("position_reference", torch.zeros(POSITION_GRID, POSITION_GRID))

    def set_map_statistics(self, low: torch.Tensor, high: torch.Tensor) -> None:
        """Install the (students, levels) quantiles fitted by `fit_map_statistics`."""
        device = self.norm_low.device
        self.norm_low = low.detach().float().to(device)
        self.norm_high = torch.maximum(high.detach().float().to(device), self.norm_low + 1e-6)

    def raw_maps(self, images: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per student, per level: the discrepancy map upsampled to the input size, before any normalisation."""
        size = (images.shape[-2], images.shape[-1])
        images = images.contiguous(memory_format=self.memory_format)
        return [[upsample(m, size) for m in maps] for maps in self.model.discrepancy_maps(images)]

    def fold_batchnorm(self, image_size: int) -> int:
        """Fold BatchNorm into the convolutions for inference (in place, eval mode); returns the pairs folded.

        Checked on a probe image: a model whose maps would change is left as it was.
        """
        from distillad.scoring.fold import fold_batchnorm

        device = next(self.model.parameters()).device
        probe = torch.rand(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
        # Checked on every student's and level's raw map: what map options and normalisation are computed from.
        return fold_batchnorm(self, lambda scorer: tuple(m for maps in scorer.raw_maps(probe) for m in maps))

    def set_position_reference(self, reference: torch.Tensor) -> None:
        """Install the (POSITION_GRID, POSITION_GRID) per-position reference fitted on validation maps."""
        self.position_reference = reference.detach().float().to(self.norm_low.device)

    def normal_map(self, images: torch.Tensor) -> torch.Tensor:
        """The blurred, fused map before the per-position reference is subtracted (B,H,W)."""
        per_student = []
        for s, maps in enumerate(self.raw_maps(images)):
            if self.map_norm == "quantile":
                if self.norm_low.numel() == 0:
                    raise RuntimeError("map_norm=quantile needs the validation statistics (set_map_statistics)")
                maps = [(m - self.norm_low[s, l]) / (self.norm_high[s, l] - self.norm_low[s, l])
                        for l, m in enumerate(maps)]
            per_student.append(fuse(maps, self.level_fusion))
        return self.blur(fuse(per_student, self.student_fusion))

    def excess(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """A normal map's excess over the per-position validation maximum (position_norm)."""
        return anomaly_map - upsample(self.position_reference[None], anomaly_map.shape[-2:])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        anomaly_map = self.normal_map(images)
        if self.position_norm == "max":
            anomaly_map = self.excess(anomaly_map)
        elif self.position_norm == "score":      # the map keeps its own units; only the score uses the excess
            return anomaly_map, image_score(self.excess(anomaly_map), self.score_topk)
        return anomaly_map, image_score(anomaly_map, self.score_topk)

    def decision_map(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """The map in the units of the image score, which the threshold applies to: a mask is
        `decision_map(map) > threshold`, so an image is flagged (score = max) exactly when its mask is not empty."""
        return self.excess(anomaly_map) if self.position_norm == "score" else anomaly_map


def image_score(anomaly_map: torch.Tensor, topk: float = 0.0) -> torch.Tensor:
    """(B,H,W) maps -> (B,) scores: the maximum, or with topk = f > 0 the mean of the top f share of pixels."""
    flat = anomaly_map.flatten(1)
    if topk > 0:
        k = max(1, int(round(topk * flat.shape[1])))
        return flat.topk(k, dim=1).values.mean(dim=1)
    return flat.amax(dim=1)


POSITION_GRID = 64


def position_references(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From validation maps (N,H,W): the per-position maximum on the POSITION_GRID grid, and each image's
    leave-one-out reference (N,GRID,GRID), the maximum over the *other* images, for an honest threshold.
    With a single image there is no other to compare with: the reference is zero (the threshold is untrustworthy
    anyway, and training says so)."""
    pooled = F.adaptive_avg_pool2d(maps[:, None], POSITION_GRID)[:, 0]
    if pooled.shape[0] < 2:     # nothing to leave one out against: no reference (the plain map's score)
        return torch.zeros_like(pooled[0]), torch.zeros_like(pooled)
    top = pooled.topk(2, dim=0)
    reference = top.values[0]
    owner = top.indices[0]
    index = torch.arange(pooled.shape[0])[:, None, None]
    leave_one_out = torch.where(owner[None] == index, top.values[1][None], top.values[0][None])
    return reference, leave_one_out


def make_scorer(model: DistillationModel, *, channels_last: bool, image_size: int,
                fold_batchnorm: bool = True) -> tuple[AnomalyScorer, int]:
    """The one way an inference scorer is built (calibration, test, predict, speed, export).

    Puts `model` in eval mode on its own device, wraps it, and folds BatchNorm into the convolutions (checked on
    a probe image of `image_size`). Folding changes `model` in place, so save a trained model before calling this.
    Returns the scorer and the number of conv -> BN pairs folded.
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    device = next(model.parameters()).device
    model.to(memory_format=memory_format).eval()
    scorer = AnomalyScorer(model, channels_last=channels_last).to(device).eval()
    folded = scorer.fold_batchnorm(image_size) if fold_batchnorm else 0
    return scorer, folded


def fit_map_statistics(scorer: AnomalyScorer, batches: Iterable[torch.Tensor], *, q_low: float = 0.9,
                       q_high: float = 0.995, max_values: int = 4_000_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantiles of each (student, level) map's values over defect-free images: (students, levels) low and high.

    The values are subsampled with a fixed stride to at most `max_values` per map, so memory stays bounded."""
    values: list[list[list[torch.Tensor]]] = []
    with torch.inference_mode():
        for images in batches:
            for s, maps in enumerate(scorer.raw_maps(images)):
                if len(values) <= s:
                    values.append([[] for _ in maps])
                for l, m in enumerate(maps):
                    values[s][l].append(m.flatten().float().cpu())
    if not values:
        raise ValueError("map statistics need at least one defect-free image")
    low = torch.zeros(len(values), len(values[0]))
    high = torch.zeros_like(low)
    for s, per_level in enumerate(values):
        for l, parts in enumerate(per_level):
            flat = torch.cat(parts)
            flat = flat[:: max(1, flat.numel() // max_values)].double().numpy()
            low[s, l], high[s, l] = float(np.quantile(flat, q_low)), float(np.quantile(flat, q_high))
    return low, high
