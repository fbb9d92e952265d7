"""Normal-only calibration: a decision threshold and a score normalisation from defect-free validation images.

No defective image is ever needed. The threshold is mean + k * std of the validation image scores (k = 3 by
default: for roughly Gaussian normal scores about 0.1 % false alarms); the normalised score is
sigmoid((score - threshold) / std), so 0.5 is the threshold and the typical normal image sits near
sigmoid(-k). Because the image score is the maximum of the map, the same threshold on pixels gives a binary mask
that is non-empty exactly when the image is called defective.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Calibration:
    threshold: float
    center: float                 # mean of the validation scores
    scale: float                  # std of the validation scores (floored to stay positive)
    k: float                      # threshold = center + k * scale
    n_images: int
    val_min: float
    val_max: float
    val_false_alarm_rate: float   # share of validation images above the threshold (in-sample)

    def normalize(self, score: float) -> float:
        z = (float(score) - self.threshold) / self.scale
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))

    def is_defective(self, score: float) -> bool:
        return float(score) > self.threshold

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Calibration:
        return cls(**values)


def calibrate(val_scores: Sequence[float] | np.ndarray, k: float = 3.0) -> Calibration:
    """Fit the threshold on defect-free validation scores."""
    scores = np.asarray(val_scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError("calibration needs at least one defect-free validation image")
    if not np.all(np.isfinite(scores)):
        raise ValueError("calibration scores contain NaN or infinity: the model diverged")
    center = float(scores.mean())
    spread = float(scores.std(ddof=1)) if scores.size > 1 else 0.0
    scale = max(spread, 1e-3 * abs(center), 1e-12)
    threshold = center + k * scale
    return Calibration(
        threshold=threshold, center=center, scale=scale, k=float(k), n_images=int(scores.size),
        val_min=float(scores.min()), val_max=float(scores.max()),
        val_false_alarm_rate=float((scores > threshold).mean()),
    )
