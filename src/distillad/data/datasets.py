"""Finding the images of one category on disk, splitting them, and serving them as tensors.

Two layouts are accepted:

* MVTec AD: ``CAT/train/good``, ``CAT/test/<type>/``, ``CAT/ground_truth/<type>/<stem>_mask.png``; also the
  MVTec 3D-AD variant with ``rgb/`` and ``gt/`` sub-folders and a ``CAT/validation/good`` folder.
* Generic folders: a folder of defect-free images, optionally a folder of defective ones (flat, or one
  sub-folder per defect type), a folder of masks matched by file stem and a folder of defect-free test images.

Validation images are always held out of the defect-free training images (never test images), because
thresholds and early stopping must not see the test set (METHODS.md section 5).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import (
    IMAGE_EXTENSIONS,
    DataError,
    array_to_tensor,
    is_image_file,
    read_image_array,
    read_mask_array,
    read_size,
)

__all__ = [
    "Sample",
    "CategorySplit",
    "discover_mvtec",
    "discover_folder",
    "discover",
    "list_images",
    "ImageDataset",
    "preload",
]

PathLike = Union[str, "os.PathLike[str]"]
_MAX_LISTED = 5  # how many file names a warning or error lists before summarising with a count
_EXT_TEXT = ", ".join(IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class Sample:
    """One image: where it is, whether it is defective, and where its ground-truth mask is (if known)."""

    path: Path
    label: int  # 0 normal, 1 defective
    defect_type: str  # "good" for normal
    mask_path: Path | None  # None: no mask file; for label 1 this means "mask unknown"


@dataclass
class CategorySplit:
    """Train / validation (both defect-free) / test samples of one category."""

    name: str
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] = field(default_factory=list)

    @property
    def defect_types(self) -> list[str]:
        """Sorted defect types present in the test set (without "good")."""
        return sorted({s.defect_type for s in self.test if s.label == 1})

    def summary(self) -> str:
        """One line for logs: counts per part and per test type."""
        per_type: dict[str, int] = {}
        for s in self.test:
            per_type[s.defect_type] = per_type.get(s.defect_type, 0) + 1
        types = ", ".join(f"{k}={v}" for k, v in sorted(per_type.items()))
        return f"{self.name}: train={len(self.train)} val={len(self.val)} test={len(self.test)} ({types})"


# --------------------------------------------------------------------------------------------- listing helpers


def _names(paths: Sequence[Path]) -> str:
    shown = ", ".join(str(p) for p in paths[:_MAX_LISTED])
    return shown + (f" and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else "")


def _scan_dir(folder: Path, ignored: list[Path]) -> list[Path]:
    """Sorted image files directly in `folder`; non-image files are appended to `ignored`, hidden ones skipped."""
    images = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file():
            if is_image_file(p):
                images.append(p)
            else:
                ignored.append(p)
    return images


def _image_dir(folder: Path) -> Path:
    """The folder itself, or its ``rgb/`` sub-folder (MVTec 3D-AD) when images live there."""
    rgb = folder / "rgb"
    if rgb.is_dir() and not any(is_image_file(p) and p.is_file() for p in folder.iterdir()):
        return rgb
    return folder


def _warn_ignored(ignored: list[Path]) -> None:
    if ignored:
        warnings.warn(
            f"ignored {len(ignored)} non-image file(s) (accepted extensions: {_EXT_TEXT}): {_names(ignored)}",
            stacklevel=3,
        )


def _require_dir(folder: Path, what: str) -> None:
    if not folder.exists():
        raise DataError(f"{what} {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{what} {folder} is not a folder")


def _n_val(n: int, val_fraction: float) -> int:
    """round-half-up(val_fraction * n), at least 1 when possible, always leaving at least one training image."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0 or n < 2:
        return 0
    k = int(math.floor(val_fraction * n + 0.5))
    return min(max(k, 1), n - 1)


def _split_normals(paths: list[Path], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Seeded, order-preserving hold-out; a private Generator so global RNG state neither matters nor changes."""
    k = _n_val(len(paths), val_fraction)
    held = set(np.random.default_rng(seed).permutation(len(paths))[:k].tolist())
    train = [Sample(p, 0, "good", None) for i, p in enumerate(paths) if i not in held]
    val = [Sample(p, 0, "good", None) for i, p in enumerate(paths) if i in held]
    return train, val


def _mask_index(folder: Path | None) -> dict[str, Path]:
    """stem -> mask file for every image file in `folder` (first in sorted order wins)."""
    index: dict[str, Path] = {}
    if folder is not None and folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.is_file() and is_image_file(p):
                index.setdefault(p.stem, p)
    return index


def _find_mask(stem: str, index: dict[str, Path]) -> Path | None:
    return index.get(stem + "_mask") or index.get(stem)


def _report_missing_masks(missing: list[tuple[Path, Path]], require: bool) -> None:
    if not missing:
        return
    img, expected = missing[0]
    more = f" ({len(missing) - 1} more defective image(s) also lack a mask)" if len(missing) > 1 else ""
    if require:
        raise DataError(
            f"defective test image {img} has no ground-truth mask: expected {expected}{more}. "
            "Add the masks, or pass require_masks=False to evaluate image-level scores only for these images."
        )
    warnings.warn(
        f"{len(missing)} defective test image(s) have no ground-truth mask and are left out of pixel metrics: "
        f"{_names([m[0] for m in missing])} (expected e.g. {expected})",
        stacklevel=3,
    )


# --------------------------------------------------------------------------------------------------- discovery


def discover_mvtec(
    root: PathLike, *, val_fraction: float = 0.1, seed: int = 0, require_masks: bool = True
) -> CategorySplit:
    """Read one MVTec-layout category folder into a CategorySplit.

    Validation comes from ``root/validation/good`` when it exists (MVTec 3D-AD), otherwise a seeded
    ``val_fraction`` share of ``train/good`` is held out. Files are sorted so the result is deterministic.
    """
    root = Path(root).expanduser()
    _require_dir(root, "category folder")
    ignored: list[Path] = []

    good_dir = root / "train" / "good"
    if not good_dir.is_dir():
        raise DataError(
            f"category folder {root} has no train/good folder ({good_dir} is missing); expected the MVTec AD layout "
            "CATEGORY/train/good/*.png, CATEGORY/test/<type>/*.png, CATEGORY/ground_truth/<type>/<stem>_mask.png"
        )
    good_dir = _image_dir(good_dir)
    normals = _scan_dir(good_dir, ignored)
    if not normals:
        raise DataError(f"training folder {good_dir} contains no images (accepted extensions: {_EXT_TEXT})")

    val_dir = root / "validation" / "good"
    if val_dir.is_dir():
        val_dir = _image_dir(val_dir)
        val_paths = _scan_dir(val_dir, ignored)
        if not val_paths:
            raise DataError(f"validation folder {val_dir} exists but contains no images (accepted extensions: {_EXT_TEXT})")
        train = [Sample(p, 0, "good", None) for p in normals]
        val = [Sample(p, 0, "good", None) for p in val_paths]
    else:
        train, val = _split_normals(normals, val_fraction, seed)

    test: list[Sample] = []
    missing: list[tuple[Path, Path]] = []
    test_dir = root / "test"
    if test_dir.is_dir():
        for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            dtype = type_dir.name
            img_dir = _image_dir(type_dir)
            images = _scan_dir(img_dir, ignored)
            if not images:
                warnings.warn(f"test folder {img_dir} contains no images; skipped", stacklevel=2)
                continue
            if dtype == "good":
                test.extend(Sample(p, 0, "good", None) for p in images)
                continue
            gt_dir = root / "ground_truth" / dtype
            if img_dir != type_dir:  # MVTec 3D-AD keeps masks beside the images: test/<type>/gt/<stem>.png
                gt_dir = type_dir / "gt" if (type_dir / "gt").is_dir() else gt_dir
            index = _mask_index(gt_dir)
            for p in images:
                mp = _find_mask(p.stem, index)
                if mp is None:
                    missing.append((p, gt_dir / f"{p.stem}_mask.png"))
                test.append(Sample(p, 1, dtype, mp))
        ignored.extend(p for p in sorted(test_dir.iterdir()) if p.is_file() and not p.name.startswith("."))
    _report_missing_masks(missing, require_masks)
    _warn_ignored(ignored)
    return CategorySplit(name=root.name, train=train, val=val, test=test)


def discover_folder(
    normal_dir: PathLike,
    *,
    abnormal_dir: PathLike | None = None,
    mask_dir: PathLike | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    test_normal_dir: PathLike | None = None,
    require_masks: bool = False,
    name: str | None = None,
) -> CategorySplit:
    """Build a CategorySplit from plain folders.

    ``normal_dir`` (flat) is split into train/val. ``abnormal_dir`` gives label-1 test images: its direct images get
    the folder's name as defect type, each image sub-folder is a defect type of its own. Masks are looked up by stem
    (``<stem>_mask.*`` or ``<stem>.*``) in ``mask_dir/<type>/`` first, then in ``mask_dir``. ``test_normal_dir``
    gives label-0 test images. A missing mask is a warning (mask unknown) unless ``require_masks``.
    """
    ndir = Path(normal_dir).expanduser()
    _require_dir(ndir, "normal image folder")
    ignored: list[Path] = []
    normals = _scan_dir(ndir, ignored)
    if not normals:
        raise DataError(f"normal image folder {ndir} contains no images (accepted extensions: {_EXT_TEXT})")
    train, val = _split_normals(normals, val_fraction, seed)

    test: list[Sample] = []
    if test_normal_dir is not None:
        tdir = Path(test_normal_dir).expanduser()
        _require_dir(tdir, "normal test image folder")
        goods = _scan_dir(tdir, ignored)
        if not goods:
            raise DataError(f"normal test image folder {tdir} contains no images (accepted extensions: {_EXT_TEXT})")
        test.extend(Sample(p, 0, "good", None) for p in goods)

    missing: list[tuple[Path, Path]] = []
    if mask_dir is not None:
        mdir: Path | None = Path(mask_dir).expanduser()
        _require_dir(mdir, "mask folder")  # type: ignore[arg-type]
        if abnormal_dir is None:
            raise ValueError("mask_dir was given without abnormal_dir")
    else:
        mdir = None
    if abnormal_dir is not None:
        adir = Path(abnormal_dir).expanduser()
        _require_dir(adir, "abnormal image folder")
        groups: list[tuple[str, list[Path]]] = []
        direct = _scan_dir(adir, ignored)
        if direct:
            groups.append((adir.name, direct))
        for sub in sorted(p for p in adir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            imgs = _scan_dir(sub, ignored)
            if imgs:
                groups.append((sub.name, imgs))
        if not groups:
            raise DataError(
                f"abnormal image folder {adir} contains no images, directly or in sub-folders (accepted extensions: {_EXT_TEXT})"
            )
        flat_index = _mask_index(mdir)
        for dtype, imgs in groups:
            type_index = _mask_index(mdir / dtype) if mdir is not None else {}
            for p in imgs:
                mp = None
                if mdir is not None:
                    mp = _find_mask(p.stem, type_index) or _find_mask(p.stem, flat_index)
                    if mp is None:
                        missing.append((p, mdir / f"{p.stem}_mask.png"))
                test.append(Sample(p, 1, dtype, mp))

    seen = {s.path.resolve() for s in train + val}
    overlap = [s.path for s in test if s.path.resolve() in seen]
    if overlap:
        raise DataError(f"test image(s) also used as defect-free training images: {_names(overlap)}")
    _report_missing_masks(missing, require_masks)
    _warn_ignored(ignored)
    if name is None:
        name = ndir.name
        if name.lower() in ("good", "normal", "ok", "train", "images") and ndir.parent.name:
            name = ndir.parent.name
    return CategorySplit(name=name, train=train, val=val, test=test)


def discover(path: PathLike, **kw: Any) -> CategorySplit:
    """MVTec-layout category folder -> CategorySplit; anything else gets a DataError explaining what is accepted."""
    p = Path(path).expanduser()
    _require_dir(p, "dataset folder")
    if (p / "train" / "good").is_dir():
        return discover_mvtec(p, **kw)
    hint = ""
    cats = sorted(c.name for c in p.iterdir() if (c / "train" / "good").is_dir())
    if cats:
        hint = f" It looks like a dataset root holding categories ({', '.join(cats[:10])}): pass one category folder."
    elif p.name == "good" and p.parent.name == "train":
        hint = f" It looks like the train/good folder itself: pass the category folder {p.parent.parent}."
    raise DataError(
        f"{p} is not a recognised dataset folder: {p / 'train' / 'good'} does not exist.{hint} Accepted layouts: "
        "(1) MVTec AD: CATEGORY/train/good/*, CATEGORY/test/<type>/*, CATEGORY/ground_truth/<type>/<stem>_mask.png; "
        "(2) plain folders via discover_folder(normal_dir, abnormal_dir=..., mask_dir=..., test_normal_dir=...)."
    )


def list_images(path_or_paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """Image files from files and/or folders (folders searched recursively, sorted, hidden entries skipped)."""
    if isinstance(path_or_paths, (str, os.PathLike)):
        inputs = [Path(path_or_paths)]
    else:
        inputs = [Path(p) for p in path_or_paths]
    out: list[Path] = []
    seen: set[Path] = set()
    for inp in inputs:
        inp = inp.expanduser()
        if not inp.exists():
            raise DataError(f"input {inp} does not exist")
        if inp.is_file():
            if inp.suffix.lower() not in IMAGE_EXTENSIONS:
                raise DataError(f"input file {inp} is not an image (accepted extensions: {_EXT_TEXT})")
            found = [inp]
        else:
            found = sorted(
                p
                for p in inp.rglob("*")
                if p.is_file() and is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(inp).parts)
            )
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                out.append(p)
    if not out:
        raise DataError(f"no images found in {_names(inputs)} (accepted extensions: {_EXT_TEXT})")
    return out


# ------------------------------------------------------------------------------------------------------ dataset


@dataclass
class _Entry:
    image: np.ndarray  # (H, W, 3) uint8, or float16 in [0, 1] for >8-bit sources
    mask: np.ndarray | None  # (H, W) bool, None when there is no mask file


class ImageDataset(Dataset):
    """Samples -> dicts of tensors: image (3,S,S) float32 in [0,1], mask (S,S) bool, label, index, has_mask.

    ``has_mask`` says whether ``mask`` is ground truth: True for normal images (known all-False) and for defective
    images with a mask file, False for defective images whose mask is unknown (leave those out of pixel metrics).
    Paths stay out of the tensor dict so default collation works; use ``dataset.samples[i].path``.

    With ``cache`` the resized image (uint8; float16 for 16-bit sources) and mask are kept in memory after their
    first load. Under a multi-process DataLoader each worker fills its own copy: call ``preload`` first to share
    one cache. ``check_masks`` compares every mask's size with its image's (headers only) at construction.
    """

    def __init__(
        self, samples: Sequence[Sample], image_size: int | tuple[int, int], *, cache: bool = True, check_masks: bool = True
    ) -> None:
        self.samples: list[Sample] = list(samples)
        self.image_size = image_size
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
        arr = read_image_array(s.path, self.image_size)
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float16)
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
        return _Entry(arr, mask)

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
        return {"image": image, "mask": mask, "label": int(s.label), "index": i, "has_mask": bool(has_mask)}


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
