"""The training loop: plain PyTorch, seeded, one loop for every method."""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from distillad.data import CategorySplit, ImageDataset
from distillad.engine.checkpoint import META_FILE, MODEL_FILE, save_model, write_meta
from distillad.engine.config import OptimizerConfig, TrainConfig
from distillad.engine.device import resolve_device
from distillad.engine.calibrate import fit_normal_statistics
from distillad.engine.preflight import check_free_space, check_output_folder, decode_all
from distillad.engine.resume import (
    Checkpoint,
    StageProgress,
    fingerprint,
    open_work_dir,
    publish_run,
    random_state,
    restore_random_state,
    save_checkpoint,
    training_lock,
    work_dir,
)
from distillad.errors import ConfigError, RunError
from distillad.methods import DistillationModel, build_model
from distillad.methods.base import FitContext, TrainingStage
from distillad.scale import ddp
from distillad.scale.ddp import SINGLE_PROCESS, DistributedContext
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


def mean_loss(model: DistillationModel, dataset: ImageDataset, batch_size: int, device: torch.device,
              memory_format: torch.memory_format = torch.contiguous_format) -> float:
    """Training loss on defect-free held-out images (eval mode): a label-free view of convergence.

    Batches are built by hand, not by a DataLoader, whose iterator draws a seed from torch's global generator:
    measuring must not change the random numbers training draws next (resume and DDP rely on them)."""
    if len(dataset) == 0:
        return float("nan")
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            images = torch.stack([dataset[i]["image"] for i in range(start, min(start + batch_size, len(dataset)))])
            images = images.to(device).contiguous(memory_format=memory_format)
            total += float(model.training_loss(images)) * images.shape[0]
    return total / len(dataset)


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


def distributed_teacher_cache(model: DistillationModel, dataset: ImageDataset, batch_size: int,
                              device: torch.device, memory_format: torch.memory_format,
                              dist: DistributedContext) -> list[torch.Tensor]:
    """`teacher_cache` under torchrun: each rank computes the teacher's features of its contiguous share of the
    images, then all ranks gather the shares, so every rank holds the whole cache in dataset order (the shuffled
    sampler gives a rank other images each epoch) for a 1/world share of the teacher's work."""
    start, stop = ddp.shard_bounds(len(dataset), dist)
    levels = teacher_cache(model, Subset(dataset, range(start, stop)), batch_size, device, memory_format)
    return ddp.gather_shards(levels, len(dataset), dist)


def _distributed_loader(train_set: ImageDataset, global_batch: int, config: TrainConfig, generator: torch.Generator,
                        dist: DistributedContext) -> tuple[DataLoader, DistributedSampler]:
    """Each rank's share of every global batch: batch_size / world images per step, the images sharded by a
    seeded DistributedSampler (padded so every rank takes the same number of steps, the steps of one process)."""
    batch = ddp.per_rank_batch(global_batch, dist.world_size)
    sampler = DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                 seed=config.seed, drop_last=False)
    # As in one process, BatchNorm gets no trailing batch of one image (here: per process).
    loader = DataLoader(train_set, batch_size=batch, sampler=sampler, generator=generator,
                        drop_last=len(sampler) % batch == 1 and len(sampler) > 1)
    return loader, sampler


EpochCallback = Callable[[StageProgress], None]


def _run_stage(stage: TrainingStage, model: DistillationModel, config: TrainConfig, train_set: ImageDataset,
               device: torch.device, memory_format: torch.memory_format, progress: bool, prefix: str,
               log: Callable[[str], None], resumed: StageProgress | None = None,
               on_epoch: EpochCallback | None = None, dist: DistributedContext = SINGLE_PROCESS,
               val_set: ImageDataset | None = None) -> dict[str, Any]:
    """One optimisation stage: its own optimizer, schedule and step budget; returns its history.

    With `val_set`, about ten epochs' history entries (every tenth of the stage, and the last) also hold `val_loss`,
    the stage's loss on those defect-free held-out images: a convergence curve for a few per cent of the training
    time. Only when the stage trains the model's own distillation loss (a preparatory stage, e.g. AAND's
    amplification, trains another objective, for which that number says nothing).

    `on_epoch` gets the stage's full state at the end of every epoch (to checkpoint it); `resumed`, such a state
    from an interrupted run, continues the stage after that epoch, drawing the same random numbers.
    A fit stage (`stage.fit`, e.g. PatchCore's memory bank) gets one pass over the training images instead: no
    optimizer (a model without trainable parameters must not make one), no gradients, one history entry.

    Under torchrun (`dist`, see `distillad.scale.ddp`) the stage's loss runs in DDP on each rank's share of the
    global batch, the logged loss is the global mean, and a fit stage runs on rank 0 while the others wait."""
    if stage.is_fit:
        if not dist.enabled:
            return _run_fit_stage(stage, model, config, train_set, device, memory_format, progress, prefix, log)
        log(f"{prefix}a fit stage runs in process 0 over every image; {dist.world_size - 1} other(s) wait")
        report = (_run_fit_stage(stage, model, config, train_set, device, memory_format, progress, prefix, log)
                  if dist.is_main else None)
        ddp.sync_state(model, dist)
        return ddp.broadcast_object(report, dist)
    batch_size = min(config.batch_size, len(train_set))
    generator = torch.Generator().manual_seed(config.seed)
    sampler: DistributedSampler | None = None
    if dist.enabled:
        loader, sampler = _distributed_loader(train_set, batch_size, config, generator, dist)
    else:
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
    resumed_random = resumed_stage_state = None
    if resumed is not None:
        optimizer.load_state_dict(resumed.optimizer)
        scheduler.load_state_dict(resumed.scheduler)
        history, first_epoch, earlier_seconds = list(resumed.history), resumed.epoch, resumed.seconds
        resumed_random, resumed_stage_state = resumed.random, resumed.stage_state
        if dist.enabled:   # a distributed checkpoint holds every rank's own random state
            resumed_random = resumed_random["per_rank"][dist.rank]
            resumed_stage_state = resumed_stage_state["per_rank"][dist.rank] if resumed_stage_state else None
        if stage.load_state is not None and resumed_stage_state is not None:
            stage.load_state(resumed_stage_state)
    if first_epoch >= epochs:
        return {"name": stage.name, "epochs": epochs, "seconds": earlier_seconds, "history": history}
    log(f"{prefix}{epochs} epochs x {steps_per_epoch} steps, batch {batch_size}"
        + (f" ({loader.batch_size} in each of {dist.world_size} processes)" if dist.enabled else "")
        + (f"; resuming after epoch {first_epoch}" if first_epoch else ""))
    start = time.perf_counter() - earlier_seconds
    use_cache = stage.cache_teacher and config.cache_teacher
    if use_cache and dist.enabled:
        cache = distributed_teacher_cache(model, train_set, loader.batch_size or 1, device, memory_format, dist)
    else:
        cache = teacher_cache(model, train_set, batch_size, device, memory_format) if use_cache else None
    if resumed is not None:   # after the cache, whose loader draws from torch's generator too
        restore_random_state(resumed_random, generator)
    compute_loss = (ddp.wrap_stage(model, stage.loss, stage.parameters(), device,
                                   skips_parameters=stage.skips_parameters)
                    if dist.enabled else stage.loss)
    held_out = val_set if val_set is not None and len(val_set) and stage.loss == model.training_loss else None
    bar = tqdm(total=epochs * steps_per_epoch, initial=first_epoch * steps_per_epoch, disable=not progress,
               unit="step", dynamic_ncols=True, desc=stage.name)
    for epoch in range(first_epoch, epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        stage.on_train(model)
        epoch_loss, seen = 0.0, 0
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            teacher = [level[batch["index"].to(device)] for level in cache] if cache is not None else None
            loss = compute_loss(images, teacher)
            loss_value, batch_images = float(loss.detach()), images.shape[0]
            if dist.enabled:   # every rank sees the global loss, so a non-finite one stops them all
                loss_value, batch_images = ddp.global_mean(loss_value, batch_images, device)
            if not math.isfinite(loss_value):
                bar.close()
                raise RunError(f"the {stage.name} loss became {loss_value} at epoch {epoch + 1}: lower the "
                               f"learning rate (now {optimizer_config.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += loss_value * batch_images
            seen += batch_images
            elapsed = time.perf_counter() - start
            bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{loss_value:.4f}",
                            img_s=f"{((epoch - first_epoch) * len(train_set) + seen) / max(elapsed - earlier_seconds, 1e-9):.1f}")
            bar.update(1)
        scheduler.step()
        entry = {"epoch": epoch + 1, "train_loss": epoch_loss / max(seen, 1), "seconds": time.perf_counter() - start}
        if dist.enabled:   # rank 0's running statistics everywhere, before anything evaluates the model
            ddp.sync_buffers(model)
        reported = (epoch + 1) % max(1, epochs // 10) == 0 or epoch + 1 == epochs
        if held_out is not None and reported:   # every rank: the same weights on the same images, the same number
            entry["val_loss"] = mean_loss(model, held_out, batch_size, device, memory_format)
            bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{entry['train_loss']:.4f}",
                            val_loss=f"{entry['val_loss']:.4f}")
        history.append(entry)
        random, stage_state = random_state(generator), stage.state() if stage.state is not None else None
        if dist.enabled:   # every rank's random state into the checkpoint
            gathered = ddp.all_gather_object((random, stage_state), dist)
            random = {"per_rank": [rank_random for rank_random, _ in gathered]}
            stage_state = {"per_rank": [rank_state for _, rank_state in gathered]} if stage_state is not None else None
        if on_epoch is not None:
            on_epoch(StageProgress(
                epoch=epoch + 1, history=history, seconds=time.perf_counter() - start,
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                random=random, stage_state=stage_state))
        if not progress and reported:
            val = f", validation loss {entry['val_loss']:.4f}" if "val_loss" in entry else ""
            log(f"  {stage.name} epoch {epoch + 1}/{epochs}: loss {entry['train_loss']:.4f}{val}, "
                f"{entry['seconds']:.0f} s")
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

    The threshold comes from the spread of the validation scores (a fitted tail, or mean + k std). The relative
    standard error of a standard deviation estimated from n scores is about 1 / sqrt(2 (n - 1)): 24 % at n = 10, 50 %
    at n = 3, undefined at n = 1 (the threshold is then the single score plus a floor). Below 10 images the threshold
    is mostly noise."""
    if n_val >= MIN_CALIBRATION_IMAGES:
        return None
    return (f"{name}: the threshold is calibrated on {n_val} defect-free validation image(s); below "
            f"{MIN_CALIBRATION_IMAGES} it is mostly noise (normal/defective labels are unreliable). Add training "
            "images or raise --val-fraction (scores and maps are unaffected)")


def train_run(config: TrainConfig, data: CategorySplit, run_dir: str | Path, *, progress: bool = True,
              overwrite: bool = False, resume: bool = False, log: Callable[[str], None] = print) -> TrainResult | None:
    """Train `config.method` on data.train, calibrate on data.val (defect-free only), save to run_dir.

    Everything that can be checked is checked before the first step: every image decodes, the run folder can be
    written, the disk has room. The run is trained in a work folder beside run_dir with a checkpoint at the end
    of every epoch; `resume` continues an interrupted run of the same settings and data from its last checkpoint
    to the same weights an uninterrupted run reaches. The finished run is moved into run_dir by renames, so
    run_dir holds the previous run or the new one, never a mix (engine/resume.py).

    Under torchrun (WORLD_SIZE > 1) this process is one rank of a data-parallel training (`distillad.scale.ddp`):
    rank 0 logs, checkpoints, calibrates and publishes the run and returns its result; the others return None once
    the run is published.
    """
    dist = ddp.context_from_environment()
    with ExitStack() as held:   # the run folder's training lock, taken when the work folder is opened
        if not dist.enabled:
            return _train_run(config, data, Path(run_dir), progress, overwrite, resume, log, SINGLE_PROCESS, None,
                              held)
        device, created = ddp.start(dist, resolve_device(config.device))
        try:
            if not dist.is_main:
                progress, log = False, _silent
            return _train_run(config, data, Path(run_dir), progress, overwrite, resume, log, dist, device, held)
        finally:
            ddp.stop(created)


def _silent(message: str) -> None:
    """The log of every rank but 0."""


def _train_run(config: TrainConfig, data: CategorySplit, run_dir: Path, progress: bool, overwrite: bool,
               resume: bool, log: Callable[[str], None], dist: DistributedContext,
               rank_device: torch.device | None, held: ExitStack) -> TrainResult | None:
    """`train_run` in one process (`dist` SINGLE_PROCESS) or as one rank on `rank_device` under torchrun. The
    process that opens the work folder (rank 0) first takes run_dir's training lock into `held`, so no other
    process trains run_dir until the caller leaves `held`, after the run is published."""

    def preflight() -> tuple[torch.device, ImageDataset, ImageDataset]:
        check_output_folder(run_dir)
        check_run_dir_free(run_dir, overwrite)
        device = rank_device or resolve_device(config.device)
        if not data.train:
            raise RunError(f"no defect-free training images in {data.name}")
        if len(data.train) < dist.world_size:
            raise ConfigError(f"{len(data.train)} training image(s) cannot be shared by {dist.world_size} processes")
        if dist.enabled:
            ddp.per_rank_batch(min(config.batch_size, len(data.train)), dist.world_size)
        train_set = ImageDataset(data.train, config.image_size, resize=config.resize)
        val_set = ImageDataset(data.val, config.image_size, resize=config.resize)
        decode_all(train_set, "training")
        decode_all(val_set, "validation")
        return device, train_set, val_set

    device, train_set, val_set = ddp.agree(dist, preflight) if dist.enabled else preflight()
    seed_everything(config.seed)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = build_model(config.method, config.backbone, config.options, pretrained=True,
                        weights=config.weights).to(device, memory_format=memory_format)
    # The world size is part of what a checkpoint must match: each rank's random state is saved in it.
    settings = config.to_dict() if not dist.enabled else {**config.to_dict(), "world_size": dist.world_size}
    identity = fingerprint(settings, [str(s.path) for s in data.train], [str(s.path) for s in data.val])
    work = work_dir(run_dir)

    def open_work() -> Checkpoint | None:
        held.enter_context(training_lock(run_dir))
        check_free_space(run_dir.parent, model)
        return open_work_dir(run_dir, identity, resume=resume, overwrite=overwrite, log=log)

    if dist.enabled:   # rank 0 owns the work folder; every rank continues from its checkpoint
        checkpoint = ddp.broadcast_object(ddp.agree(dist, open_work if dist.is_main else lambda: None), dist)
    else:
        checkpoint = open_work()
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
        # Rank 0 keeps the seed of one process; other ranks draw other (reproducible) random numbers.
        seed_everything(ddp.rank_seed(config.seed + index, dist.rank))
        resumed = checkpoint.progress if checkpoint is not None and checkpoint.stage == index else None

        def on_epoch(state: StageProgress, index: int = index) -> None:
            if dist.is_main:
                save_checkpoint(work, identity, model, index, state, stage_reports)

        report = _run_stage(stage, model, config, train_set, device, memory_format, progress, prefix, log,
                            resumed=resumed, on_epoch=on_epoch, dist=dist, val_set=val_set)
        stage_reports.append(report)
        if stage.is_fit and dist.is_main:   # a fit stage has no epochs; checkpoint its result before calibration
            save_checkpoint(work, identity, model, index + 1, StageProgress(0, [], 0.0), stage_reports)
    train_seconds = sum(r["seconds"] for r in stage_reports)
    if dist.enabled:
        ddp.write_debug_record(model, dist, stage_reports[-1]["history"])
        if not dist.is_main:   # rank 0 alone calibrates and publishes; wait until the run is there
            ddp.barrier()
            return None

    model.eval()
    if len(val_set) == 0:
        warning = (f"{data.name}: no held-out defect-free images (val_fraction=0); calibrating on the training "
                   "images, which makes the threshold optimistic")
        calibration_set, calibration_source = train_set, "train"
    else:
        calibration_set, calibration_source = val_set, "validation"
    if warning:
        warnings.warn(warning, stacklevel=3)
    history = stage_reports[-1]["history"]
    # the last epoch of a distillation stage measured it already; a fit stage (PatchCore) did not
    val_loss = history[-1].get("val_loss") if history else None
    if val_loss is None:
        val_loss = mean_loss(model, val_set, config.batch_size, device)
    save_model(work, model)
    # Calibrate through the scorer test and predict use (BatchNorm folded: this changes `model` in place, so it
    # comes after saving the trained weights).
    scorer, _ = make_scorer(model, channels_last=config.channels_last, image_size=config.image_size)
    calibration, map_statistics, val_scores = fit_normal_statistics(
        scorer, calibration_set, threshold=config.threshold(), batch_size=config.batch_size, device=device)
    extra: dict[str, Any] = {
        "data": {"name": data.name, "n_train": len(train_set), "n_val": len(val_set),
                 "val_files": [str(s.path) for s in data.val]},
        "map_statistics": map_statistics,
        "calibration_scores": [float(s) for s in val_scores],
        "warnings": [warning] if warning else [],
        "training": {"seconds": train_seconds, "epochs": stage_reports[-1]["epochs"],
                     "final_train_loss": history[-1]["train_loss"], "val_loss": val_loss,
                     "calibration_source": calibration_source, "history": history,
                     "resumed": checkpoint is not None, "world_size": dist.world_size,
                     "stages": [{k: v for k, v in r.items() if k != "history"} for r in stage_reports]},
    }
    write_meta(work, model, config, calibration, extra)
    publish_run(work, run_dir, (MODEL_FILE, META_FILE), META_FILE)
    if dist.enabled:
        ddp.barrier()
    log(f"trained in {train_seconds:.1f} s; validation loss {val_loss:.4f}; threshold {calibration.threshold:.4f} "
        f"({calibration.describe(calibration_source)}); saved {run_dir}")
    return TrainResult(run_dir=run_dir, model=model, calibration=calibration, seconds=train_seconds, history=history)
