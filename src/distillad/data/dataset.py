"""Serving discovered samples as tensors: the torch Dataset every method trains and evaluates on, and its cache.

Kept apart from discovery so that finding files on disk needs no torch Dataset machinery, and so that the loading
and caching rules (resize once, keep uint8, share one cache between DataLoader workers) live in one place.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .discovery import Sample
from .images import (DataError, array_to_tensor, check_resize_mode, content_box, decode_image, read_mask_array,
                     read_size, resize_image_array)

__all__ = ["ImageDataset", "preload"]


@dataclass
class _Entry:
    image: np.ndarray  # (H, W, 3) uint8, or float32 in [0, 1] for >8-bit sources
    mask: np.ndarray | None  # (H, W) bool, None when there is no mask file
    box: tuple[int, int, int, int]  # (top, left, h, w): where the image lies in the model input (content_box)


class ImageDataset(Dataset):
    """Samples -> dicts of tensors: image (3,S,S) float32 in [0,1], mask (S,S) bool, label, index, has_mask, box.

    ``has_mask`` says whether ``mask`` is ground truth: True for normal images (known all-False) and for defective
    images with a mask file, False for defective images whose mask is unknown (leave those out of pixel metrics).
    Paths stay out of the tensor dict so default collation works; use ``dataset.samples[i].path``.

    With ``cache`` the resized image (uint8; float32 for 16-bit sources, so a cached image scores exactly as a decoded one) and mask are kept in memory after their
    first load. Under a multi-process DataLoader each worker fills its own copy: call ``preload`` first to share
    one cache. ``check_masks`` compares every mask's size with its image's (headers only) at construction.

    ``resize`` is how images become the model input (images.RESIZE_MODES). Masks are always stretched to the
    input size, the frame every metric is computed in; ``box`` (top, left, h, w) says where the image lies in its
    input, so a letterboxed input's map can be brought to that frame (``engine.inference.maps_in_mask_frame``).
    """

    def __init__(self, samples: Sequence[Sample], image_size: int | tuple[int, int], *, cache: bool = True,
                 check_masks: bool = True, resize: str = "stretch") -> None:
        check_resize_mode(resize)
        self.samples: list[Sample] = list(samples)
        self.image_size = image_size
        self.resize = resize
        self.cache = cache
        self.check_masks = check_masks
        self._cache: list[_Entry | None] = [None] * len(self.samples)
        self._warned: set[int] = set()
        if check_masks:
            for s in self.samples:
                if s.mask_path is not None:
                    self._check_sizes(s, read_size(s.path), read_size(s.mask_path))

    def __len__(self) -> int:
        return len(self.samples)

    @staticmethod
    def _check_sizes(s: Sample, img_hw: tuple[int, int], mask_hw: tuple[int, int]) -> None:
        if img_hw != mask_hw:
            raise DataError(
                f"mask {s.mask_path} is {mask_hw[1]}x{mask_hw[0]} (WxH) but its image {s.path} is "
                f"{img_hw[1]}x{img_hw[0]}; a mask must have its image's size"
            )

    def _load(self, i: int) -> _Entry:
        s = self.samples[i]
        decoded = decode_image(s.path)
        box = content_box(decoded.shape[0], decoded.shape[1], self.image_size, self.resize)
        arr = resize_image_array(decoded, self.image_size, self.resize)
        mask = None
        if s.mask_path is not None:
            mask, mask_hw, nonempty = read_mask_array(s.mask_path, self.image_size)
            if self.check_masks:
                self._check_sizes(s, read_size(s.path), mask_hw)
            if s.label == 1 and i not in self._warned:
                if not nonempty:
                    self._warned.add(i)
                    warnings.warn(
                        f"ground-truth mask {s.mask_path} of defective image {s.path} is empty; "
                        "the image is kept as anomalous with no defect pixels",
                        stacklevel=3,
                    )
                elif not mask.any():
                    self._warned.add(i)
                    warnings.warn(
                        f"the defect in mask {s.mask_path} is too small to survive resizing to {self.image_size}; "
                        "the image is kept as anomalous with no defect pixels",
                        stacklevel=3,
                    )
        return _Entry(arr, mask, box)

    def entry(self, i: int) -> _Entry:
        """Cached (or freshly loaded) raw arrays of sample i."""
        e = self._cache[i] if self.cache else None
        if e is None:
            e = self._load(i)
            if self.cache:
                self._cache[i] = e
        return e

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < 0:
            i += len(self.samples)
        if not 0 <= i < len(self.samples):
            raise IndexError(f"index {i} out of range for {len(self.samples)} samples")
        e = self.entry(i)
        s = self.samples[i]
        image = array_to_tensor(e.image)
        if e.mask is not None:
            mask = torch.from_numpy(e.mask.copy())
        else:
            mask = torch.zeros(image.shape[1:], dtype=torch.bool)
        has_mask = s.label == 0 or e.mask is not None
        return {"image": image, "mask": mask, "label": int(s.label), "index": i, "has_mask": bool(has_mask),
                "box": torch.tensor(e.box)}


class _EntryView(Dataset):
    """Lets DataLoader workers load raw entries in parallel for preload."""

    def __init__(self, ds: ImageDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[int, _Entry]:
        return i, self.ds._load(i)


def _identity(x: Any) -> Any:
    return x


def preload(dataset: ImageDataset, num_workers: int = 0, progress: bool = True) -> ImageDataset:
    """Fill the cache of `dataset` up front (optionally in parallel) so later DataLoader workers share it."""
    from tqdm.auto import tqdm

    if not dataset.cache:
        return dataset
    todo = [i for i, e in enumerate(dataset._cache) if e is None]
    bar = tqdm(total=len(todo), desc="loading images", disable=not progress or not todo, leave=False)
    if num_workers > 0 and len(todo) > 1:
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(_EntryView(dataset), todo),
            batch_size=None,
            num_workers=num_workers,
            collate_fn=_identity,
        )
        for i, e in loader:
            dataset._cache[i] = e
            bar.update(1)
    else:
        for i in todo:
            dataset.entry(i)
            bar.update(1)
    bar.close()
    return dataset
