"""Reverse Distillation (Deng & Li, CVPR 2022): a decoder student restores the teacher pyramid from a bottleneck."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillad.methods.base import DistillationModel, FeaturePairs, MethodOptions, register_method, select_levels
from distillad.methods.parts import global_cosine_distance, reverse_student


@dataclass
class RDOptions(MethodOptions):
    bottleneck_blocks: int = 2
    decoder_blocks: int = 2


@register_method
class ReverseDistillation(DistillationModel):
    name = "rd"
    recipe = {"batch_size": 16, "optimizer": {"name": "adam", "lr": 0.005, "betas": (0.5, 0.999)}}
    options_class = RDOptions

    def __init__(self, backbone: str, options: RDOptions, *, pretrained: bool = True,
                 weights: str | None = None) -> None:
        super().__init__(backbone, options, pretrained=pretrained, weights=weights)
        channels = self.teacher.channels
        self.bottleneck, self.decoder = reverse_student(
            channels, channels, bottleneck_blocks=options.bottleneck_blocks, decoder_blocks=options.decoder_blocks,
            relu_output=self.teacher_relu_features)

    def decode(self, teacher: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.decoder(self.bottleneck(teacher))

    def feature_pairs(self, images: torch.Tensor, teacher: list[torch.Tensor] | None = None) -> FeaturePairs:
        teacher = self.teacher_features(images, teacher)
        return [select_levels(list(zip(teacher, self.decode(teacher))), self.options.levels)]

    def loss(self, pairs: FeaturePairs) -> torch.Tensor:
        return sum(global_cosine_distance(t, s).mean() for t, s in pairs[0])
