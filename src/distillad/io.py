"""Atomic, permission-respecting file writes: every result, checkpoint and image distillad writes goes through here.

A file is written to a temporary name in its own folder, flushed and fsynced, then renamed over the target, so a
reader (or a crash) sees either the old file or the whole new one, never half of it. `tempfile.mkstemp` creates
files readable by their owner only; the final file gets the mode the user's umask gives any new file, so
colleagues on a shared server can read runs and predictions when the umask allows it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: not every filesystem allows opening a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_with(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(temporary_path)`, fsync the result and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, values: Any) -> None:
    atomic_write_text(path, json.dumps(values, indent=2) + "\n")


def atomic_torch_save(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """torch.save a state_dict atomically (fsynced before the rename)."""
    import torch

    atomic_write_with(path, lambda tmp: torch.save(state, tmp))


__all__ = ["atomic_torch_save", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "atomic_write_with",
           "fsync_dir"]
