"""The training loop: plain PyTorch, seeded, one loop for every method."""

from __future__ import annotations

import json
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from distillad.data import CategorySplit, ImageDataset
from distillad.engine.checkpoint import META_FILE, MODEL_FILE, save_model, write_meta
from distillad.engine.config import OptimizerConfig, TrainConfig
from distillad.engine.device import resolve_device
from distillad.engine.calibrate import fit_normal_statistics
from distillad.errors import RunError
from distillad.io import atomic_torch_save, atomic_write_json
from distillad.methods import DistillationModel, build_model
from distillad.methods.base import FitContext, TrainingStage
from distillad.scoring import Calibration, make_scorer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(config: OptimizerConfig, parameters) -> torch.optim.Optimizer:
    params = list(parameters)
    if config.name == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, config: OptimizerConfig, epochs: int):
    milestones = sorted({max(1, int(round(f * epochs))) for f in config.milestones if 0 < f < 1})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=config.gamma)


def check_run_dir_free(run_dir: Path, overwrite: bool) -> None:
    """Refuse to replace a finished run unless asked: a user's trained model is never lost silently."""
    existing = [name for name in (MODEL_FILE, META_FILE) if (run_dir / name).exists()]
    if existing and not overwrite:
        raise RunError(f"{run_dir} already holds a trained run ({', '.join(existing)}); "
                       "choose another --out or pass --overwrite")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"--out {run_dir} exists and is not a folder")


STAGE_FOLDER = "stages"


@dataclass
class TrainResult:
    run_dir: Path
    model: DistillationModel           # the trained model, BatchNorm folded for inference (model.pt holds it unfolded)
    calibration: Calibration
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def mean_loss(model: DistillationModel, dataset: ImageDataset, batch_size: int, device: torch.device) -> float:
    """Training loss on defect-free held-out images (eval mode): a label-free view of convergence."""
    if len(dataset) == 0:
        return float("nan")
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size):
            images = batch["image"].to(device)
            total += float(model.training_loss(images)) * images.shape[0]
            count += images.shape[0]
    return total / count


def teacher_cache(model: DistillationModel, dataset: ImageDataset, batch_size: int, device: torch.device,
                  memory_format: torch.memory_format = torch.contiguous_format) -> list[torch.Tensor]:
    """The frozen teacher's features of every training image, per level (N,C,h,w), in dataset order.

    Without augmentation the teacher sees the same images every epoch, so computing them once removes the
    teacher's forward pass from every training step."""
    levels: list[list[torch.Tensor]] = []
    model.eval()
    for batch in DataLoader(dataset, batch_size=batch_size):
        images = batch["image"].to(device).contiguous(memory_format=memory_format)
        levels.append(model.teacher_features(images))
    return [torch.cat(parts) for parts in zip(*levels)]


def _stage_file(run_dir: Path, index: int, stage: TrainingStage) -> Path:
    return run_dir / STAGE_FOLDER / f"{index + 1}_{stage.name}.pt"


def _try_resume_stage(run_dir: Path, index: int, stage: TrainingStage, model: DistillationModel,
                      config: TrainConfig, log: Callable[[str], None]) -> dict[str, Any] | None:
    """Load a finished stage saved by an interrupted run with the same config; None when there is none."""
    path = _stage_file(run_dir, index, stage)
    info_path = path.with_suffix(".json")
    if not (path.is_file() and info_path.is_file()):
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("config") != config.to_dict():
        log(f"  ignoring {path}: saved with a different configuration")
        return None
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    log(f"stage {index + 1} ({stage.name}) resumed from {path}")
    return info


def _run_stage(stage: TrainingStage, model: DistillationModel, config: TrainConfig, train_set: ImageDataset,
               device: torch.device, memory_format: torch.memory_format, progress: bool, prefix: str,
               log: Callable[[str], None]) -> dict[str, Any]:
    """One optimisation stage: its own optimizer, schedule and step budget; returns its history.

    A fit stage (`stage.fit`, e.g. PatchCore's memory bank) gets one pass over the training images instead: no
    optimizer (a model without trainable parameters must not make one), no gradients, one history entry."""
    if stage.is_fit:
        return _run_fit_stage(stage, model, config, train_set, device, memory_format, progress, prefix, log)
    batch_size = min(config.batch_size, len(train_set))
    generator = torch.Generator().manual_seed(config.seed)
    # BatchNorm cannot train on a batch of one: drop a trailing single image.
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator,
                        drop_last=len(train_set) % batch_size == 1 and len(train_set) > 1)
    optimizer_config = stage.optimizer or config.optimizer
    steps_per_epoch = len(loader)
    epochs = max(1, round(config.epochs_for(steps_per_epoch) * stage.length_ratio))
    optimizer = make_optimizer(optimizer_config, stage.parameters())
    scheduler = make_scheduler(optimizer, optimizer_config, epochs)
    log(f"{prefix}{epochs} epochs x {steps_per_epoch} steps, batch {batch_size}")
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    use_cache = stage.cache_teacher and config.cache_teacher
    cache = teacher_cache(model, train_set, batch_size, device, memory_format) if use_cache else None
    bar = tqdm(total=epochs * steps_per_epoch, disable=not progress, unit="step", dynamic_ncols=True,
               desc=stage.name)
    for epoch in range(epochs):
        model.train()
        stage.on_train(model)
        epoch_loss, seen = 0.0, 0
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            teacher = [level[batch["index"].to(device)] for level in cache] if cache is not None else None
            loss = stage.loss(images, teacher)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                bar.close()
                raise RunError(f"the {stage.name} loss became {loss_value} at epoch {epoch + 1}: lower the "
                               f"learning rate (now {optimizer_config.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += loss_value * images.shape[0]
            seen += images.shape[0]
            elapsed = time.perf_counter() - start
            bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{loss_value:.4f}",
                            img_s=f"{(epoch * len(train_set) + seen) / max(elapsed, 1e-9):.1f}")
            bar.update(1)
        scheduler.step()
        history.append({"epoch": epoch + 1, "train_loss": epoch_loss / max(seen, 1),
                        "seconds": time.perf_counter() - start})
        if not progress and (epoch + 1) % max(1, epochs // 10) == 0:
            log(f"  {stage.name} epoch {epoch + 1}/{epochs}: loss {history[-1]['train_loss']:.4f}, "
                f"{history[-1]['seconds']:.0f} s")
    bar.close()
    return {"name": stage.name, "epochs": epochs, "seconds": time.perf_counter() - start, "history": history}


def _run_fit_stage(stage: TrainingStage, model: DistillationModel, config: TrainConfig, train_set: ImageDataset,
                   device: torch.device, memory_format: torch.memory_format, progress: bool, prefix: str,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """A non-gradient stage: `stage.fit` sees every training image once, in dataset order, in batches of the run's
    batch size, on its device, with the model in eval mode and no autograd; its time is the stage's time."""
    batch_size = min(config.batch_size, len(train_set))
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=False)
    log(f"{prefix}one pass over {len(train_set)} images, batch {batch_size} (no optimizer)")
    bar = tqdm(total=len(loader), disable=not progress, unit="batch", dynamic_ncols=True, desc=stage.name)
    start = time.perf_counter()

    def batches():
        seen = 0
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            yield images
            seen += images.shape[0]
            bar.set_postfix(img_s=f"{seen / max(time.perf_counter() - start, 1e-9):.1f}")
            bar.update(1)

    model.eval()
    try:
        with torch.no_grad():
            result = stage.fit(FitContext(batches=batches(), n_images=len(train_set), seed=config.seed, device=device,
                                          progress=progress, log=log)) or {}
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    entry = {"epoch": 1, "train_loss": float(result.get("train_loss", float("nan"))), "seconds": seconds}
    entry.update({key: value if isinstance(value, int) and not isinstance(value, bool) else float(value)
                  for key, value in result.items() if key not in entry})
    log(f"  {stage.name}: " + ", ".join(f"{key} {value}" if isinstance(value, int) else f"{key} {value:.4g}"
                                         for key, value in entry.items() if key != "epoch"))
    return {"name": stage.name, "epochs": 1, "seconds": seconds, "history": [entry]}


def train_run(config: TrainConfig, data: CategorySplit, run_dir: str | Path, *, progress: bool = True,
              overwrite: bool = False, log: Callable[[str], None] = print) -> TrainResult:
    """Train `config.method` on data.train, calibrate on data.val (defect-free only), save to run_dir.

    Multi-stage methods (AAND) save each finished stage under run_dir/stages/; a rerun with the same config
    resumes after the last finished stage. The stage files are removed once the run is complete.
    """
    run_dir = Path(run_dir)
    check_run_dir_free(run_dir, overwrite)
    device = resolve_device(config.device)
    if not data.train:
        raise RunError(f"no defect-free training images in {data.name}")
    seed_everything(config.seed)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = build_model(config.method, config.backbone, config.options, pretrained=True,
                        weights=config.weights).to(device, memory_format=memory_format)
    train_set = ImageDataset(data.train, config.image_size)
    val_set = ImageDataset(data.val, config.image_size)
    stages = model.training_stages()
    log(f"training {config.method} ({config.backbone} teacher) on {len(train_set)} images of {data.name}, "
        f"{len(val_set)} held out; {config.image_size}px, device {device}")
    stage_reports: list[dict[str, Any]] = []
    for index, stage in enumerate(stages):
        prefix = f"stage {index + 1}/{len(stages)} ({stage.name}): " if len(stages) > 1 else ""
        last = index == len(stages) - 1
        resumed = None if last else _try_resume_stage(run_dir, index, stage, model, config, log)
        if resumed is not None:
            stage_reports.append(resumed["report"])
            continue
        seed_everything(config.seed + index)
        report = _run_stage(stage, model, config, train_set, device, memory_format, progress, prefix, log)
        stage_reports.append(report)
        if not last:
            path = _stage_file(run_dir, index, stage)
            atomic_torch_save(path, {k: v.detach().cpu() for k, v in model.state_dict().items()})
            atomic_write_json(path.with_suffix(".json"), {"config": config.to_dict(), "report": report})
    train_seconds = sum(r["seconds"] for r in stage_reports)

    model.eval()
    if len(val_set) == 0:
        warnings.warn(f"{data.name}: no held-out defect-free images (val_fraction=0); calibrating on the training "
                      "images, which makes the threshold optimistic", stacklevel=2)
        calibration_set, calibration_source = train_set, "train"
    else:
        calibration_set, calibration_source = val_set, "validation"
    val_loss = mean_loss(model, val_set, config.batch_size, device)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_model(run_dir, model)
    # Calibrate through the scorer test and predict use (BatchNorm folded: this changes `model` in place, so it
    # comes after saving the trained weights).
    scorer, _ = make_scorer(model, channels_last=config.channels_last, image_size=config.image_size)
    calibration, map_statistics, val_scores = fit_normal_statistics(
        scorer, calibration_set, threshold_k=config.threshold_k, batch_size=config.batch_size, device=device)
    history = stage_reports[-1]["history"]
    extra: dict[str, Any] = {
        "data": {"name": data.name, "n_train": len(train_set), "n_val": len(val_set),
                 "val_files": [str(s.path) for s in data.val]},
        "map_statistics": map_statistics,
        "calibration_scores": [float(s) for s in val_scores],
        "training": {"seconds": train_seconds, "epochs": stage_reports[-1]["epochs"],
                     "final_train_loss": history[-1]["train_loss"], "val_loss": val_loss,
                     "calibration_source": calibration_source, "history": history,
                     "stages": [{k: v for k, v in r.items() if k != "history"} for r in stage_reports]},
    }
    write_meta(run_dir, model, config, calibration, extra)
    shutil.rmtree(run_dir / STAGE_FOLDER, ignore_errors=True)
    log(f"trained in {train_seconds:.1f} s; validation loss {val_loss:.4f}; threshold {calibration.threshold:.4f} "
        f"(mean + {config.threshold_k:g} std of {calibration.n_images} {calibration_source} scores); saved {run_dir}")
    return TrainResult(run_dir=run_dir, model=model, calibration=calibration, seconds=train_seconds, history=history)
