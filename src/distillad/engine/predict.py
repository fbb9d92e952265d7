"""`predict`: score files or folders with a trained run; write a CSV, heatmap overlays and binary masks."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from distillad.data import list_images, load_image
from distillad.engine.checkpoint import LoadedRun, RunError, atomic_write_bytes, atomic_write_text

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


def output_names(paths: list[Path]) -> list[str]:
    """Unique, readable names: the path relative to the inputs' common folder, separators folded to '__'."""
    resolved = [p.resolve() for p in paths]
    common = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    names: list[str] = []
    seen: set[str] = set()
    for p in resolved:
        name = "__".join(p.relative_to(common).with_suffix("").parts)
        candidate, counter = name, 2
        while candidate in seen:  # a.png and a.jpg side by side
            candidate, counter = f"{name}_{counter}", counter + 1
        seen.add(candidate)
        names.append(candidate)
    return names


@dataclass
class Prediction:
    path: Path
    score: float
    normalized_score: float | None
    label: str


def predict_paths(run: LoadedRun, inputs: list[str | Path], out_dir: str | Path, *, batch_size: int = 8,
                  device: str | torch.device = "cpu", overwrite: bool = False, save_images: bool = True,
                  progress: bool = True) -> list[Prediction]:
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    csv_path = out_dir / "predictions.csv"
    if csv_path.exists() and not overwrite:
        raise RunError(f"{csv_path} already exists; choose another --out or pass --overwrite")
    paths = list_images([Path(p) for p in inputs])
    names = output_names(paths)
    calibration = run.calibration
    threshold = calibration.threshold if calibration else float("inf")
    # Colour scale: twice the threshold saturates, so a normal image stays blue and a defect turns red.
    scale_max = 2.0 * threshold if calibration else None
    size = run.config.image_size
    predictions: list[Prediction] = []
    for start in tqdm(range(0, len(paths), batch_size), disable=not progress, unit="batch", desc="predicting"):
        chunk = paths[start:start + batch_size]
        images = torch.stack([load_image(p, size) for p in chunk]).to(device)
        with torch.inference_mode():
            maps, scores = run.scorer(images)
        for offset, path in enumerate(chunk):
            score = float(scores[offset])
            normalized = calibration.normalize(score) if calibration else None
            label = ("defective" if calibration.is_defective(score) else "normal") if calibration else "uncalibrated"
            predictions.append(Prediction(path=path, score=score, normalized_score=normalized, label=label))
            if save_images:
                original = load_image(path, None)
                height, width = original.shape[-2:]
                full_map = F.interpolate(maps[offset][None, None].float().cpu(), size=(height, width),
                                         mode="bilinear", align_corners=False)[0, 0].numpy()
                rgb = (original.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                name = names[start + offset]
                heat_scale = scale_max if scale_max is not None else float(full_map.max())
                atomic_write_bytes(out_dir / "heatmaps" / f"{name}.png",
                                   png_bytes(overlay(rgb, full_map, threshold, heat_scale)))
                if calibration:
                    mask = ((full_map > threshold) * 255).astype(np.uint8)
                    atomic_write_bytes(out_dir / "masks" / f"{name}_mask.png", png_bytes(mask))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "score", "normalized_score", "label"])
    for p in predictions:
        writer.writerow([str(p.path), f"{p.score:.6g}",
                         "" if p.normalized_score is None else f"{p.normalized_score:.4f}", p.label])
    atomic_write_text(csv_path, buffer.getvalue())
    return predictions
