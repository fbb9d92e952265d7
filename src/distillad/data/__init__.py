"""Data loading: image/mask readers, dataset discovery (MVTec or plain folders), a cached Dataset, a synthetic demo
set, and synthetic anomalies.

The names load lazily, so the torch-free readers (`distillad.data.images`, `distillad.data.listing`) can be used
without importing torch: `distillad serve` decodes uploads with them in a process that never loads torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .images import IMAGE_EXTENSIONS, DataError, is_image_file, load_image, load_mask, read_size
from .listing import list_images

_LAZY = {
    "AnomalyGenerator": ".anomalies", "SyntheticAnomalies": ".anomalies", "estimate_foreground": ".anomalies",
    "perlin_noise": ".anomalies", "save_anomaly_grid": ".anomalies",
    "ImageDataset": ".dataset", "preload": ".dataset",
    "CategorySplit": ".discovery", "Sample": ".discovery", "discover": ".discovery", "discover_folder": ".discovery",
    "discover_mvtec": ".discovery", "load_category": ".discovery",
    "DEFECT_TYPES": ".synthetic", "make_synthetic_dataset": ".synthetic",
}

if TYPE_CHECKING:
    from .anomalies import AnomalyGenerator, SyntheticAnomalies, estimate_foreground, perlin_noise, save_anomaly_grid
    from .dataset import ImageDataset, preload
    from .discovery import CategorySplit, Sample, discover, discover_folder, discover_mvtec, load_category
    from .synthetic import DEFECT_TYPES, make_synthetic_dataset


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "DataError",
    "IMAGE_EXTENSIONS",
    "is_image_file",
    "load_image",
    "load_mask",
    "read_size",
    "Sample",
    "CategorySplit",
    "discover_mvtec",
    "discover_folder",
    "discover",
    "load_category",
    "list_images",
    "ImageDataset",
    "preload",
    "make_synthetic_dataset",
    "DEFECT_TYPES",
    "AnomalyGenerator",
    "SyntheticAnomalies",
    "estimate_foreground",
    "perlin_noise",
    "save_anomaly_grid",
]
