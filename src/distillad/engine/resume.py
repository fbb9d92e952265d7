"""Resumable training: the work folder beside `--out`, its epoch checkpoint, and publishing the finished run.

A run is trained in a hidden work folder next to the run folder (`.NAME.partial`), never in the run folder itself,
so an existing run stays intact until the new one is complete. At the end of every epoch one file,
`checkpoint.pt`, is rewritten atomically: the model, optimizer and scheduler state_dicts, every random generator
the loop draws from, and the progress so far, all plain tensors and numbers loaded with `weights_only=True`.
Restoring it before the next epoch makes a resumed run draw exactly what the uninterrupted run would have drawn, so
it ends with the same weights. The finished run is published into the run folder with renames (see
`publish_run`), and the work folder is removed.
While it trains, the process holds a lock on `.NAME.lock` (see `training_lock`), so a second training of the
same run folder stops with an error instead of resuming, overwriting or deleting the first one's work folder.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillad.errors import RunBusyError, RunError
from distillad.io import atomic_torch_save, fsync_dir

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_VERSION = 1


def work_dir(run_dir: Path) -> Path:
    """Where `run_dir` is trained: a hidden sibling, on the same filesystem, so publishing is a rename."""
    return run_dir.parent / f".{run_dir.name}.partial"


def lock_file(run_dir: Path) -> Path:
    """The file whose lock marks `run_dir` as being trained (a hidden sibling, like the work folder)."""
    return run_dir.parent / f".{run_dir.name}.lock"


@contextmanager
def training_lock(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir`'s training to this process: a second training of the same run (a second shell, a second
    benchmark process on the same cell) would resume, overwrite or delete the work folder under the first one.

    An exclusive `flock` on `lock_file(run_dir)`, released by the kernel when the process dies, so a killed
    training leaves no stale lock behind; the file holds the holder's pid for the error message and is removed on
    release. Where `fcntl` does not exist (Windows), there is no lock."""
    try:
        import fcntl
    except ImportError:   # pragma: no cover - not POSIX
        yield
        return
    path = lock_file(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunBusyError(f"{run_dir} is being trained by another process now (pid {holder}): wait for it to "
                           "finish, or train into another --out") from None
        try:   # the holder before us may have removed the file it locked: the lock must be on the file at `path`
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode("ascii"))
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def random_state(loader_generator: torch.Generator) -> dict[str, Any]:
    """Every generator a training epoch draws from: Python's, numpy's, torch's (CPU and CUDA), the shuffle's."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "loader": loader_generator.get_state()}


def restore_random_state(state: dict[str, Any], loader_generator: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    loader_generator.set_state(state["loader"])


@dataclass
class StageProgress:
    """Where a gradient stage stood at the end of its last finished epoch."""

    epoch: int                                   # epochs finished in this stage
    history: list[dict[str, float]]
    seconds: float                               # training time of this stage so far
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    random: dict[str, Any] | None = None
    stage_state: dict[str, Any] | None = None


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model's weights, the reports of finished stages and the current stage's progress."""

    model: dict[str, torch.Tensor]
    stage: int                                   # index of the stage `progress` belongs to
    progress: StageProgress
    reports: list[dict[str, Any]] = field(default_factory=list)


def fingerprint(config: dict[str, Any], train_files: list[str], val_files: list[str]) -> dict[str, Any]:
    """What must match for a checkpoint to continue a run: the settings and the exact images."""
    return {"config": config, "train_files": train_files, "val_files": val_files}


def save_checkpoint(folder: Path, identity: dict[str, Any], model: torch.nn.Module, stage: int,
                    progress: StageProgress, reports: list[dict[str, Any]]) -> None:
    state = {
        "version": CHECKPOINT_VERSION,
        "identity": identity,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "stage": stage,
        "reports": reports,
        "progress": {"epoch": progress.epoch, "history": progress.history, "seconds": progress.seconds,
                     "optimizer": progress.optimizer, "scheduler": progress.scheduler, "random": progress.random,
                     "stage_state": progress.stage_state},
    }
    atomic_torch_save(folder / CHECKPOINT_FILE, state)


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    if saved.get("train_files") != current["train_files"] or saved.get("val_files") != current["val_files"]:
        return ["the training or validation images"]
    old, new = saved.get("config") or {}, current["config"]
    return [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def load_checkpoint(folder: Path, identity: dict[str, Any]) -> Checkpoint | None:
    """The checkpoint in `folder` (None when there is none); RunError when it belongs to other settings or data."""
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved_identity = state["identity"]
    except Exception as error:  # torch raises many types for a damaged file
        raise RunError(f"the checkpoint {path} of an interrupted training is unreadable ({error}); "
                       "start over with --overwrite") from None
    if state.get("version") != CHECKPOINT_VERSION:
        raise RunError(f"the checkpoint {path} was written by another distillad version; start over with --overwrite")
    differences = _differences(saved_identity, identity)
    if differences:
        raise RunError(f"the interrupted training in {folder} used other {', '.join(differences)}; resume with the "
                       "same settings and data, or start over with --overwrite")
    progress = StageProgress(**state["progress"])
    return Checkpoint(model=state["model"], stage=int(state["stage"]), progress=progress,
                      reports=list(state["reports"]))


def describe(checkpoint: Checkpoint) -> str:
    if checkpoint.progress.epoch == 0:
        return f"{len(checkpoint.reports)} finished stage(s)"
    return f"epoch {checkpoint.progress.epoch} of stage {checkpoint.stage + 1}"


def open_work_dir(run_dir: Path, identity: dict[str, Any], *, resume: bool, overwrite: bool,
                  log: Callable[[str], None]) -> Checkpoint | None:
    """Create the work folder of `run_dir` and return the checkpoint to continue from, if any.

    An interrupted training is never thrown away silently: without `resume` it is an error unless `overwrite`
    (start over) is given; with `resume` a checkpoint of other settings or data is an error unless `overwrite`."""
    work = work_dir(run_dir)
    if work.exists() and not work.is_dir():
        raise RunError(f"{work} is in the way of the training's work folder: remove it")
    checkpoint = None
    if work.is_dir():
        if resume:
            try:
                checkpoint = load_checkpoint(work, identity)
            except RunError:
                if not overwrite:
                    raise
                log(f"discarding the interrupted training in {work} (other settings or data)")
        elif (work / CHECKPOINT_FILE).is_file() and not overwrite:
            raise RunError(f"an interrupted training of {run_dir} is in {work}: pass --resume to continue it "
                           "(Python: resume=True), or --overwrite to start over")
        if checkpoint is None:
            shutil.rmtree(work)
    if checkpoint is not None:
        log(f"resuming the interrupted training in {work} after {describe(checkpoint)}")
    elif resume:
        log(f"no interrupted training of {run_dir} to resume; starting from the beginning")
    work.mkdir(parents=True, exist_ok=True)
    return checkpoint


def publish_run(work: Path, run_dir: Path, files: tuple[str, ...], meta_file: str) -> None:
    """Move the finished run's `files` from `work` into `run_dir`, then remove `work`.

    The old meta.json goes first and the new one comes last, so at every instant the run folder holds either a
    complete run (a meta.json and the model it vouches for by hash) or no finished run at all, never a new model
    with an old calibration. Other files in `run_dir` (a test.json, notes) are left alone."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / meta_file).unlink(missing_ok=True)
    fsync_dir(run_dir)
    for name in files:
        if name != meta_file:
            os.replace(work / name, run_dir / name)
    os.replace(work / meta_file, run_dir / meta_file)
    fsync_dir(run_dir)
    shutil.rmtree(work)
    fsync_dir(run_dir.parent)
