"""Reading images and ground-truth masks from disk into tensors.

One reader for every method and for evaluation, so that every model sees exactly the same pixels
(docs/evaluation.md#preprocessing: bilinear + antialias for images, nearest neighbour for masks, masks binarised at > 0,
grey images repeated to 3 channels).

Decisions worth knowing:

* Alpha (RGBA, LA, PA, palette with transparency) is composited on **black**: a fully transparent pixel becomes
  black, whatever colour happens to be stored under it. Cut-out product photos thus get a clean, uniform
  background instead of arbitrary hidden colours; opaque images are unaffected.
* 8-bit modes are resized as 8-bit images with PIL (BILINEAR, which PIL antialiases when shrinking); the
  result is rounded to the nearest 1/255, well below any effect on the features. 16-bit (``I;16*``), 32-bit
  integer (``I``) and float (``F``) images are scaled to [0, 1] first (integers by 65535, the 16-bit range;
  floats are assumed to already be in [0, 1]) and resized in 32-bit float so no precision is lost. Values
  outside [0, 1] are clipped, NaN becomes 0.
* EXIF orientation tags are ignored: masks are drawn on the stored pixel grid, and rotating only the image
  would misalign them.
* Multi-frame files (TIFF stacks, GIF) use their first frame.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:   # torch is imported where a tensor is made, so decoding (and `distillad serve`) needs no torch
    import torch

__all__ = [
    "DataError",
    "IMAGE_EXTENSIONS",
    "SizeLike",
    "is_image_file",
    "load_image",
    "load_mask",
    "read_size",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

SizeLike = Union[int, "tuple[int, int]", None]
PathLike = Union[str, "os.PathLike[str]"]


from distillad.errors import ConfigError, DataError  # noqa: E402  (DataError re-exported: distillad.data.DataError)


def is_image_file(path: Path) -> bool:
    """True for a non-hidden file whose extension is one of IMAGE_EXTENSIONS (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _target_hw(size: SizeLike) -> tuple[int, int] | None:
    """Normalise `size` (square int or (H, W)) and reject nonsense early, with a clear message."""
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        h = w = int(size)
    else:
        try:
            h, w = (int(s) for s in size)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ValueError(f"size must be an int or an (H, W) pair, got {size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return h, w


# An image larger than this on a side is decoded reduced by the smallest integer factor that brings it within
# (JPEG: scaled while decoding; other formats: `Image.reduce` right after), wherever a file is read, so training,
# `test` and `predict` see the same pixels and an 8000x8000 photo costs what a 4000x4000 one does. Datasets of
# ordinary inspection images (MVTec AD: at most 1024 px) are far below it and decode unchanged.
MAX_DECODED_SIDE = 4096


def _reduction(im: Image.Image) -> int:
    return -(-max(im.size) // MAX_DECODED_SIDE)


def limit_size(im: Image.Image) -> Image.Image:
    """`im` (opened, not yet loaded) decoded within MAX_DECODED_SIDE; the original is closed when replaced."""
    factor = _reduction(im)
    if factor > 1 and im.format == "JPEG":
        im.draft(im.mode, (-(-im.size[0] // factor), -(-im.size[1] // factor)))
    im.load()
    factor = _reduction(im)
    if factor <= 1:
        return im
    try:
        reduced = im.reduce(factor)
    except ValueError:   # a pixel mode `reduce` does not handle: keep it whole
        return im
    im.close()
    return reduced


def _open(path: PathLike, what: str = "image", reduce_large: bool = False) -> Image.Image:
    """Open and fully decode a file, turning every decoder failure into a DataError naming the file."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} file {p} does not exist")
    if not p.is_file():
        raise DataError(f"{what} path {p} is not a file")
    if p.stat().st_size == 0:
        raise DataError(f"{what} file {p} is empty (0 bytes)")
    try:
        return _decode(p, reduce_large)
    except UnidentifiedImageError:
        raise DataError(f"{what} file {p} is not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise DataError(f"{what} file {p} could not be decoded (truncated or corrupt?): {e}") from None


def _decode(p: Path, reduce_large: bool = False) -> Image.Image:
    im = Image.open(p)
    try:
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        if reduce_large:
            return limit_size(im)
        im.load()  # decodes everything now, so truncated files fail here and not later
    except BaseException:
        im.close()  # a failed decode must not leak the file handle
        raise
    return im


def read_size(path: PathLike) -> tuple[int, int]:
    """(H, W) of an image from its header only: cheap enough to check every mask against its image up front."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"file {p} does not exist")
    if p.stat().st_size == 0:
        raise DataError(f"file {p} is empty (0 bytes)")
    try:
        with Image.open(p) as im:
            w, h = im.size
    except UnidentifiedImageError:
        raise DataError(f"file {p} is not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"file {p} could not be read: {e}") from None
    return h, w


def _composite_on_black(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 colour * alpha/255, rounded; see the module docstring for why black."""
    out = (rgb.astype(np.uint16) * alpha.astype(np.uint16)[..., None] + 127) // 255
    return out.astype(np.uint8)


def _resize_u8(arr: np.ndarray, hw: tuple[int, int] | None) -> np.ndarray:
    if hw is None or arr.shape[:2] == hw:
        return arr
    im = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    out = np.asarray(im.resize((hw[1], hw[0]), Image.Resampling.BILINEAR))
    return out[..., None] if out.ndim == 2 else out


def _resize_f32(arr: np.ndarray, hw: tuple[int, int] | None) -> np.ndarray:
    """Per-channel float resize: exact for 16-bit and float sources, which 8-bit resizing would quantise."""
    if hw is None or arr.shape[:2] == hw:
        return arr
    chans = [
        np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., c]), mode="F").resize((hw[1], hw[0]), Image.Resampling.BILINEAR))
        for c in range(arr.shape[2])
    ]
    return np.stack(chans, axis=-1)


def _decode_pixels(im: Image.Image, path: Path) -> np.ndarray:
    """PIL image of any mode -> (H, W, 1 or 3) array, uint8, or float32 in [0, 1] for high bit depths."""
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "PA" or mode == "RGBa":
        im = im.convert("RGBA")
    elif mode == "La":
        im = im.convert("LA")
    elif mode == "1":
        im = im.convert("L")
    mode = im.mode

    if mode == "L":
        return np.asarray(im)[..., None]
    if mode == "RGB":
        return np.asarray(im)
    if mode == "RGBA":
        a = np.asarray(im)
        return _composite_on_black(a[..., :3], a[..., 3])
    if mode == "LA":
        a = np.asarray(im)
        return _composite_on_black(a[..., :1], a[..., 1])
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.float32) / 65535.0
        return np.clip(a, 0.0, 1.0)[..., None]
    if mode == "F":
        a = np.nan_to_num(np.asarray(im).astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        return np.clip(a, 0.0, 1.0)[..., None]
    try:  # CMYK, YCbCr, LAB, HSV, RGBX, ...
        return np.asarray(im.convert("RGB"))
    except (ValueError, OSError) as e:
        raise DataError(f"image file {path} has unsupported pixel mode {mode!r}: {e}") from None


def decode_image(source: PathLike | Image.Image | np.ndarray) -> np.ndarray:
    """A file, a PIL image or an array -> (H, W, 1 or 3) array at full resolution (a file over MAX_DECODED_SIDE
    reduced within it): uint8 for 8-bit sources, float32 in [0, 1] otherwise. Arrays are (H, W), (H, W, 1) or (H, W, 3), uint8 or float in [0, 1]."""
    if isinstance(source, Image.Image):
        arr = _decode_pixels(source, Path(getattr(source, "filename", "") or "<PIL image>"))
    elif isinstance(source, np.ndarray):
        arr = source[..., None] if source.ndim == 2 else source
        if arr.ndim != 3 or arr.shape[2] not in (1, 3):
            raise DataError(f"an image array must be (H, W), (H, W, 1) or (H, W, 3); got shape {source.shape}")
        if arr.dtype != np.uint8:
            if arr.dtype.kind not in "fiu":
                raise DataError(f"an image array must be uint8 or float in [0, 1]; got dtype {arr.dtype}")
            arr = np.clip(np.nan_to_num(arr.astype(np.float32), nan=0.0), 0.0, 1.0)
    else:
        p = Path(source)
        with _open(p, "image", reduce_large=True) as im:
            arr = _decode_pixels(im, p)
        if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise DataError(f"image file {p} has no pixels (shape {arr.shape})")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"an image has no pixels (shape {arr.shape})")
    return arr


# How an image becomes the model's input of `size`: "stretch" resizes it to that shape whatever its own (the field's
# protocol, and the same thing for square images); "letterbox" keeps its aspect ratio, scaling it to fit and filling
# the rest by mirroring the image at its edges, so that a texture photographed at many aspect ratios is not
# stretched by a different amount in every image. Stretch stays the default: letterboxing lowered Magnetic Tile's
# image AUROC at 256 px (benchmarks/RESULTS.md section 4, "Letterboxed inputs").
RESIZE_MODES = ("stretch", "letterbox")


def check_resize_mode(mode: str) -> None:
    """The one check of the `resize` setting, for the run config and for every reader."""
    if mode not in RESIZE_MODES:
        raise ConfigError(f"resize must be one of {', '.join(RESIZE_MODES)}; got {mode!r}")


def content_box(height: int, width: int, size: SizeLike, mode: str = "stretch") -> tuple[int, int, int, int]:
    """(top, left, h, w): where an image of `height` x `width` lies inside its model input of `size`. The whole
    input when stretched; the centred, aspect-preserving fit when letterboxed."""
    check_resize_mode(mode)
    target = _target_hw(size)
    if target is None:
        return 0, 0, height, width
    if mode == "stretch":
        return 0, 0, target[0], target[1]
    scale = min(target[0] / height, target[1] / width)
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    return (target[0] - h) // 2, (target[1] - w) // 2, h, w


def resize_image_array(arr: np.ndarray, size: SizeLike, mode: str = "stretch") -> np.ndarray:
    """A decoded (H, W, 1 or 3) array -> (h, w, 3) at `size` (None keeps it): the one resize every path uses.
    `mode` is one of RESIZE_MODES."""
    check_resize_mode(mode)
    if mode == "letterbox" and size is not None:
        target = _target_hw(size)
        assert target is not None
        top, left, h, w = content_box(arr.shape[0], arr.shape[1], target, mode)
        inner = resize_image_array(arr, (h, w))
        pads = ((top, target[0] - h - top), (left, target[1] - w - left), (0, 0))
        return np.ascontiguousarray(np.pad(inner, pads, mode="symmetric"))
    hw = _target_hw(size)
    arr = _resize_u8(arr, hw) if arr.dtype == np.uint8 else _resize_f32(arr, hw)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


def read_image_array(path: PathLike, size: SizeLike) -> np.ndarray:
    """(H, W, 3) array: uint8 for 8-bit sources, float32 in [0, 1] otherwise.

    Kept separate from load_image so that a cache can store 8-bit images as uint8 without losing the extra
    precision of 16-bit ones.
    """
    _target_hw(size)   # reject a bad size before decoding
    return resize_image_array(decode_image(path), size)


def array_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 or float array -> (3, H, W) float32 tensor in [0, 1]."""
    import torch

    if not arr.flags.writeable:  # arrays viewing PIL buffers are read-only; torch wants to own writable memory
        arr = arr.copy()
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    if t.dtype == torch.uint8:
        return t.float().div_(255.0).contiguous()
    return t.float().clamp_(0.0, 1.0).contiguous()


def load_image(path: PathLike, size: SizeLike) -> torch.Tensor:
    """Load any supported image as a (3, H, W) float32 tensor in [0, 1], resized to `size` (int or (H, W)).

    None keeps the original size. Unreadable, empty, truncated or non-image files raise DataError naming the file.
    """
    return array_to_tensor(read_image_array(path, size))


def read_mask_array(path: PathLike, size: SizeLike) -> tuple[np.ndarray, tuple[int, int], bool]:
    """(resized bool mask, original (H, W), whether the full-resolution mask had any defect pixel)."""
    hw = _target_hw(size)
    p = Path(path)
    with _open(p, "mask") as im:
        orig_hw = (im.size[1], im.size[0])
        mode = im.mode
        if mode == "P":
            im = im.convert("RGBA")
            mode = "RGBA"
        elif mode in ("PA", "RGBa"):
            im = im.convert("RGBA")
            mode = "RGBA"
        elif mode == "La":
            im = im.convert("LA")
            mode = "LA"
        a = np.asarray(im)
    if mode in ("RGBA", "LA"):
        # A pixel marked with colour but fully transparent is not marked.
        m = (a[..., :-1] > 0).any(axis=-1) & (a[..., -1] > 0)
    elif a.ndim == 3:
        m = (a > 0).any(axis=-1)
    else:
        m = np.nan_to_num(a.astype(np.float64) if a.dtype.kind == "f" else a, nan=0.0) > 0
    nonempty = bool(m.any())
    if hw is not None and m.shape != hw:
        small = Image.fromarray(m.astype(np.uint8) * 255).resize((hw[1], hw[0]), Image.Resampling.NEAREST)
        m = np.asarray(small) > 0
    return np.ascontiguousarray(m), orig_hw, nonempty


def load_mask(path: PathLike, size: SizeLike) -> torch.Tensor:
    """Load a ground-truth mask as (H, W) bool: any channel > 0 is defect; nearest-neighbour resize."""
    import torch

    m, _, _ = read_mask_array(path, size)
    return torch.from_numpy(m)


def decode_image_bytes(data: bytes, name: str = "upload", max_pixels: int | None = None) -> np.ndarray:
    """An encoded image in memory (an upload) -> the array `decode_image` gives for the same file.

    `max_pixels` refuses an image whose header announces more pixels before any of them is decoded, so a small
    compressed file cannot make a server allocate gigabytes."""
    if not data:
        raise DataError(f"image {name} is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if max_pixels is not None and width * height > max_pixels:
                raise DataError(f"image {name} has {width}x{height} pixels, more than the limit of {max_pixels}")
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            arr = _decode_pixels(limit_size(im), Path(name))
    except UnidentifiedImageError:
        raise DataError(f"{name} is not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"image {name} could not be decoded (truncated or corrupt?): {e}") from None
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"image {name} has no pixels (shape {arr.shape})")
    return arr
