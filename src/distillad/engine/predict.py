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

from distillad.data.images import array_to_tensor, decode_image, resize_image_array
from distillad.data.listing import resolve_inputs
from distillad.engine.checkpoint import LoadedRun
from distillad.errors import ConfigError, DataError, RunError
from distillad.heatmaps import map_at_image_size, overlay, png_bytes, resize_map, to_rgb_u8
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
    batch = torch.stack([array_to_tensor(resize_image_array(a, size, run.config.resize)) for a in arrays]).to(device)
    with torch.inference_mode():
        maps, scores = run.scorer(batch)
    return maps.float().cpu(), scores.float().cpu()


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
        full_map = map_at_image_size(anomaly_map.numpy(), height, width, run.config.resize)
        if calibration:
            label = "defective" if calibration.is_defective(score) else "normal"
            full_decision = full_map if own_units else map_at_image_size(decision_map.numpy(), height, width,
                                                                         run.config.resize)
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


OUTPUT_FOLDERS = ("heatmaps", "masks", "shards")   # shards: the Ray engine's CSV parts (scale.ray_predict)


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Replace out_dir's previous results by the staged ones as a whole: the folders first, the CSV (the file that
    says which images belong to the run) last, so a reader never pairs a CSV with other images."""
    for name in OUTPUT_FOLDERS:
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


def csv_fields(prediction: Prediction) -> list[str]:
    """One predictions.csv row: the one formatting of scores every engine writes."""
    p = prediction
    return [str(p.path), "" if p.error else f"{p.score:.6g}",
            "" if p.normalized_score is None else f"{p.normalized_score:.4f}", p.label, p.error or ""]


def csv_text(predictions: list[Prediction]) -> str:
    """predictions.csv (header included) for `predictions` in the order given."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    writer.writerows(csv_fields(p) for p in predictions)
    return buffer.getvalue()


def prepare_output(inputs: list[str | Path], out_dir: str | Path, overwrite: bool) -> tuple[Path, list[Path]]:
    """Check out_dir before any work and resolve the inputs (files, folders, @list files, globs; files inside
    out_dir dropped). Returns out_dir as a Path and the image files to score, in order."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"--out {out_dir} exists and is not a folder")
    csv_path = out_dir / CSV_NAME
    if csv_path.exists() and not overwrite:
        raise RunError(f"{csv_path} already exists; choose another --out or pass --overwrite")
    paths = _inputs_outside(resolve_inputs(inputs), out_dir)
    if not paths:
        raise DataError(f"no images to predict outside the output folder {out_dir}")
    return out_dir, paths


def make_staging(out_dir: Path) -> Path:
    """A fresh hidden folder inside out_dir that the results are written to before `_swap_in`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out_dir, prefix=".predict-"))


def decode_files(paths: list[Path]) -> list[np.ndarray | str]:
    """Each file decoded, or the reason it cannot be (a string): one unreadable file never stops the others."""
    decoded: list[np.ndarray | str] = []
    for path in paths:
        try:
            decoded.append(decode_image(path))
        except DataError as error:
            decoded.append(str(error))
    return decoded


def score_chunk(run: LoadedRun, paths: list[Path], names: list[str], decoded: list[np.ndarray | str],
                staging: Path, *, save_images: bool = True, device: str | torch.device = "cpu") -> list[Prediction]:
    """Score one batch of decoded files (`decode_files`) and write their heatmaps and masks into staging under
    `names`. Returns one Prediction per path, in order, maps dropped once written; unreadable files get label
    "error". The batch is the unit both engines score, so equal batches give equal scores."""
    readable = [i for i, item in enumerate(decoded) if not isinstance(item, str)]
    arrays = [decoded[i] for i in readable]
    scored = predict_batch(run, arrays, [paths[i] for i in readable], device) if arrays else []
    calibration = run.calibration
    threshold = calibration.threshold if calibration else float("inf")
    # Colour scale: twice the threshold saturates, so a normal image stays blue and a defect turns red.
    scale_max = 2.0 * threshold if calibration else None
    by_offset: dict[int, Prediction] = {}
    for offset, array, prediction in zip(readable, arrays, scored):
        if save_images:
            full_map = prediction.anomaly_map
            heat_scale = scale_max if scale_max is not None else float(full_map.max())
            atomic_write_bytes(staging / "heatmaps" / f"{names[offset]}.png",
                               heatmap_png(array, full_map, threshold, heat_scale))
            if prediction.mask is not None:
                atomic_write_bytes(staging / "masks" / f"{names[offset]}_mask.png",
                                   png_bytes(prediction.mask.astype(np.uint8) * 255))
        prediction.anomaly_map = prediction.mask = None   # written; do not hold every map in memory
        by_offset[offset] = prediction
    return [by_offset[i] if i in by_offset else Prediction(path, float("nan"), None, "error", error=decoded[i])
            for i, path in enumerate(paths)]


def predict_paths(run: LoadedRun, inputs: list[str | Path], out_dir: str | Path, *, batch_size: int = 8,
                  device: str | torch.device = "cpu", overwrite: bool = False, save_images: bool = True,
                  progress: bool = True) -> list[Prediction]:
    """Score image files and folders (or @list files and glob patterns, see `resolve_inputs`); write
    predictions.csv, heatmap overlays and masks into out_dir.

    Each file is decoded once: the model input is resized from it and the overlay drawn on it. A file that cannot
    be read gets a row with label "error" and the reason, and the others are still scored. Everything is written
    to a staging folder first and swapped in at the end, so out_dir holds either the previous results or these,
    never a mix; files inside out_dir are never taken as inputs."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    out_dir, paths = prepare_output(inputs, out_dir, overwrite)
    names = output_names(paths)
    staging = make_staging(out_dir)
    try:
        predictions: list[Prediction] = []
        for start in tqdm(range(0, len(paths), batch_size), disable=not progress, unit="batch", desc="predicting"):
            chunk = paths[start:start + batch_size]
            predictions.extend(score_chunk(run, chunk, names[start:start + batch_size], decode_files(chunk), staging,
                                           save_images=save_images, device=device))
        atomic_write_text(staging / CSV_NAME, csv_text(predictions))
        _swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return predictions
