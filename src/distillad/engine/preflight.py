"""Checks made before training starts, so that nothing a user can fix ends a long training at its last step.

Every training and validation image is decoded (filling the dataset caches the training then reads, so it costs no
extra decoding), the output location is checked to be a creatable, writable folder, and the free space beside it
is compared with what the checkpoints and the final model will take.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from distillad.data import ImageDataset
from distillad.data.listing import name_some
from distillad.errors import DataError, RunError

# A checkpoint holds the model and up to two optimizer moments per trainable parameter (Adam); while it is
# rewritten the old and the new copy coexist, beside the final model: about 2 * 3 + 1 model sizes, plus slack.
_SPACE_FACTOR = 8
_SPACE_SLACK = 64 << 20


def decode_all(dataset: ImageDataset, what: str) -> None:
    """Load every image of `dataset` now; one DataError naming every file that cannot be read."""
    problems: list[str] = []
    files = []
    for index, sample in enumerate(dataset.samples):
        try:
            dataset.entry(index)
        except DataError as error:
            problems.append(str(error))
            files.append(sample.path)
    if problems:
        more = f" ({len(problems)} files: {name_some(files)})" if len(problems) > 1 else ""
        raise DataError(f"a {what} image cannot be read: {problems[0]}{more}; remove or replace it before training "
                        "(nothing was trained)")


def nearest_existing(path: Path) -> Path:
    """`path` or its closest existing ancestor."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_folder(folder: Path, flag: str = "--out") -> None:
    """RunError unless `folder` is a folder or can be created as one, in a place this user may write to."""
    if folder.exists() and not folder.is_dir():
        raise RunError(f"{flag} {folder} exists and is not a folder")
    _check_creatable(folder, flag, folder)


def _check_creatable(folder: Path, flag: str, target: Path) -> None:
    anchor = nearest_existing(folder)
    if not anchor.is_dir():
        raise RunError(f"{flag} {target} cannot be created: {anchor} is a file, not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise RunError(f"{flag} {target} cannot be written: no write permission in {anchor}")


def check_output_file(path: Path, flag: str) -> None:
    """RunError unless a file can be written at `path` (not a folder; its folder creatable and writable)."""
    if path.is_dir():
        raise RunError(f"{flag} {path} is a folder; give a file name")
    _check_creatable(path.parent, flag, path)


def check_free_space(folder: Path, model: torch.nn.Module) -> None:
    """RunError when the filesystem of `folder` has clearly too little room for the run's checkpoints and model."""
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    needed = _SPACE_FACTOR * model_bytes + _SPACE_SLACK
    free = shutil.disk_usage(nearest_existing(folder)).free
    if free < needed:
        raise RunError(f"only {free / 2**20:.0f} MiB free where {folder} is written; this run needs about "
                       f"{needed / 2**20:.0f} MiB (checkpoints and the model): free some space or choose another --out")
