"""Anomaly maps, image scores and normal-only calibration, shared by every method and command.

The names load lazily, so `distillad.scoring.calibration` (numpy only) serves a torch-free process (`serve`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from distillad.scoring.calibration import Calibration, calibrate

_MAPS = ("AnomalyScorer", "GaussianBlur", "fuse", "gaussian_kernel1d", "fit_map_statistics", "level_maps",
         "make_scorer")

if TYPE_CHECKING:
    from distillad.scoring.maps import (AnomalyScorer, GaussianBlur, fit_map_statistics, fuse, gaussian_kernel1d,
                                        level_maps, make_scorer)


def __getattr__(name: str) -> Any:
    if name in _MAPS:
        value = getattr(importlib.import_module("distillad.scoring.maps"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AnomalyScorer", "Calibration", "GaussianBlur", "calibrate", "fuse", "gaussian_kernel1d", "level_maps",
           "make_scorer", "fit_map_statistics"]
