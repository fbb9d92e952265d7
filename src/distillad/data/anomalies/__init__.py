"""Synthetic anomalies for AAND's amplification stage (DRAEM style), and a grid to look at them.

One module per concern: ``noise`` (Perlin noise, the mask shapes), ``foreground`` (where anomalies may go),
``textures`` (what fills them) and ``generator`` (the recipe that puts them together, and the PNG grid).
"""

from .foreground import estimate_foreground
from .generator import AnomalyGenerator, StageAnomalies, SyntheticAnomalies, save_anomaly_grid
from .noise import perlin_noise
from .textures import TextureFolder

__all__ = [
    "AnomalyGenerator",
    "StageAnomalies",
    "SyntheticAnomalies",
    "TextureFolder",
    "estimate_foreground",
    "perlin_noise",
    "save_anomaly_grid",
]
