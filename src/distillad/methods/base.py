"""The contract every distillation method fulfils, and the frozen-teacher plumbing they share."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from distillad.backbones import FeatureExtractor, backbone_spec, create_backbone
from distillad.errors import ConfigError
from distillad.methods.parts import cosine_distance_map
from distillad.typed import typed_values

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Per student, per level: (teacher feature, student feature).
FeaturePairs = list[list[tuple[torch.Tensor, torch.Tensor]]]

# Options that only shape the anomaly map from a trained model: they may change at test time without retraining.
MAP_OPTIONS = ("level_fusion", "student_fusion", "sigma", "map_norm", "position_norm", "score_topk")


@dataclass
class MethodOptions:
    """Options common to every method; subclasses add their own switches. All values are JSON/YAML scalars."""

    # teacher taps used for matching and maps (1 = stride 4, 2 = 8, 3 = 16, 4 = 32 where the method allows it)
    levels: tuple[int, ...] = (1, 2, 3)
    input_norm: str = "native"                    # "native": the teacher's own training normalisation; "imagenet"
    level_fusion: str = "sum"                     # how per-level maps combine: sum | product | mean
    student_fusion: str = "mean"                  # how students' maps combine: mean | max | product
    sigma: float = 4.0                            # Gaussian blur of the final map, in pixels of the input size
    # Each student's and level's map rescaled by quantiles of its values on defect-free validation images before
    # fusion: none | quantile ((m - q90) / (q99.5 - q90), so 0 is typical and 1 rare for normal images)
    map_norm: str = "none"
    # none | max | score: subtract, position by position, the largest value the (blurred) map takes there on the
    # validation images, so places that are busy on every normal image (edges, borders) stop deciding the score;
    # max: from the map itself; score: from the image score (and masks) only, the map keeps its own values
    position_norm: str = "none"
    score_topk: float = 0.0                       # image score: 0 = max of the map; f > 0 = mean of its top f share

    # The deepest teacher tap this method's students can learn; students always reproduce the pyramid from level 1
    # to the deepest of max(levels) and 3 (pyramid_levels), whichever levels are matched.
    deepest_level: ClassVar[int] = 3
    # Options whose default changed, with the value runs saved before they existed were trained with: such a run's
    # config lacks the key, so loading fills in the old value; new runs save the key explicitly (TrainConfig).
    legacy_defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, source: str = "method options") -> MethodOptions:
        """Options from a mapping, every value checked against its declared type, then `validate()`d."""
        options = cls(**typed_values(cls, dict(values or {}), source, what="option"))
        options.validate()
        return options

    def pyramid_levels(self) -> tuple[int, ...]:
        """The teacher taps the model computes: 1 to the deepest matched level, at least 1-3."""
        return tuple(range(1, max(3, *self.levels) + 1))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def validate(self) -> None:
        allowed = tuple(range(1, self.deepest_level + 1))
        if not self.levels or any(level not in allowed for level in self.levels):
            raise ConfigError(f"levels must be a non-empty subset of {', '.join(map(str, allowed))}; "
                              f"got {list(self.levels)}")
        check_choice("input_norm", self.input_norm, ("native", "imagenet"))
        check_choice("level_fusion", self.level_fusion, ("sum", "product", "mean"))
        check_choice("student_fusion", self.student_fusion, ("mean", "max", "product"))
        if self.sigma < 0:
            raise ConfigError(f"sigma must be >= 0, got {self.sigma}")
        check_choice("map_norm", self.map_norm, ("none", "quantile"))
        check_choice("position_norm", self.position_norm, ("none", "max", "score"))
        if not 0.0 <= self.score_topk < 1.0:
            raise ConfigError(f"score_topk must be in [0, 1), got {self.score_topk}")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def check_foreground(foreground: str, foreground_mask: str | None) -> None:
    """Where synthetic anomalies may go (the `foreground` and `foreground_mask` options of AAND and DSKD)."""
    from distillad.data.anomalies.generator import FOREGROUND_MODES

    check_choice("foreground", foreground, FOREGROUND_MODES)
    if (foreground == "mask") != (foreground_mask is not None):
        raise ConfigError("foreground=mask needs foreground_mask=FILE, and foreground_mask needs foreground=mask")


@dataclass
class FitContext:
    """What a non-gradient stage's `fit` receives: one pass over the clean training images.

    `batches` yields (B,3,H,W) images in [0,1], on the run's device and memory format, `n_images` in all, in dataset
    order (the engine's progress bar advances with it). `seed` is the run's seed: seed anything random with it.
    `progress` says whether the run shows progress bars (a long fit may show its own); `log` is the run's log."""

    batches: Iterable[torch.Tensor]
    n_images: int
    seed: int
    device: torch.device
    progress: bool = False
    log: Callable[[str], None] = lambda message: None


@dataclass
class TrainingStage:
    """One training stage of a method. Single-stage methods have one ("distill"); AAND has two.

    A gradient stage has a `loss`: `loss(images, teacher)` gets a batch of clean training images in [0,1] and, when
    `cache_teacher` is set, the model's `teacher_features` of those images computed once at the start of the stage
    (else None); `parameters` are what it optimises. `optimizer` of None means the run config's; the stage trains
    for the run's length times `length_ratio` (AAND's recipe: 100 amplification epochs for 120 distillation
    epochs); `on_train` runs after model.train() each epoch (to keep frozen parts in eval mode).

    A fit stage has a `fit` instead (no loss, no optimizer, no gradients: a memory bank, statistics):
    `fit(context)` gets one pass over the training images (`FitContext`), with the model in eval mode under
    torch.no_grad(), and returns numbers for the history; its "train_loss" is what the run reports as the final
    training loss (NaN when absent).
    """

    name: str
    parameters: Callable[[], Iterable[nn.Parameter]] | None = None
    loss: Callable[[torch.Tensor, list[torch.Tensor] | None], torch.Tensor] | None = None
    cache_teacher: bool = True
    optimizer: Any = None
    length_ratio: float = 1.0
    on_train: Callable[[nn.Module], None] = lambda model: None
    fit: Callable[[FitContext], dict[str, float]] | None = None
    # Random state the stage keeps outside torch's and numpy's global generators (AAND's anomaly source): saved in
    # every epoch checkpoint and restored on resume, so a resumed run draws what the uninterrupted one would have.
    # Values are tensors, numbers, strings and lists/dicts of them (checkpoints load with weights_only=True).
    state: Callable[[], dict[str, Any]] | None = None
    load_state: Callable[[dict[str, Any]], None] | None = None
    # The loss may leave some of `parameters` without a gradient on a step (AAND's amplifiers skip a level whose
    # batch has no anomalous pixel): data-parallel training then looks for them every step (DDP's
    # find_unused_parameters), which costs a traversal of the autograd graph, so it is off for other stages.
    skips_parameters: bool = False

    def __post_init__(self) -> None:
        if (self.loss is None) == (self.fit is None):
            raise ValueError(f"training stage {self.name!r} needs exactly one of `loss` (a gradient stage) "
                             "and `fit` (a one-pass, non-gradient stage)")
        if self.loss is not None and self.parameters is None:
            raise ValueError(f"training stage {self.name!r} has a loss but no parameters to optimise")
        if (self.state is None) != (self.load_state is None):
            raise ValueError(f"training stage {self.name!r} needs both `state` and `load_state`, or neither")

    @property
    def is_fit(self) -> bool:
        return self.fit is not None


class DistillationModel(nn.Module):
    """A frozen teacher plus trainable students.

    Subclasses implement `feature_pairs` (what is compared) and may override `loss`; the anomaly map and score
    are computed from the pairs by `distillad.scoring`, identically for every method.
    Inputs are images in [0, 1]; the model normalises them itself so that exported models need no preprocessing
    beyond resizing.
    """

    name: ClassVar[str]
    options_class: ClassVar[type[MethodOptions]] = MethodOptions
    # Training settings of the method's recipe (TrainConfig fields; "optimizer" a mapping of OptimizerConfig
    # fields), applied before a config file and command-line flags.
    recipe: ClassVar[dict[str, Any]] = {}

    def __init__(self, backbone: str, options: MethodOptions, *, pretrained: bool = True,
                 weights: str | None = None) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.options = options
        self.spec = backbone_spec(backbone)
        self.teacher: FeatureExtractor = create_backbone(
            backbone, levels=options.pyramid_levels(), pretrained=pretrained, weights=weights).freeze()
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

    def discrepancy_maps(self, images: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per student, per matched level: the per-pixel anomaly map (B,h,w) at the level's own resolution.

        The scorer upsamples, normalises, fuses and blurs these. Teacher-student methods compare features by
        1 - cos; a method that scores otherwise (a memory bank's nearest-neighbour distance) overrides this."""
        return [[cosine_distance_map(t, s) for t, s in student] for student in self.feature_pairs(images)]

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
    """Keep the (teacher, student) pairs of the matched levels; pairs are indexed by level 1, 2, ..."""
    return [pairs[level - 1] for level in levels]


METHODS: dict[str, type[DistillationModel]] = {}


def register_method(cls: type[DistillationModel]) -> type[DistillationModel]:
    """Class decorator: make a method available by its `name` to the config, the CLI and run loading."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise RuntimeError(f"two methods are registered as {cls.name!r}")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[DistillationModel]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None
