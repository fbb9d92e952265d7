"""Drawing anomaly maps for people: colour map, overlay with the threshold outlined, PNG bytes, map resizing.

numpy and Pillow only, no torch: `predict` writes its heatmaps with these, and `distillad serve` draws the same
pictures in a process that never imports torch.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from distillad.data.images import content_box

# Anchors of a perceptually ordered blue -> cyan -> yellow -> red colour map for heatmaps.
_COLORMAP_ANCHORS = np.array([[0.0, 0.0, 0.5], [0.0, 0.3, 1.0], [0.0, 0.9, 1.0], [0.5, 1.0, 0.5],
                              [1.0, 0.9, 0.0], [1.0, 0.3, 0.0], [0.5, 0.0, 0.0]])


def colorize(values: np.ndarray) -> np.ndarray:
    """Map values in [0,1] (H,W) to RGB uint8 (H,W,3)."""
    values = np.clip(values, 0.0, 1.0) * (len(_COLORMAP_ANCHORS) - 1)
    low = np.floor(values).astype(int).clip(0, len(_COLORMAP_ANCHORS) - 2)
    frac = (values - low)[..., None]
    rgb = _COLORMAP_ANCHORS[low] * (1 - frac) + _COLORMAP_ANCHORS[low + 1] * frac
    return (rgb * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, anomaly_map: np.ndarray, threshold: float, scale_max: float) -> np.ndarray:
    """Blend the heatmap over the image; the colour scale runs from 0 to `scale_max` (fixed per run, so
    heatmaps of different images are comparable) and pixels above the threshold are outlined in red."""
    heat = colorize(anomaly_map / max(scale_max, 1e-12)).astype(np.float32)
    blended = 0.55 * image.astype(np.float32) + 0.45 * heat
    above = anomaly_map > threshold
    edge = above & ~_erode(above)
    blended[edge] = (255.0, 0.0, 0.0)
    return blended.round().clip(0, 255).astype(np.uint8)


def _erode(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, mode="edge")
    out = mask.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out &= padded[1 + dy:1 + dy + mask.shape[0], 1 + dx:1 + dx + mask.shape[1]]
    return out


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def to_rgb_u8(array: np.ndarray) -> np.ndarray:
    """A decoded (H,W,1|3) uint8 or float array -> (H,W,3) uint8 for drawing."""
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array


def _bilinear_weights(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of half-pixel bilinear sampling (torch's align_corners=False)."""
    scale = np.float32(in_size / out_size)            # float32 arithmetic, as torch's CPU kernel does it
    source = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5),
                        np.float32(0.0))
    low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    return low, high, (source - low.astype(np.float32)).astype(np.float32)


def resize_map(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """A (h,w) map bilinearly resized to (height,width) exactly as `F.interpolate(..., mode="bilinear",
    align_corners=False)` does it, so torch-free serving draws the masks `predict` writes."""
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    if anomaly_map.shape == (height, width):
        return anomaly_map.copy()
    y0, y1, wy = _bilinear_weights(height, anomaly_map.shape[0])
    x0, x1, wx = _bilinear_weights(width, anomaly_map.shape[1])
    rows = anomaly_map[y0] * (1 - wy)[:, None] + anomaly_map[y1] * wy[:, None]
    return (rows[:, x0] * (1 - wx)[None, :] + rows[:, x1] * wx[None, :]).astype(np.float32)


def content_map(model_map: np.ndarray, box: tuple[int, int, int, int] | np.ndarray, height: int,
                width: int) -> np.ndarray:
    """The part of a (S,S) model map its image fills (`box`: top, left, h, w; data.images.content_box), resized to
    (height, width): the image's own resolution, or the stretched square the masks and metrics use. For a stretched
    input the box is the whole map and this is `resize_map`."""
    top, left, h, w = (int(v) for v in box)
    return resize_map(np.asarray(model_map)[top:top + h, left:left + w], height, width)


def map_at_image_size(model_map: np.ndarray, height: int, width: int, resize: str = "stretch") -> np.ndarray:
    """A (S,S) model map of an image of `height` x `width` brought back to that image (predict, the service)."""
    return content_map(model_map, content_box(height, width, model_map.shape, resize), height, width)


__all__ = ["colorize", "content_map", "map_at_image_size", "overlay", "png_bytes", "resize_map", "to_rgb_u8"]
