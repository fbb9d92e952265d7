"""The methods: each module wires the shared parts into one teacher-student design."""

from __future__ import annotations

from typing import Any

from distillad.methods.aand import AAND, AANDOptions
from distillad.methods.base import DistillationModel, MethodOptions
from distillad.methods.dskd import DSKD, DSKDOptions
from distillad.methods.rd import RDOptions, ReverseDistillation
from distillad.methods.stfpm import STFPM, STFPMOptions

METHODS: dict[str, type[DistillationModel]] = {
    "dskd": DSKD,
    "stfpm": STFPM,
    "rd": ReverseDistillation,
    "aand": AAND,
}


def method_class(name: str) -> type[DistillationModel]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def build_model(method: str, backbone: str, options: dict[str, Any] | None = None, *, pretrained: bool = True,
                weights: str | None = None) -> DistillationModel:
    """Construct a method's model; `pretrained=False` skips loading teacher weights (a checkpoint supplies them)."""
    cls = method_class(method)
    return cls(backbone, cls.options_class.from_dict(options), pretrained=pretrained, weights=weights)


__all__ = ["AAND", "AANDOptions", "DSKD", "DSKDOptions", "METHODS", "DistillationModel", "MethodOptions", "RDOptions",
           "ReverseDistillation", "STFPM", "STFPMOptions", "build_model", "method_class"]
