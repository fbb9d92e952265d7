"""The contract every distillation method fulfils, and the frozen-teacher plumbing they share."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from distillad.backbones import FeatureExtractor, backbone_spec, create_backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Per student, per level: (teacher feature, student feature).
FeaturePairs = list[list[tuple[torch.Tensor, torch.Tensor]]]

# Options that only shape the anomaly map from a trained model: they may change at test time without retraining.
MAP_OPTIONS = ("level_fusion", "student_fusion", "sigma")


@dataclass
class MethodOptions:
    """Options common to every method; subclasses add their own switches. All values are JSON/YAML scalars."""

    levels: tuple[int, ...] = (1, 2, 3)          # teacher taps used for matching and maps (1 = stride 4)
    input_norm: str = "native"                    # "native": the teacher's own training normalisation; "imagenet"
    level_fusion: str = "sum"                     # how per-level maps combine: sum | product | mean
    student_fusion: str = "mean"                  # how students' maps combine: mean | max | product
    sigma: float = 4.0                            # Gaussian blur of the final map, in pixels of the input size

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> MethodOptions:
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown option(s) for this method: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if values.get("levels") is not None:
            values["levels"] = tuple(int(v) for v in values["levels"])
        options = cls(**values)
        options.validate()
        return options

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def validate(self) -> None:
        if not self.levels or any(level not in (1, 2, 3) for level in self.levels):
            raise ValueError(f"levels must be a non-empty subset of 1, 2, 3; got {self.levels}")
        check_choice("input_norm", self.input_norm, ("native", "imagenet"))
        check_choice("level_fusion", self.level_fusion, ("sum", "product", "mean"))
        check_choice("student_fusion", self.student_fusion, ("mean", "max", "product"))
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass
class TrainingStage:
    """One optimisation stage of a method. Single-stage methods have one ("distill"); AAND has two.

    `loss(images, teacher)` gets a batch of clean training images in [0,1] and, when `cache_teacher` is set, the
    model's `teacher_features` of those images computed once at the start of the stage (else None).
    `optimizer` of None means the run config's; the stage trains for the run's length times `length_ratio`
    (AAND's recipe: 100 amplification epochs for 120 distillation epochs); `on_train` runs after model.train()
    each epoch (to keep frozen parts in eval mode).
    """

    name: str
    parameters: Callable[[], Iterable[nn.Parameter]]
    loss: Callable[[torch.Tensor, list[torch.Tensor] | None], torch.Tensor]
    cache_teacher: bool = True
    optimizer: Any = None
    length_ratio: float = 1.0
    on_train: Callable[[nn.Module], None] = lambda model: None


class DistillationModel(nn.Module):
    """A frozen teacher plus trainable students.

    Subclasses implement `feature_pairs` (what is compared) and may override `loss`; the anomaly map and score
    are computed from the pairs by `distillad.scoring`, identically for every method.
    Inputs are images in [0, 1]; the model normalises them itself so that exported models need no preprocessing
    beyond resizing.
    """

    name: ClassVar[str]
    options_class: ClassVar[type[MethodOptions]] = MethodOptions

    def __init__(self, backbone: str, options: MethodOptions, *, pretrained: bool = True,
                 weights: str | None = None) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.options = options
        self.spec = backbone_spec(backbone)
        self.teacher: FeatureExtractor = create_backbone(
            backbone, levels=(1, 2, 3), pretrained=pretrained, weights=weights).freeze()
        if options.input_norm == "native":
            mean, std = self.spec.native_mean, self.spec.native_std
        else:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        self.register_buffer("input_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    # -- what subclasses provide ---------------------------------------------------------------------------
    def feature_pairs(self, images: torch.Tensor, teacher: list[torch.Tensor] | None = None) -> FeaturePairs:
        """(teacher, student) features per student and matched level. `teacher` may hold the teacher's features
        of these images, computed earlier (the teacher is frozen, so the training loop can cache them)."""
        raise NotImplementedError

    def loss(self, pairs: FeaturePairs) -> torch.Tensor:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------------------
    @property
    def teacher_relu_features(self) -> bool:
        """ResNet taps are ReLU outputs (non-negative); EfficientNet's are linear projections."""
        return not self.backbone_name.startswith("efficientnet")

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.input_mean) / self.input_std

    def teacher_features(self, images: torch.Tensor, cached: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        if cached is not None:
            return cached
        with torch.no_grad():
            return self.teacher(self.normalize(images))

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for name, p in self.named_parameters() if not name.startswith("teacher.") and p.requires_grad)

    def training_loss(self, images: torch.Tensor, teacher: list[torch.Tensor] | None = None) -> torch.Tensor:
        return self.loss(self.feature_pairs(images, teacher))

    def training_stages(self) -> list[TrainingStage]:
        """Default: one stage that trains every non-teacher parameter on the distillation loss."""
        return [TrainingStage("distill", self.trainable_parameters, self.training_loss)]

    def train(self, mode: bool = True) -> DistillationModel:
        super().train(mode)
        self.teacher.eval()
        return self


def select_levels(pairs: list[tuple[torch.Tensor, torch.Tensor]], levels: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keep the (teacher, student) pairs of the matched levels; pairs are indexed by level 1..3."""
    return [pairs[level - 1] for level in levels]
