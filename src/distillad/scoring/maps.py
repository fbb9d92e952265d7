"""The one map/score pipeline: per-level discrepancy -> upsample -> fuse levels -> fuse students -> blur -> max.

Test, predict, calibration, benchmark, speed and export all go through `AnomalyScorer`, so a number measured by one
of them describes what the others compute.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distillad.methods.base import DistillationModel, FeaturePairs
from distillad.methods.parts import cosine_distance_map


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1-D Gaussian, radius round(truncate * sigma) like scipy.ndimage.gaussian_filter."""
    radius = max(1, int(truncate * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


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
        x = maps.unsqueeze(1)
        height, width = x.shape[-2:]
        # Reflect padding needs the pad to be smaller than the side; fall back to replicate for tiny maps.
        mode = "reflect" if radius < min(height, width) else "replicate"
        x = F.pad(x, (radius, radius, 0, 0), mode=mode)
        x = F.conv2d(x, self.kernel.view(1, 1, 1, -1))
        x = F.pad(x, (0, 0, radius, radius), mode=mode)
        x = F.conv2d(x, self.kernel.view(1, 1, -1, 1))
        return x.squeeze(1)


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
        self.blur = GaussianBlur(options.sigma)

    def fold_batchnorm(self, image_size: int) -> int:
        """Fold BatchNorm into the convolutions for inference (in place, eval mode); returns the pairs folded.

        Checked on a probe image: a model whose maps would change is left as it was.
        """
        from distillad.scoring.fold import fold_batchnorm

        device = next(self.model.parameters()).device
        probe = torch.rand(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
        return fold_batchnorm(self, lambda scorer: scorer(probe))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = (images.shape[-2], images.shape[-1])
        images = images.contiguous(memory_format=self.memory_format)
        per_student = []
        for maps in level_maps(self.model.feature_pairs(images)):
            per_student.append(fuse([upsample(m, size) for m in maps], self.level_fusion))
        anomaly_map = self.blur(fuse(per_student, self.student_fusion))
        return anomaly_map, anomaly_map.flatten(1).amax(dim=1)


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
