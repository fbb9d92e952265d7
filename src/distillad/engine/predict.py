"""`predict`: score files or folders with a trained run; write a CSV, heatmap overlays and binary masks."""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distillad.data import list_images
from distillad.data.images import array_to_tensor, decode_image, resize_image_array
from distillad.engine.checkpoint import LoadedRun
from distillad.errors import ConfigError, DataError, RunError
from distillad.heatmaps import overlay, png_bytes, resize_map, to_rgb_u8
from distillad.io import atomic_write_bytes, atomic_write_text, fsync_dir

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
    """One scored image. `anomaly_map` is at the image's own resolution (float32); `mask` is where the map, in the
    score's units (`AnomalyScorer.decision_map`), is above the calibrated threshold (None when uncalibrated)."""

    path: Path | None                  # None for an in-memory image
    score: float
    normalized_score: float | None     # 0.5 at the threshold (see scoring.calibration)
    label: str                         # "normal", "defective", "uncalibrated", or "error" (unreadable file)
    anomaly_map: np.ndarray | None = None
    mask: np.ndarray | None = None
    error: str | None = None           # why the file could not be scored (label "error"), else None

    @property
    def is_defective(self) -> bool:
        return self.label == "defective"


def score_arrays(run: LoadedRun, arrays: list[np.ndarray], device: str | torch.device = "cpu"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded images (full resolution) -> maps (B,S,S) and scores (B,) through the run's scorer.

    The resize is the one ImageDataset uses, so a file gets the same score from `test` and from `predict`."""
    size = run.config.image_size
    batch = torch.stack([array_to_tensor(resize_image_array(a, size)) for a in arrays]).to(device)
    with torch.inference_mode():
        maps, scores = run.scorer(batch)
    return maps.float().cpu(), scores.float().cpu()


def full_resolution(anomaly_map: torch.Tensor, height: int, width: int) -> np.ndarray:
    """A (S,S) model-resolution map bilinearly resized to an image's own (H,W)."""
    return F.interpolate(anomaly_map[None, None], size=(height, width), mode="bilinear",
                         align_corners=False)[0, 0].numpy()


def predict_batch(run: LoadedRun, arrays: list[np.ndarray], paths: list[Path | None],
                  device: str | torch.device = "cpu") -> list[Prediction]:
    """Score decoded images; each Prediction carries its map and mask at the image's own resolution."""
    maps, scores = score_arrays(run, arrays, device)
    decision_maps = run.scorer.decision_map(maps)
    own_units = decision_maps is maps            # the threshold applies to the map itself
    calibration = run.calibration
    out: list[Prediction] = []
    for array, path, anomaly_map, decision_map, score_t in zip(arrays, paths, maps, decision_maps, scores):
        score = float(score_t)
        height, width = array.shape[0], array.shape[1]
        full_map = full_resolution(anomaly_map, height, width)
        if calibration:
            label = "defective" if calibration.is_defective(score) else "normal"
            full_decision = full_map if own_units else full_resolution(decision_map, height, width)
            out.append(Prediction(path, score, calibration.normalize(score), label, full_map,
                                  full_decision > calibration.threshold))
        else:
            out.append(Prediction(path, score, None, "uncalibrated", full_map, None))
    return out


HEATMAP_MAX_SIDE = 2048   # heatmaps are for looking at; drawing one costs ~100 bytes per pixel


def heatmap_png(image: np.ndarray, anomaly_map: np.ndarray, threshold: float, scale_max: float) -> bytes:
    """The overlay PNG of a decoded image and its map, drawn at most HEATMAP_MAX_SIDE pixels on a side so that a
    large image cannot make `predict` run out of memory (masks stay at the image's resolution)."""
    height, width = anomaly_map.shape
    factor = max(height, width) / HEATMAP_MAX_SIDE
    if factor > 1:
        height, width = max(1, round(height / factor)), max(1, round(width / factor))
        image = resize_image_array(image, (height, width))
        anomaly_map = resize_map(anomaly_map, height, width)
    return png_bytes(overlay(to_rgb_u8(image), anomaly_map, threshold, scale_max))


def _inputs_outside(paths: list[Path], out_dir: Path) -> list[Path]:
    """Drop files inside the output folder: predicting into a folder within the inputs must never score its own
    heatmaps and masks on the next run."""
    out = out_dir.resolve()
    return [p for p in paths if not p.resolve().is_relative_to(out)]


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Replace out_dir's previous results by the staged ones as a whole: the image folders first, the CSV (the
    file that says which images belong to the run) last, so a reader never pairs a CSV with other images."""
    for name in ("heatmaps", "masks"):
        old, new = out_dir / name, staging / name
        if old.exists():
            old.rename(staging / f".old-{name}")
        if new.exists():
            new.rename(old)
    os.replace(staging / CSV_NAME, out_dir / CSV_NAME)
    fsync_dir(out_dir)
    shutil.rmtree(staging, ignore_errors=True)


CSV_NAME = "predictions.csv"
CSV_COLUMNS = ("path", "score", "normalized_score", "label", "error")


def predict_paths(run: LoadedRun, inputs: list[str | Path], out_dir: str | Path, *, batch_size: int = 8,
                  device: str | torch.device = "cpu", overwrite: bool = False, save_images: bool = True,
                  progress: bool = True) -> list[Prediction]:
    """Score image files and folders; write predictions.csv, heatmap overlays and masks into out_dir.

    Each file is decoded once: the model input is resized from it and the overlay drawn on it. A file that cannot
    be read gets a row with label "error" and the reason, and the others are still scored. Everything is written
    to a staging folder first and swapped in at the end, so out_dir holds either the previous results or these,
    never a mix; files inside out_dir are never taken as inputs."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"--out {out_dir} exists and is not a folder")
    csv_path = out_dir / CSV_NAME
    if csv_path.exists() and not overwrite:
        raise RunError(f"{csv_path} already exists; choose another --out or pass --overwrite")
    paths = _inputs_outside(list_images([Path(p) for p in inputs]), out_dir)
    if not paths:
        raise DataError(f"no images to predict outside the output folder {out_dir}")
    names = output_names(paths)
    calibration = run.calibration
    threshold = calibration.threshold if calibration else float("inf")
    # Colour scale: twice the threshold saturates, so a normal image stays blue and a defect turns red.
    scale_max = 2.0 * threshold if calibration else None
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".predict-"))
    try:
        predictions: list[Prediction] = []
        for start in tqdm(range(0, len(paths), batch_size), disable=not progress, unit="batch", desc="predicting"):
            chunk, readable, arrays = paths[start:start + batch_size], [], []
            for offset, path in enumerate(chunk):
                try:
                    arrays.append(decode_image(path))
                    readable.append(offset)
                except DataError as error:
                    predictions.append(Prediction(path, float("nan"), None, "error", error=str(error)))
            scored = predict_batch(run, arrays, [chunk[i] for i in readable], device) if arrays else []
            for offset, array, prediction in zip(readable, arrays, scored):
                if save_images:
                    name = names[start + offset]
                    full_map = prediction.anomaly_map
                    heat_scale = scale_max if scale_max is not None else float(full_map.max())
                    atomic_write_bytes(staging / "heatmaps" / f"{name}.png",
                                       heatmap_png(array, full_map, threshold, heat_scale))
                    if prediction.mask is not None:
                        atomic_write_bytes(staging / "masks" / f"{name}_mask.png",
                                           png_bytes(prediction.mask.astype(np.uint8) * 255))
                prediction.anomaly_map = prediction.mask = None   # written; do not hold every map in memory
                predictions.append(prediction)
        order = {path: i for i, path in enumerate(paths)}
        predictions.sort(key=lambda p: order[p.path])
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(CSV_COLUMNS)
        for p in predictions:
            writer.writerow([str(p.path), "" if p.error else f"{p.score:.6g}",
                             "" if p.normalized_score is None else f"{p.normalized_score:.4f}", p.label,
                             p.error or ""])
        atomic_write_text(staging / CSV_NAME, buffer.getvalue())
        _swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return predictions
