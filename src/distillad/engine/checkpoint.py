"""Run folders: `model.pt` (a plain state_dict) + `meta.json` (config, teacher, calibration, history, versions).

Checkpoints never pickle modules: they load with `weights_only=True`, and the model is rebuilt from the JSON config.
Every file is written to a temporary name and renamed, so an interrupted run never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import distillad
from distillad.engine.config import TrainConfig, config_from_dict
from distillad.engine.device import resolve_device
from distillad.methods import DistillationModel, build_model, method_class
from distillad.methods.base import MAP_OPTIONS
from distillad.scoring import AnomalyScorer, Calibration

MODEL_FILE = "model.pt"
META_FILE = "meta.json"
FORMAT_VERSION = 1


class RunError(RuntimeError):
    """A run folder that is missing, incomplete or unreadable; the message names the file."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, values: Any) -> None:
    atomic_write_text(path, json.dumps(values, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: Path, state: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def environment_versions() -> dict[str, str]:
    return {"distillad": distillad.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def save_run(run_dir: Path, model: DistillationModel, config: TrainConfig, calibration: Calibration | None,
             extra: dict[str, Any] | None = None) -> None:
    """Write model.pt first, then meta.json: a folder with meta.json is always complete."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save(run_dir / MODEL_FILE, state)
    meta = {
        "format_version": FORMAT_VERSION,
        "method": config.method,
        "teacher": {"backbone": config.backbone, "weights": config.weights, "channels": model.teacher.channels,
                    "input_mean": model.input_mean.flatten().tolist(), "input_std": model.input_std.flatten().tolist()},
        "config": config.to_dict(),
        "calibration": calibration.to_dict() if calibration else None,
        "versions": environment_versions(),
        **(extra or {}),
    }
    atomic_write_json(run_dir / META_FILE, meta)


@dataclass
class LoadedRun:
    run_dir: Path
    config: TrainConfig
    model: DistillationModel
    scorer: AnomalyScorer
    calibration: Calibration | None
    meta: dict[str, Any]
    batchnorm_folded: int = 0          # conv -> BN pairs folded for inference


def _apply_map_options(config: TrainConfig, map_options: dict[str, Any]) -> bool:
    """Put test-time map options into `config` (validated); True when any differs from the saved value."""
    not_map = sorted(set(map_options) - set(MAP_OPTIONS))
    if not_map:
        raise ValueError(f"only the map options {', '.join(MAP_OPTIONS)} can change after training; "
                         f"{', '.join(not_map)} would need a new training run")
    options_class = method_class(config.method).options_class
    saved = options_class.from_dict(config.options).to_dict()
    merged = {**saved, **map_options}
    options_class.from_dict(merged)   # raises ValueError on a bad value
    config.options = {**config.options, **map_options}
    return any(merged[key] != saved[key] for key in map_options)


def read_meta(run_dir: Path) -> dict[str, Any]:
    meta_path = run_dir / META_FILE
    if not run_dir.is_dir():
        raise RunError(f"run folder {run_dir} does not exist (train one with `distillad train --out {run_dir}`)")
    if not meta_path.is_file():
        raise RunError(f"{meta_path} is missing: {run_dir} is not a finished distillad run")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise RunError(f"{meta_path} is unreadable: {error}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise RunError(f"{meta_path} has format_version {meta.get('format_version')!r}; this distillad reads {FORMAT_VERSION}")
    return meta


def load_run(run_dir: str | Path, device: str | torch.device = "cpu",
             map_options: dict[str, Any] | None = None, fold_batchnorm: bool = True) -> LoadedRun:
    """Rebuild the model from meta.json and load model.pt with weights_only=True (no teacher download needed).

    `map_options` replaces saved options that only shape the anomaly map (MAP_OPTIONS: fusion rules, blur), to
    compare them on one trained model. The saved calibration was fitted to the saved map, so it is dropped when
    they change anything. `fold_batchnorm` folds BatchNorm into the convolutions for inference (checked on a probe:
    the maps do not change beyond float rounding).
    """
    run_dir = Path(run_dir)
    device = resolve_device(device)
    meta = read_meta(run_dir)
    try:
        config = config_from_dict(meta["config"])
    except (KeyError, ValueError, TypeError) as error:
        raise RunError(f"{run_dir / META_FILE} holds an invalid config: {error}") from None
    changed = _apply_map_options(config, map_options or {})
    model = build_model(config.method, config.backbone, config.options, pretrained=False)
    model_path = run_dir / MODEL_FILE
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunError(f"{model_path} is missing") from None
    except Exception as error:  # torch raises many types for corrupt files
        raise RunError(f"{model_path} is not a readable checkpoint: {error}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise RunError(f"{model_path} does not match the model described in {META_FILE}: {error}") from None
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format).eval()
    calibration = Calibration.from_dict(meta["calibration"]) if meta.get("calibration") and not changed else None
    scorer = AnomalyScorer(model, channels_last=config.channels_last).to(device).eval()
    folded = scorer.fold_batchnorm(config.image_size) if fold_batchnorm else 0
    return LoadedRun(run_dir=run_dir, config=config, model=model, scorer=scorer, calibration=calibration, meta=meta,
                     batchnorm_folded=folded)
