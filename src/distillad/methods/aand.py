"""AAND (Tang et al. 2024, arXiv 2405.02068): anomaly amplification, then normality distillation (docs/methods.md#aand).

Stage 1 ("amplify") trains one Residual Anomaly Amplification (RAA) module per teacher level 1..3 on synthetic
anomalies while the teacher stays frozen. Each RAA adds `g * r` to the teacher's feature, where the gate g says
"this pixel is anomalous" and the residual r = tanh(MLP(x)) * x rescales its channels, so that anomalous features are
pushed away from normal ones. The next backbone layer still sees the un-amplified x, so each level's RAA can be
applied to the frozen teacher's ordinary output, independently of the other levels.

Stage 2 ("distill") freezes the amplified teacher and trains RD's bottleneck + decoder student to restore its
features on defect-free images, with the hard knowledge distillation (HKD) loss: per level, the mean of the k largest
per-pixel (1 - cos) of each image plus RD's global cosine. Following the official code, the bottleneck's input is the
amplified teacher pyramid. At inference the maps compare the amplified teacher with the student (AnomalyScorer).

`amplify=False` gives the paper's ablation: plain RD trained with the HKD loss (no RAA modules, one stage).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from distillad.errors import ConfigError
from distillad.methods.base import (
    DistillationModel,
    FeaturePairs,
    MethodOptions,
    TrainingStage,
    check_foreground,
    register_method,
    select_levels,
)
from distillad.methods.parts import global_cosine_distance, hard_pixel_distance, reverse_student

if TYPE_CHECKING:
    from distillad.data.anomalies import AnomalyGenerator

_EPS = 1e-6
AMPLIFY_EPOCHS, DISTILL_EPOCHS = 100, 120   # the recipe's stage lengths: stage 1 runs 100/120 of stage 2


@dataclass
class AANDOptions(MethodOptions):
    amplify: bool = True                 # False: RD + HKD loss, no amplification (the paper's ablation)
    hard_k: int = 10                     # HKD: mean of the k largest per-pixel distances per image and level
    prototypes: int = 100                # total; the first half "normal", the second half "anomalous"
    temperature: float = 0.2             # softmax temperature of the prototype matching
    focal_gamma: float = 2.0             # gate loss
    focal_alpha: float = 0.8             # weight of the anomalous class in the focal loss
    amplification_weight: float = 0.1
    amplification_margin: float = 0.3
    gate_threshold: float = 0.3          # a level's pixel is anomalous when > this share of it is synthetic anomaly
    normal_pixels: int = 5000            # pixels sampled per level for the amplification loss
    anomalous_pixels: int = 1000
    anomaly_probability: float = 0.8     # share of training images that get a synthetic anomaly
    foreground: str = "auto"             # where anomalies may go: auto | whole | mask (see data.anomalies)
    foreground_mask: str | None = None   # mask image file for foreground=mask (white = object)
    texture_dir: str | None = None       # folder of texture images; None: built-in procedural textures
    anomaly_seed: int | None = None      # None: the run's seed
    bottleneck_blocks: int = 2
    decoder_blocks: int = 2

    def validate(self) -> None:
        super().validate()   # types were checked from the declarations by from_dict
        for name in ("hard_k", "prototypes", "normal_pixels", "anomalous_pixels", "bottleneck_blocks",
                     "decoder_blocks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prototypes < 2 or self.prototypes % 2:
            raise ConfigError("prototypes must be an even number >= 2 (half normal, half anomalous), "
                              f"got {self.prototypes}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.focal_gamma < 0:
            raise ConfigError(f"focal_gamma must be >= 0, got {self.focal_gamma}")
        for name in ("focal_alpha", "anomaly_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.gate_threshold < 1.0:
            raise ConfigError(f"gate_threshold must be in [0, 1), got {self.gate_threshold}")
        if self.amplification_weight < 0 or self.amplification_margin < 0:
            raise ConfigError("amplification_weight and amplification_margin must be >= 0")
        check_foreground(self.foreground, self.foreground_mask)


# ------------------------------------------------------------------------------------------------------ RAA module


def sinusoidal_position_encoding(channels: int, height: int, width: int, *, device: torch.device | None = None,
                                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """2-D sine/cosine encoding (1,C,H,W): the first half of the channels encodes y, the second half x (DETR style,
    coordinates normalised to [0, 2*pi]), so a query can tell where a pixel is (many anomalies are position-bound)."""
    def axis(n_channels: int, length: int) -> torch.Tensor:
        if n_channels == 0:
            return torch.zeros(0, length, device=device, dtype=dtype)
        n_freq = (n_channels + 1) // 2
        pos = (torch.arange(length, device=device, dtype=torch.float32) + 0.5) / length * 2 * math.pi
        freq = 10000.0 ** (-torch.arange(n_freq, device=device, dtype=torch.float32) / max(n_freq, 1))
        angles = freq[:, None] * pos[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=0)[:n_channels].to(dtype)

    cy = channels // 2
    ey = axis(cy, height)[:, :, None].expand(-1, height, width)
    ex = axis(channels - cy, width)[:, None, :].expand(-1, height, width)
    return torch.cat([ey, ex], dim=0).unsqueeze(0)


def conv_mlp(channels: list[int]) -> nn.Sequential:
    """1x1-convolution MLP (a per-pixel MLP) with ReLU between layers, linear output."""
    layers: list[nn.Module] = []
    for index, (cin, cout) in enumerate(zip(channels[:-1], channels[1:])):
        layers.append(nn.Conv2d(cin, cout, 1))
        if index < len(channels) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResidualAnomalyAmplifier(nn.Module):
    """RAA for one teacher level: amplified = x + g * r.

    - gate g (B,1,h,w) in [0,1]: a query q = MLP3(x + position encoding) (hidden width min(2C, 1024)) is matched by
      cosine similarity / temperature against learnable prototypes, softmax over all of them; g is the probability
      mass on the anomalous half. Matching against prototypes rather than a plain classifier lets several normal and
      anomalous "modes" coexist;
    - residual r = tanh(MLP2(x)) * x: a bounded per-pixel, per-channel rescaling of the feature itself, so that an
      amplified feature stays in the teacher's feature space (and non-negative for ReLU teachers).
    """

    def __init__(self, channels: int, *, prototypes: int = 100, temperature: float = 0.2) -> None:
        super().__init__()
        hidden = min(2 * channels, 1024)
        self.channels = channels
        self.temperature = float(temperature)
        self.query = conv_mlp([channels, hidden, hidden, hidden])
        self.prototypes = nn.Parameter(torch.randn(prototypes, hidden) / math.sqrt(hidden))
        self.scale = conv_mlp([channels, hidden, channels])
        self._encodings: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}

    def position_encoding(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.shape[-2], x.shape[-1], x.device, x.dtype)
        encoding = self._encodings.get(key)
        if encoding is None:
            encoding = sinusoidal_position_encoding(self.channels, key[0], key[1], device=x.device, dtype=x.dtype)
            self._encodings[key] = encoding
        return encoding

    def gate_from_query(self, query: torch.Tensor) -> torch.Tensor:
        """(B,D,h,w) query -> (B,1,h,w) share of the softmax over prototypes that falls on the anomalous half."""
        q = F.normalize(query, dim=1, eps=_EPS)
        p = F.normalize(self.prototypes, dim=1, eps=_EPS)
        logits = torch.einsum("bdhw,pd->bphw", q, p) / self.temperature
        probabilities = logits.softmax(dim=1)
        return probabilities[:, self.prototypes.shape[0] // 2:].sum(dim=1, keepdim=True)

    def predict_gate(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate_from_query(self.query(x + self.position_encoding(x)))

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.scale(x)) * x

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """Amplified feature; `gate` replaces the predicted one (stage 1 uses the synthetic-anomaly mask)."""
        if gate is None:
            gate = self.predict_gate(x)
        return x + gate * self.residual(x)


# ---------------------------------------------------------------------------------------------------------- losses


def focal_loss(probability: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0,
               alpha: float = 0.8) -> torch.Tensor:
    """Binary focal loss, mean over pixels: -alpha (1-p)^gamma log p on anomalous pixels (target 1) and
    -(1-alpha) p^gamma log(1-p) on normal ones. The gate is trained with it because anomalous pixels are rare."""
    p = probability.clamp(_EPS, 1.0 - _EPS)
    positive = -alpha * (1.0 - p) ** gamma * torch.log(p)
    negative = -(1.0 - alpha) * p ** gamma * torch.log(1.0 - p)
    return torch.where(target > 0.5, positive, negative).mean()


def amplification_loss(normal: torch.Tensor, anomalous: torch.Tensor, amplified: torch.Tensor, *,
                       margin: float = 0.3) -> torch.Tensor:
    """Hinge on every (normal, anomalous) pair of sampled pixel features: (N,C), (M,C), (M,C) -> scalar.

    s_van = cos(normal, anomalous), s_adv = cos(normal, amplified anomalous); mean ReLU(s_adv - (s_van - margin)):
    amplification must make each anomalous feature at least `margin` less similar to normal features than before.
    """
    n = F.normalize(normal, dim=1, eps=_EPS)
    s_van = n @ F.normalize(anomalous, dim=1, eps=_EPS).T
    s_adv = n @ F.normalize(amplified, dim=1, eps=_EPS).T
    return F.relu(s_adv - (s_van - margin)).mean()


def sample_pixels(features: torch.Tensor, where: torch.Tensor, limit: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Features (B,C,h,w) at the pixels where `where` (B,1,h,w) is true, at most `limit` of them drawn at random
    without replacement: (n,C)."""
    flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    index = where.reshape(-1).nonzero().squeeze(1)
    if index.numel() > limit:
        chosen = torch.randperm(index.numel(), generator=generator)[:limit].to(index.device)
        index = index[chosen]
    return flat[index]


# ----------------------------------------------------------------------------------------------------------- model


@register_method
class AAND(DistillationModel):
    name = "aand"
    recipe = {"batch_size": 16, "optimizer": {"name": "adam", "lr": 0.005, "betas": (0.5, 0.999),
                                              "milestones": (0.8, 0.9), "gamma": 0.2}}
    options_class = AANDOptions

    def __init__(self, backbone: str, options: AANDOptions, *, pretrained: bool = True,
                 weights: str | None = None) -> None:
        super().__init__(backbone, options, pretrained=pretrained, weights=weights)
        channels = self.teacher.channels
        self.amplifiers: nn.ModuleList | None = None
        if options.amplify:
            self.amplifiers = nn.ModuleList(
                ResidualAnomalyAmplifier(c, prototypes=options.prototypes, temperature=options.temperature)
                for c in channels)
        self.bottleneck, self.decoder = reverse_student(
            channels, channels, bottleneck_blocks=options.bottleneck_blocks, decoder_blocks=options.decoder_blocks,
            relu_output=self.teacher_relu_features)

    # -- features ---------------------------------------------------------------------------------------------
    def vanilla_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen teacher's own pyramid (levels 1..3), without amplification."""
        with torch.no_grad():
            return self.teacher(self.normalize(images))

    def amplify(self, features: list[torch.Tensor], gates: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Apply each level's RAA (predicted gates unless given); identity when amplify=False."""
        if self.amplifiers is None:
            return list(features)
        gates = gates if gates is not None else [None] * len(features)
        return [raa(x, gate) for raa, x, gate in zip(self.amplifiers, features, gates)]

    def teacher_features(self, images: torch.Tensor, cached: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The amplified teacher (predicted gates), frozen: no gradients, so the engine may cache it in stage 2."""
        if cached is not None:
            return cached
        with torch.no_grad():
            return self.amplify(self.vanilla_features(images))

    def feature_pairs(self, images: torch.Tensor, teacher: list[torch.Tensor] | None = None) -> FeaturePairs:
        teacher = self.teacher_features(images, teacher)
        student = self.decoder(self.bottleneck(teacher))
        return [select_levels(list(zip(teacher, student)), self.options.levels)]

    def loss(self, pairs: FeaturePairs) -> torch.Tensor:
        """HKD: per matched level, mean of the k hardest pixels per image plus RD's global cosine; summed."""
        total = torch.zeros((), device=pairs[0][0][0].device)
        for t, s in pairs[0]:
            total = total + hard_pixel_distance(t, s, self.options.hard_k).mean() + global_cosine_distance(t, s).mean()
        return total

    # -- stage 1 ----------------------------------------------------------------------------------------------
    def amplification_loss(self, vanilla: list[torch.Tensor], masks: torch.Tensor, foreground: torch.Tensor,
                           generator: torch.Generator | None = None) -> torch.Tensor:
        """Stage-1 loss from the vanilla teacher pyramid of anomalous images and their (B,1,H,W) anomaly and
        foreground masks, summed over the three RAA modules: focal(gate, mask) + weight * hinge.

        "normal_vanilla" pixels are the vanilla features of the same batch at foreground pixels that no synthetic
        anomaly touches at all at that level (area share exactly 0; clean images contribute all their foreground):
        they are genuine normal appearance of this object, where gate and amplified feature equal the vanilla ones.
        Pixels partly covered (share in (0, threshold]) are in neither set. Background pixels are left out, since
        pushing anomalies away from, say, a black backdrop teaches nothing about the object.
        """
        if self.amplifiers is None:
            raise RuntimeError("amplify=False: this AAND model has no amplification stage")
        options = self.options
        total = torch.zeros((), device=masks.device)
        for raa, x in zip(self.amplifiers, vanilla):
            size = (x.shape[-2], x.shape[-1])
            share = F.adaptive_avg_pool2d(masks.float(), size)
            gate = (share > options.gate_threshold).to(x.dtype)
            total = total + focal_loss(raa.predict_gate(x), gate, gamma=options.focal_gamma, alpha=options.focal_alpha)
            normal_where = (share == 0) & (F.adaptive_avg_pool2d(foreground.float(), size) > 0.5)
            anomalous_where = gate > 0
            if options.amplification_weight == 0 or not bool(anomalous_where.any()) or not bool(normal_where.any()):
                continue
            # The residual is a per-pixel MLP, so it is computed on the sampled anomalous pixels only (gate 1 there);
            # normal pixels have gate 0, where the amplified feature is the vanilla one.
            anomalous = sample_pixels(x, anomalous_where, options.anomalous_pixels, generator)
            amplified = anomalous + raa.residual(anomalous[:, :, None, None])[:, :, 0, 0]
            normal = sample_pixels(x, normal_where, options.normal_pixels, generator)
            total = total + options.amplification_weight * amplification_loss(
                normal, anomalous, amplified, margin=options.amplification_margin)
        return total

    def anomaly_generator(self, seed: int) -> AnomalyGenerator:
        """The synthetic-anomaly source of stage 1, configured from the options."""
        from distillad.data.anomalies import AnomalyGenerator

        return AnomalyGenerator(None, texture_dir=self.options.texture_dir,
                                probability=self.options.anomaly_probability, foreground=self.options.foreground,
                                foreground_mask=self.options.foreground_mask, seed=seed)

    def amplify_stage(self) -> TrainingStage:
        """Stage 1: synthetic anomalies on every clean batch, teacher features of the anomalous images, RAA only.

        The generator is built now (a bad texture folder fails before any training) and seeded at the stage's
        first step from `anomaly_seed`, or else the run's seed (the engine seeds torch before each stage).
        """
        if self.amplifiers is None:
            raise RuntimeError("amplify=False: this AAND model has no amplification stage")
        from distillad.data.anomalies import StageAnomalies

        amplifiers = self.amplifiers
        source = StageAnomalies(self.anomaly_generator(0), self.options.anomaly_seed)
        pixels = torch.Generator()

        def loss(images: torch.Tensor, teacher: list[torch.Tensor] | None) -> torch.Tensor:
            if not source.seeded:
                pixels.manual_seed(source.ensure_seeded())
            batch = source(images)
            vanilla = self.vanilla_features(batch.images)
            return self.amplification_loss(vanilla, batch.masks, batch.foreground, pixels)

        def random_state() -> dict[str, Any]:
            return {**source.state(), "pixels": pixels.get_state()}

        def load_random_state(saved: dict[str, Any]) -> None:
            source.load_state(saved)
            pixels.set_state(saved["pixels"])

        return TrainingStage("amplify", amplifiers.parameters, loss, cache_teacher=False,
                             length_ratio=AMPLIFY_EPOCHS / DISTILL_EPOCHS, state=random_state,
                             load_state=load_random_state, skips_parameters=True)

    # -- stage 2 ----------------------------------------------------------------------------------------------
    def student_parameters(self) -> Iterator[nn.Parameter]:
        return (p for module in (self.bottleneck, self.decoder) for p in module.parameters())

    def _freeze_amplifiers(self, model: nn.Module) -> None:
        if self.amplifiers is not None:
            self.amplifiers.eval()

    def training_stages(self) -> list[TrainingStage]:
        distill = TrainingStage("distill", self.student_parameters, self.training_loss, cache_teacher=True,
                                on_train=self._freeze_amplifiers)
        if self.amplifiers is None:
            return [distill]
        return [self.amplify_stage(), distill]
