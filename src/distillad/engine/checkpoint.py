"""Run folders: `model.pt` (a plain state_dict) + `meta.json` (config, teacher, calibration, history, versions).

Checkpoints never pickle modules: they load with `weights_only=True`, and the model is rebuilt from the JSON config.
Every file is written to a temporary name and renamed, so an interrupted run never leaves a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import distillad
from distillad.engine.config import TrainConfig, config_from_dict
from distillad.engine.device import resolve_device
from distillad.engine.calibrate import apply_map_statistics, fit_normal_statistics
from distillad.errors import ConfigError, DistilladError, RunError
from distillad.io import atomic_torch_save, atomic_write_json
from distillad.methods import DistillationModel, build_model, method_class
from distillad.methods.base import MAP_OPTIONS, METHODS
from distillad.scoring import AnomalyScorer, Calibration, make_scorer

MODEL_FILE = "model.pt"
META_FILE = "meta.json"
FORMAT_VERSION = 1


def environment_versions() -> dict[str, str]:
    return {"distillad": distillad.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_run(run_dir: Path, model: DistillationModel, config: TrainConfig, calibration: Calibration | None,
             extra: dict[str, Any] | None = None) -> None:
    """Write model.pt first, then meta.json with model.pt's sha256: meta.json vouches for the model beside it."""
    save_model(run_dir, model)
    write_meta(run_dir, model, config, calibration, extra)


def save_model(run_dir: Path, model: DistillationModel) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save(run_dir / MODEL_FILE, state)


def write_meta(run_dir: Path, model: DistillationModel, config: TrainConfig, calibration: Calibration | None,
               extra: dict[str, Any] | None = None) -> None:
    """meta.json for the model.pt already in run_dir (its hash is recorded, so a mismatched pair never loads)."""
    meta = {
        "format_version": FORMAT_VERSION,
        "method": config.method,
        "model_sha256": file_sha256(run_dir / MODEL_FILE),
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
        raise ConfigError(f"only the map options {', '.join(MAP_OPTIONS)} can change after training; "
                         f"{', '.join(not_map)} would need a new training run")
    options_class = method_class(config.method).options_class
    saved = options_class.from_dict(config.options).to_dict()
    merged = {**saved, **map_options}
    options_class.from_dict(merged, source="map options")   # raises ConfigError on a bad value
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
    if not isinstance(meta, dict):
        raise RunError(f"{meta_path} is not a JSON object: not a distillad run")
    if meta.get("format_version") != FORMAT_VERSION:
        raise RunError(f"{meta_path} has format_version {meta.get('format_version')!r}; this distillad reads {FORMAT_VERSION}")
    return meta


def _recalibrate(run_dir: Path, meta: dict[str, Any], config: TrainConfig, scorer: AnomalyScorer,
                 device: torch.device) -> Calibration | None:
    """Fit the normal statistics of a changed map rule on the run's own validation images, when they are still
    there; otherwise there is no threshold (and a normalised map cannot be computed at all)."""
    from distillad.data import ImageDataset, Sample

    val_files = [Path(p) for p in (meta.get("data") or {}).get("val_files") or []]
    if not val_files or not all(p.is_file() for p in val_files):
        if scorer.map_norm != "none" or scorer.position_norm != "none":
            raise RunError("map_norm and position_norm need the run's defect-free validation images, listed in "
                           f"{run_dir / META_FILE}; they are missing")
        return None
    dataset = ImageDataset([Sample(p, 0, "good", None) for p in val_files], config.image_size, resize=config.resize)
    calibration, _, _ = fit_normal_statistics(scorer, dataset, threshold=config.threshold(),
                                              batch_size=config.batch_size, device=device)
    return calibration


def _state_mismatch(model: DistillationModel, state: dict[str, Any]) -> str | None:
    """A short description of the tensors `state` lacks or has in excess for `model`, or None when none."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        return f"{len(missing)} missing and {len(unexpected)} unexpected tensors, e.g. {(missing + unexpected)[0]}"
    return None


# Training settings added since the first runs were saved, with the value those runs were built with.
LEGACY_CONFIG_DEFAULTS: dict[str, Any] = {"resize": "stretch"}


def with_legacy_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the values its run was built with for settings and options added since
    (LEGACY_CONFIG_DEFAULTS, the method's `legacy_defaults`), so that a newer default never silently changes an
    older run, and an older benchmark cell still compares equal to the config it was trained with."""
    if not isinstance(saved, dict):
        return saved
    saved = {**LEGACY_CONFIG_DEFAULTS, **saved}
    method = METHODS.get(saved.get("method"))
    legacy = method.options_class.legacy_defaults if method is not None else {}
    if not legacy or not isinstance(saved.get("options", {}), dict):
        return saved
    return {**saved, "options": {**legacy, **saved.get("options", {})}}


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
        config = config_from_dict(with_legacy_defaults(meta["config"]))
        if "threshold_rule" not in meta["config"]:      # calibrated before the rule existed: mean + k std
            config.threshold_rule = "mean_std"
    except (KeyError, TypeError, DistilladError) as error:
        raise RunError(f"{run_dir / META_FILE} holds an invalid config: {error}") from None
    changed = _apply_map_options(config, map_options or {})
    model = build_model(config.method, config.backbone, config.options, pretrained=False)
    model_path = run_dir / MODEL_FILE
    if not model_path.is_file():
        raise RunError(f"{model_path} is missing")
    expected = meta.get("model_sha256")
    if expected is not None and file_sha256(model_path) != expected:
        raise RunError(f"{model_path} is not the model {META_FILE} was written for (sha256 differs): the run folder "
                       "was changed or a write was interrupted; train it again")
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt files
        raise RunError(f"{model_path} is not a readable checkpoint: {error}") from None
    mismatch = _state_mismatch(model, state) if isinstance(state, dict) else "it is not a state_dict"
    if mismatch:
        raise RunError(f"{model_path} does not match the model described in {META_FILE} ({mismatch}): the run "
                       "folder mixes files of different runs; train it again")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:   # a shape mismatch: torch's message spans lines, keep its first detail
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise RunError(f"{model_path} does not match the model described in {META_FILE} ({detail[:300]})") from None
    model.to(device)
    scorer, folded = make_scorer(model, channels_last=config.channels_last, image_size=config.image_size,
                                 fold_batchnorm=fold_batchnorm)
    if changed:
        calibration = _recalibrate(run_dir, meta, config, scorer, device)
    else:
        try:
            calibration = Calibration.from_dict(meta["calibration"]) if meta.get("calibration") else None
            apply_map_statistics(scorer, meta.get("map_statistics"))
        except (TypeError, ValueError, KeyError) as error:
            raise RunError(f"{run_dir / META_FILE} holds an invalid calibration: {error}") from None
    return LoadedRun(run_dir=run_dir, config=config, model=model, scorer=scorer, calibration=calibration, meta=meta,
                     batchnorm_folded=folded)
