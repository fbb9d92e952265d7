"""Finding the images of one category on disk and splitting them into train / validation / test samples.

Two layouts are accepted:

* MVTec AD: ``CAT/train/good``, ``CAT/test/<type>/``, ``CAT/ground_truth/<type>/<stem>_mask.png``; also the
  MVTec 3D-AD variant with ``rgb/`` and ``gt/`` sub-folders and a ``CAT/validation/good`` folder.
* Generic folders: a folder of defect-free images, optionally a folder of defective ones (flat, or one
  sub-folder per defect type), a folder of masks matched by file stem and a folder of defect-free test images.

``load_category`` picks the layout from the folder; it is what the command line and the anomaly grid use.
Validation images are always held out of the defect-free training images (never test images), because
thresholds and early stopping must not see the test set (docs/evaluation.md#no-choice-on-test-labels).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .images import DataError, PathLike
from .listing import EXTENSIONS_TEXT, has_images, image_dir, name_some, require_dir, scan_dir, warn_ignored

__all__ = [
    "Sample",
    "CategorySplit",
    "discover_mvtec",
    "discover_folder",
    "load_category",
    "discover",
]


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


# ------------------------------------------------------------------------------------------- splits and masks


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
        for p in scan_dir(folder, []):
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
            "From the command line: add the masks (white = defect; MVTec layout: "
            "ground_truth/<defect type>/<stem>_mask.png), remove those images from the test set, or keep them "
            "for image-level scores only with `distillad test --allow-missing-masks` (Python: "
            "load_category(..., require_masks=False))."
        )
    warnings.warn(
        f"{len(missing)} defective test image(s) have no ground-truth mask and are left out of pixel metrics: "
        f"{name_some([m[0] for m in missing])} (expected e.g. {expected})",
        stacklevel=3,
    )


# ------------------------------------------------------------------------------------------------- discovery


def discover_mvtec(
    root: PathLike, *, val_fraction: float = 0.1, seed: int = 0, require_masks: bool = True
) -> CategorySplit:
    """Read one MVTec-layout category folder into a CategorySplit.

    Validation comes from ``root/validation/good`` when it exists (MVTec 3D-AD), otherwise a seeded
    ``val_fraction`` share of ``train/good`` is held out. Files are sorted so the result is deterministic.
    """
    root = Path(root).expanduser()
    require_dir(root, "category folder")
    ignored: list[Path] = []

    good_dir = root / "train" / "good"
    if not good_dir.is_dir():
        raise DataError(
            f"category folder {root} has no train/good folder ({good_dir} is missing); expected the MVTec AD layout "
            "CATEGORY/train/good/*.png, CATEGORY/test/<type>/*.png, CATEGORY/ground_truth/<type>/<stem>_mask.png"
        )
    good_dir = image_dir(good_dir)
    normals = scan_dir(good_dir, ignored)
    if not normals:
        raise DataError(f"training folder {good_dir} contains no images (accepted extensions: {EXTENSIONS_TEXT})")

    val_dir = root / "validation" / "good"
    if val_dir.is_dir():
        val_dir = image_dir(val_dir)
        val_paths = scan_dir(val_dir, ignored)
        if not val_paths:
            raise DataError(
                f"validation folder {val_dir} exists but contains no images (accepted extensions: {EXTENSIONS_TEXT})")
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
            img_dir = image_dir(type_dir)
            images = scan_dir(img_dir, ignored)
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
    warn_ignored(ignored)
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
    require_dir(ndir, "normal image folder")
    ignored: list[Path] = []
    normals = scan_dir(ndir, ignored)
    if not normals:
        raise DataError(f"normal image folder {ndir} contains no images (accepted extensions: {EXTENSIONS_TEXT})")
    train, val = _split_normals(normals, val_fraction, seed)

    test: list[Sample] = []
    if test_normal_dir is not None:
        tdir = Path(test_normal_dir).expanduser()
        require_dir(tdir, "normal test image folder")
        goods = scan_dir(tdir, ignored)
        if not goods:
            raise DataError(
                f"normal test image folder {tdir} contains no images (accepted extensions: {EXTENSIONS_TEXT})")
        test.extend(Sample(p, 0, "good", None) for p in goods)

    missing: list[tuple[Path, Path]] = []
    if mask_dir is not None:
        mdir: Path | None = Path(mask_dir).expanduser()
        require_dir(mdir, "mask folder")  # type: ignore[arg-type]
        if abnormal_dir is None:
            raise ValueError("mask_dir was given without abnormal_dir")
    else:
        mdir = None
    if abnormal_dir is not None:
        adir = Path(abnormal_dir).expanduser()
        require_dir(adir, "abnormal image folder")
        groups: list[tuple[str, list[Path]]] = []
        direct = scan_dir(adir, ignored)
        if direct:
            groups.append((adir.name, direct))
        for sub in sorted(p for p in adir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            imgs = scan_dir(sub, ignored)
            if imgs:
                groups.append((sub.name, imgs))
        if not groups:
            raise DataError(f"abnormal image folder {adir} contains no images, directly or in sub-folders "
                            f"(accepted extensions: {EXTENSIONS_TEXT})")
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
        raise DataError(f"test image(s) also used as defect-free training images: {name_some(overlap)}")
    _report_missing_masks(missing, require_masks)
    warn_ignored(ignored)
    if name is None:
        name = ndir.name
        if name.lower() in ("good", "normal", "ok", "train", "images") and ndir.parent.name:
            name = ndir.parent.name
    return CategorySplit(name=name, train=train, val=val, test=test)


def load_category(path: PathLike, *, val_fraction: float = 0.1, seed: int = 0,
                  require_masks: bool = True) -> CategorySplit:
    """One category from disk: the MVTec layout when `path` has a ``train/`` (or ``validation/``) folder, else a
    plain folder of defect-free images (split into train/val, no test images).

    DataError naming `path` when it does not exist, is not a folder, or fits neither layout (with a hint when it is a
    dataset root holding categories). `require_masks` applies to the MVTec layout's defective test images.
    """
    root = Path(path).expanduser()
    require_dir(root, "data folder")
    if (root / "train").is_dir() or (root / "validation").is_dir():
        return discover_mvtec(root, val_fraction=val_fraction, seed=seed, require_masks=require_masks)
    if has_images(root):
        return discover_folder(root, val_fraction=val_fraction, seed=seed)
    categories = sorted(c.name for c in root.iterdir() if (c / "train" / "good").is_dir())
    hint = f" It looks like a dataset root holding categories ({', '.join(categories[:10])}): pass one category " \
        "folder." if categories else ""
    raise DataError(
        f"{root} is not a recognised dataset folder: it has no train/ folder and no images directly in it.{hint} "
        "Accepted layouts: (1) MVTec AD: CATEGORY/train/good/*, CATEGORY/test/<type>/*, "
        "CATEGORY/ground_truth/<type>/<stem>_mask.png; (2) a plain folder of defect-free images (accepted "
        f"extensions: {EXTENSIONS_TEXT}). From Python, discover_folder(normal_dir, abnormal_dir=..., mask_dir=..., "
        "test_normal_dir=...) builds a test split from plain folders."
    )


discover = load_category  # the earlier name, kept for existing callers
