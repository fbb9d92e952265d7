"""The training loop: plain PyTorch, seeded, one loop for every method."""

from __future__ import annotations

import math
import random
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
from distillad.engine.preflight import check_free_space, check_output_folder, decode_all
from distillad.engine.resume import (
    StageProgress,
    fingerprint,
    open_work_dir,
    publish_run,
    random_state,
    restore_random_state,
    save_checkpoint,
    work_dir,
)
from distillad.errors import RunError
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


EpochCallback = Callable[[StageProgress], None]


def _run_stage(stage: TrainingStage, model: DistillationModel, config: TrainConfig, train_set: ImageDataset,
               device: torch.device, memory_format: torch.memory_format, progress: bool, prefix: str,
               log: Callable[[str], None], resumed: StageProgress | None = None,
               on_epoch: EpochCallback | None = None) -> dict[str, Any]:
    """One optimisation stage: its own optimizer, schedule and step budget; returns its history.

    `on_epoch` gets the stage's full state at the end of every epoch (to checkpoint it); `resumed`, such a state
    from an interrupted run, continues the stage after that epoch, drawing the same random numbers.
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
    history: list[dict[str, float]] = []
    first_epoch, earlier_seconds = 0, 0.0
    if resumed is not None:
        optimizer.load_state_dict(resumed.optimizer)
        scheduler.load_state_dict(resumed.scheduler)
        history, first_epoch, earlier_seconds = list(resumed.history), resumed.epoch, resumed.seconds
        if stage.load_state is not None and resumed.stage_state is not None:
            stage.load_state(resumed.stage_state)
    if first_epoch >= epochs:
        return {"name": stage.name, "epochs": epochs, "seconds": earlier_seconds, "history": history}
    log(f"{prefix}{epochs} epochs x {steps_per_epoch} steps, batch {batch_size}"
        + (f"; resuming after epoch {first_epoch}" if first_epoch else ""))
    start = time.perf_counter() - earlier_seconds
    use_cache = stage.cache_teacher and config.cache_teacher
    cache = teacher_cache(model, train_set, batch_size, device, memory_format) if use_cache else None
    if resumed is not None:   # after the cache, whose loader draws from torch's generator too
        restore_random_state(resumed.random, generator)
    bar = tqdm(total=epochs * steps_per_epoch, initial=first_epoch * steps_per_epoch, disable=not progress,
               unit="step", dynamic_ncols=True, desc=stage.name)
    for epoch in range(first_epoch, epochs):
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
                            img_s=f"{((epoch - first_epoch) * len(train_set) + seen) / max(elapsed - earlier_seconds, 1e-9):.1f}")
            bar.update(1)
        scheduler.step()
        history.append({"epoch": epoch + 1, "train_loss": epoch_loss / max(seen, 1),
                        "seconds": time.perf_counter() - start})
        if on_epoch is not None:
            on_epoch(StageProgress(
                epoch=epoch + 1, history=history, seconds=time.perf_counter() - start,
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                random=random_state(generator), stage_state=stage.state() if stage.state is not None else None))
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


MIN_CALIBRATION_IMAGES = 10


def calibration_warning(n_val: int, name: str) -> str | None:
    """Why the threshold of a run calibrated on `n_val` images is not to be trusted (None when it is).

    The threshold is mean + k std of the validation scores. The relative standard error of a standard deviation
    estimated from n scores is about 1 / sqrt(2 (n - 1)): 24 % at n = 10, 50 % at n = 3, undefined at n = 1 (the
    threshold is then the single score plus a floor). Below 10 images the threshold is mostly noise."""
    if n_val >= MIN_CALIBRATION_IMAGES:
        return None
    return (f"{name}: the threshold is calibrated on {n_val} defect-free validation image(s); below "
            f"{MIN_CALIBRATION_IMAGES} it is mostly noise (normal/defective labels are unreliable). Add training "
            "images or raise --val-fraction (scores and maps are unaffected)")


def train_run(config: TrainConfig, data: CategorySplit, run_dir: str | Path, *, progress: bool = True,
              overwrite: bool = False, resume: bool = False, log: Callable[[str], None] = print) -> TrainResult:
    """Train `config.method` on data.train, calibrate on data.val (defect-free only), save to run_dir.

    Everything that can be checked is checked before the first step: every image decodes, the run folder can be
    written, the disk has room. The run is trained in a work folder beside run_dir with a checkpoint at the end
    of every epoch; `resume` continues an interrupted run of the same settings and data from its last checkpoint
    to the same weights an uninterrupted run reaches. The finished run is moved into run_dir by renames, so
    run_dir holds the previous run or the new one, never a mix (engine/resume.py).
    """
    run_dir = Path(run_dir)
    check_output_folder(run_dir)
    check_run_dir_free(run_dir, overwrite)
    device = resolve_device(config.device)
    if not data.train:
        raise RunError(f"no defect-free training images in {data.name}")
    train_set = ImageDataset(data.train, config.image_size)
    val_set = ImageDataset(data.val, config.image_size)
    decode_all(train_set, "training")
    decode_all(val_set, "validation")
    seed_everything(config.seed)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = build_model(config.method, config.backbone, config.options, pretrained=True,
                        weights=config.weights).to(device, memory_format=memory_format)
    check_free_space(run_dir.parent, model)
    identity = fingerprint(config.to_dict(), [str(s.path) for s in data.train], [str(s.path) for s in data.val])
    work = work_dir(run_dir)
    checkpoint = open_work_dir(run_dir, identity, resume=resume, overwrite=overwrite, log=log)
    if checkpoint is not None:
        model.load_state_dict(checkpoint.model)
    stages = model.training_stages()
    log(f"training {config.method} ({config.backbone} teacher) on {len(train_set)} images of {data.name}, "
        f"{len(val_set)} held out; {config.image_size}px, device {device}")
    warning = calibration_warning(len(val_set), data.name) if len(val_set) else None
    stage_reports: list[dict[str, Any]] = list(checkpoint.reports) if checkpoint is not None else []
    for index, stage in enumerate(stages):
        if index < len(stage_reports):
            log(f"stage {index + 1} ({stage.name}) finished before the interruption")
            continue
        prefix = f"stage {index + 1}/{len(stages)} ({stage.name}): " if len(stages) > 1 else ""
        seed_everything(config.seed + index)
        resumed = checkpoint.progress if checkpoint is not None and checkpoint.stage == index else None

        def on_epoch(state: StageProgress, index: int = index) -> None:
            save_checkpoint(work, identity, model, index, state, stage_reports)

        report = _run_stage(stage, model, config, train_set, device, memory_format, progress, prefix, log,
                            resumed=resumed, on_epoch=on_epoch)
        stage_reports.append(report)
        if stage.is_fit:   # a fit stage has no epochs; checkpoint its result before calibration
            save_checkpoint(work, identity, model, index + 1, StageProgress(0, [], 0.0), stage_reports)
    train_seconds = sum(r["seconds"] for r in stage_reports)

    model.eval()
    if len(val_set) == 0:
        warning = (f"{data.name}: no held-out defect-free images (val_fraction=0); calibrating on the training "
                   "images, which makes the threshold optimistic")
        calibration_set, calibration_source = train_set, "train"
    else:
        calibration_set, calibration_source = val_set, "validation"
    if warning:
        warnings.warn(warning, stacklevel=2)
    val_loss = mean_loss(model, val_set, config.batch_size, device)
    save_model(work, model)
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
        "warnings": [warning] if warning else [],
        "training": {"seconds": train_seconds, "epochs": stage_reports[-1]["epochs"],
                     "final_train_loss": history[-1]["train_loss"], "val_loss": val_loss,
                     "calibration_source": calibration_source, "history": history,
                     "resumed": checkpoint is not None,
                     "stages": [{k: v for k, v in r.items() if k != "history"} for r in stage_reports]},
    }
    write_meta(work, model, config, calibration, extra)
    publish_run(work, run_dir, (MODEL_FILE, META_FILE), META_FILE)
    log(f"trained in {train_seconds:.1f} s; validation loss {val_loss:.4f}; threshold {calibration.threshold:.4f} "
        f"(mean + {config.threshold_k:g} std of {calibration.n_images} {calibration_source} scores); saved {run_dir}")
    return TrainResult(run_dir=run_dir, model=model, calibration=calibration, seconds=train_seconds, history=history)
