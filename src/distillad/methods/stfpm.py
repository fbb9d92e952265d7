"""STFPM (Wang et al. 2021), the vanilla student-teacher: one forward student with the teacher's architecture."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillad.backbones import create_backbone
from distillad.methods.base import DistillationModel, FeaturePairs, MethodOptions, register_method, select_levels
from distillad.methods.parts import cosine_distance_map


@dataclass
class STFPMOptions(MethodOptions):
    level_fusion: str = "product"   # the paper multiplies the per-level maps
    sigma: float = 4.0


@register_method
class STFPM(DistillationModel):
    name = "stfpm"
    # batch 32 for 180 steps: the same number of images seen as the batch-16 recipes' 360 steps
    recipe = {"batch_size": 32, "steps": 180,
              "optimizer": {"name": "sgd", "lr": 0.4, "momentum": 0.9, "weight_decay": 1e-4}}
    options_class = STFPMOptions

    def __init__(self, backbone: str, options: STFPMOptions, *, pretrained: bool = True,
                 weights: str | None = None) -> None:
        super().__init__(backbone, options, pretrained=pretrained, weights=weights)
        self.student = create_backbone(backbone, levels=(1, 2, 3), pretrained=False)

    def feature_pairs(self, images: torch.Tensor, teacher: list[torch.Tensor] | None = None) -> FeaturePairs:
        teacher = self.teacher_features(images, teacher)
        student = self.student(self.normalize(images))
        return [select_levels(list(zip(teacher, student)), self.options.levels)]

    def loss(self, pairs: FeaturePairs) -> torch.Tensor:
        # Sum_c (n(T) - n(S))^2 = 2 (1 - cos); STFPM halves it, averages over pixels and sums over images and levels.
        return sum(cosine_distance_map(t, s).mean(dim=(1, 2)).sum() for t, s in pairs[0])
