"""Anomaly maps, image scores and normal-only calibration, shared by every method and command."""

from distillad.scoring.calibration import Calibration, calibrate
from distillad.scoring.maps import AnomalyScorer, GaussianBlur, fuse, gaussian_kernel1d, fit_map_statistics, level_maps, make_scorer

__all__ = ["AnomalyScorer", "Calibration", "GaussianBlur", "calibrate", "fuse", "gaussian_kernel1d", "level_maps", "make_scorer",
           "fit_map_statistics"]
