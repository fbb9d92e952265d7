"""The methods: each module wires the shared parts into one teacher-student design and registers itself.

A new method is one module: a `DistillationModel` subclass with its `name`, `options_class` and training `recipe`,
decorated with `@register_method`, imported below.
"""

from __future__ import annotations

from typing import Any

from distillad.methods.aand import AAND, AANDOptions
from distillad.methods.base import METHODS, DistillationModel, MethodOptions, method_class, register_method
from distillad.methods.dskd import DSKD, DSKDOptions
from distillad.methods.patchcore import PatchCore, PatchCoreOptions
from distillad.methods.rd import RDOptions, ReverseDistillation
from distillad.methods.stfpm import STFPM, STFPMOptions


def build_model(method: str, backbone: str, options: dict[str, Any] | None = None, *, pretrained: bool = True,
                weights: str | None = None) -> DistillationModel:
    """Construct a method's model; `pretrained=False` skips loading teacher weights (a checkpoint supplies them)."""
    cls = method_class(method)
    return cls(backbone, cls.options_class.from_dict(options), pretrained=pretrained, weights=weights)


__all__ = ["AAND", "AANDOptions", "DSKD", "DSKDOptions", "METHODS", "DistillationModel", "MethodOptions", "PatchCore",
           "PatchCoreOptions", "RDOptions", "ReverseDistillation", "STFPM", "STFPMOptions", "build_model",
           "method_class", "register_method"]
