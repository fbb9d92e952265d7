"""Data loading: image/mask readers, dataset discovery (MVTec or plain folders), a cached Dataset, a synthetic demo
set, and synthetic anomalies."""

from .anomalies import AnomalyGenerator, SyntheticAnomalies, estimate_foreground, perlin_noise, save_anomaly_grid
from .dataset import ImageDataset, preload
from .discovery import CategorySplit, Sample, discover, discover_folder, discover_mvtec, load_category
from .images import IMAGE_EXTENSIONS, DataError, is_image_file, load_image, load_mask, read_size
from .listing import list_images
from .synthetic import DEFECT_TYPES, make_synthetic_dataset

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
