"""ResNet-18/34/50 and Wide-ResNet-50-2 feature extractors with torchvision's exact state-dict layout.

torchvision does not import with the CPU torch build used here, so the architecture is re-implemented; keeping the
key names (``conv1``, ``layer1.0.conv1``, ``layer2.0.downsample.0`` ...) lets the released checkpoints and any
torchvision-layout user checkpoint load without renaming. Bottlenecks are v1.5 (stride on the 3x3 conv).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .weights import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneSpec,
    FeatureExtractor,
    init_weights,
    load_matching_state_dict,
    load_state_dict_file,
    resolve_torchvision_weights,
)

__all__ = ["RESNET_NAMES", "RESNET_SPECS", "ResNetFeatures", "BasicBlock", "Bottleneck", "create_resnet"]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, base_width: int = 64) -> None:
        super().__init__()
        if base_width != 64:
            raise ValueError("BasicBlock only supports base_width=64")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(_conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride: v1.5), 1x1 expand by 4, with shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, base_width: int = 64) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0))
        out = planes * self.expansion
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, out)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(_conv1x1(inplanes, out, stride), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(y + identity)


@dataclass(frozen=True)
class _ResNetArch:
    block: type[nn.Module]
    layers: tuple[int, int, int, int]
    base_width: int = 64


_ARCHS: dict[str, _ResNetArch] = {
    "resnet18": _ResNetArch(BasicBlock, (2, 2, 2, 2)),
    "resnet34": _ResNetArch(BasicBlock, (3, 4, 6, 3)),
    "resnet50": _ResNetArch(Bottleneck, (3, 4, 6, 3)),
    "wide_resnet50_2": _ResNetArch(Bottleneck, (3, 4, 6, 3), base_width=128),
}

RESNET_NAMES: tuple[str, ...] = tuple(_ARCHS)


def _spec(name: str) -> BackboneSpec:
    exp = _ARCHS[name].block.expansion  # type: ignore[attr-defined]
    ch = tuple(64 * 2**i * exp for i in range(4))
    return BackboneSpec(name, ch, IMAGENET_MEAN, IMAGENET_STD)  # type: ignore[arg-type]


RESNET_SPECS: dict[str, BackboneSpec] = {n: _spec(n) for n in RESNET_NAMES}


class ResNetFeatures(FeatureExtractor):
    """ResNet stem + layer1..layerK where K is the deepest requested level; no avgpool / fc."""

    def __init__(self, name: str, levels: Sequence[int] = (1, 2, 3)) -> None:
        if name not in _ARCHS:
            raise ValueError(f"unknown ResNet {name!r}; valid: {', '.join(RESNET_NAMES)}")
        super().__init__(RESNET_SPECS[name], levels)
        arch = _ARCHS[name]
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        depth = max(self.levels)
        for i in range(depth):
            planes = 64 * 2**i
            stride = 1 if i == 0 else 2
            blocks: list[nn.Module] = []
            for j in range(arch.layers[i]):
                blocks.append(arch.block(inplanes, planes, stride if j == 0 else 1, arch.base_width))
                inplanes = planes * arch.block.expansion  # type: ignore[attr-defined]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self._depth = depth
        self._tap = [k in self.levels for k in range(1, depth + 1)]
        init_weights(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        feats: list[torch.Tensor] = []
        for i in range(self._depth):
            x = getattr(self, f"layer{i + 1}")(x)
            if self._tap[i]:
                feats.append(x)
        return feats


def create_resnet(
    name: str,
    levels: Sequence[int] = (1, 2, 3),
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
) -> ResNetFeatures:
    """Build a truncated ResNet; with ``pretrained`` (or an explicit ``weights`` file) load torchvision weights."""
    model = ResNetFeatures(name, levels)
    if pretrained or weights is not None:
        path = resolve_torchvision_weights(name, weights)
        load_matching_state_dict(model, load_state_dict_file(path), source=os.fspath(path))
    return model
