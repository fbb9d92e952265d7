"""Normal-only calibration: a decision threshold and a score normalisation from defect-free validation images.

No defective image is ever needed. Two rules set the threshold from the validation image scores:
- `gumbel` (default): image scores are maxima of maps, so their upper tail follows an extreme-value law; a Gumbel
  law is fitted (maximum likelihood) and the threshold is where it leaves `false_alarm_rate` (3 %) above it;
- `mean_std`: mean + k * std (k = 3: about 0.1 % false alarms for Gaussian scores; far fewer detections).
benchmarks/RESULTS.md section 4 compares them on good and defective test images. The normalised score is
sigmoid((score - threshold) / std), so 0.5 is the threshold. Because the image score is the maximum of the map,
the same threshold on pixels gives a binary mask that is non-empty exactly when the image is called defective.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from distillad.errors import ConfigError


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
    rule: str = "mean_std"        # how the threshold was set (runs calibrated before the rule existed: mean_std)
    false_alarm_rate: float | None = None   # the gumbel rule's target share of normal images above the threshold

    def describe(self, source: str = "validation") -> str:
        """How the threshold was set, in words (logs and reports); `source`: whose scores were used."""
        if self.rule == "gumbel":
            return (f"Gumbel law fitted to {self.n_images} {source} scores, {self.false_alarm_rate * 100:g} % "
                    "expected false alarms")
        return f"mean + {self.k:g} std of {self.n_images} {source} scores"

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


THRESHOLD_RULES = ("gumbel", "mean_std")
# The Gumbel fit needs a tail to fit: below this many validation scores mean + k * std is used instead.
GUMBEL_MIN_SCORES = 5


@dataclass(frozen=True)
class ThresholdRule:
    """How a run turns its validation scores into a threshold (TrainConfig.threshold_rule and its settings)."""

    kind: str = "gumbel"
    k: float = 3.0                    # mean_std: threshold = mean + k * std
    false_alarm_rate: float = 0.03    # gumbel: expected share of defect-free images above the threshold

    def fit(self, val_scores: Sequence[float] | np.ndarray) -> Calibration:
        return calibrate(val_scores, k=self.k, rule=self.kind, false_alarm_rate=self.false_alarm_rate)


def check_threshold_settings(rule: str, false_alarm_rate: float) -> None:
    """The one check of the threshold settings, for the run config and for `calibrate`."""
    if rule not in THRESHOLD_RULES:
        raise ConfigError(f"threshold rule (threshold_rule) must be one of {', '.join(THRESHOLD_RULES)}; got {rule!r}")
    if not 0.0 < false_alarm_rate < 0.5:
        raise ConfigError(f"false_alarm_rate must be in (0, 0.5), got {false_alarm_rate}")


def gumbel_threshold(scores: np.ndarray, false_alarm_rate: float) -> float | None:
    """The score a maximum-likelihood Gumbel law fitted to `scores` exceeds with probability `false_alarm_rate`;
    None when the fit is degenerate (identical scores, a failed optimisation)."""
    from scipy import stats      # lazily: the torch-free service imports this module for Calibration only

    if np.ptp(scores) <= 0:
        return None
    try:
        loc, scale = stats.gumbel_r.fit(scores)
    except (RuntimeError, ValueError, FloatingPointError):
        return None
    threshold = float(stats.gumbel_r.isf(false_alarm_rate, loc, scale))
    return threshold if np.isfinite(threshold) and scale > 0 else None


def calibrate(val_scores: Sequence[float] | np.ndarray, k: float = 3.0, *, rule: str = "mean_std",
              false_alarm_rate: float = 0.03) -> Calibration:
    """Fit the threshold on defect-free validation scores with `rule` (see the module docstring)."""
    check_threshold_settings(rule, false_alarm_rate)
    scores = np.asarray(val_scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError("calibration needs at least one defect-free validation image")
    if not np.all(np.isfinite(scores)):
        raise ValueError("calibration scores contain NaN or infinity: the model diverged")
    center = float(scores.mean())
    spread = float(scores.std(ddof=1)) if scores.size > 1 else 0.0
    scale = max(spread, 1e-3 * abs(center), 1e-12)
    fitted = gumbel_threshold(scores, false_alarm_rate) if rule == "gumbel" and scores.size >= GUMBEL_MIN_SCORES \
        else None
    if fitted is not None:
        threshold, k = fitted, (fitted - center) / scale     # k kept so that threshold = center + k * scale
    else:
        rule, threshold = "mean_std", center + k * scale
    return Calibration(
        threshold=threshold, center=center, scale=scale, k=float(k), n_images=int(scores.size),
        val_min=float(scores.min()), val_max=float(scores.max()),
        val_false_alarm_rate=float((scores > threshold).mean()),
        rule=rule, false_alarm_rate=float(false_alarm_rate) if rule == "gumbel" else None,
    )
