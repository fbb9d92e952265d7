"""Which files on disk are images: the one place that lists folders, for discovery, textures and prediction.

Hidden entries (names starting with a dot) are always skipped; everything is sorted so results are deterministic.
`resolve_inputs` also takes list files (`@paths.txt`) and glob patterns, so a job over millions of files need not
pass them on a command line (the local and the Ray `predict` both read their inputs through it).
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from .images import IMAGE_EXTENSIONS, DataError, PathLike, is_image_file

__all__ = ["EXTENSIONS_TEXT", "find_images", "has_images", "image_dir", "list_images", "name_some", "read_list_file",
           "require_dir", "resolve_inputs", "scan_dir", "warn_ignored"]

EXTENSIONS_TEXT = ", ".join(IMAGE_EXTENSIONS)
_MAX_LISTED = 5  # how many file names a warning or error lists before summarising with a count


def name_some(paths: Sequence[Path]) -> str:
    """The first few paths, then a count of the rest: for messages about many files."""
    shown = ", ".join(str(p) for p in paths[:_MAX_LISTED])
    return shown + (f" and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else "")


def require_dir(folder: Path, what: str) -> None:
    """DataError naming `folder` (described as `what`) unless it exists and is a folder."""
    if not folder.exists():
        raise DataError(f"{what} {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{what} {folder} is not a folder")


def scan_dir(folder: Path, ignored: list[Path]) -> list[Path]:
    """Sorted image files directly in `folder`; non-image files are appended to `ignored`, hidden ones skipped."""
    images = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file():
            if is_image_file(p):
                images.append(p)
            else:
                ignored.append(p)
    return images


def find_images(folder: Path) -> list[Path]:
    """Sorted image files anywhere below `folder`, skipping hidden files and everything in hidden folders."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def has_images(folder: Path) -> bool:
    """True when image files lie directly in `folder`."""
    return any(is_image_file(p) and p.is_file() for p in folder.iterdir())


def image_dir(folder: Path) -> Path:
    """The folder itself, or its ``rgb/`` sub-folder (MVTec 3D-AD) when images live there."""
    rgb = folder / "rgb"
    if rgb.is_dir() and not has_images(folder):
        return rgb
    return folder


def warn_ignored(ignored: list[Path]) -> None:
    """One warning listing the non-image files a discovery passed over."""
    if ignored:
        warnings.warn(
            f"ignored {len(ignored)} non-image file(s) (accepted extensions: {EXTENSIONS_TEXT}): {name_some(ignored)}",
            stacklevel=3,
        )


def list_images(path_or_paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """Image files from files and/or folders (folders searched recursively, sorted, hidden entries skipped)."""
    if isinstance(path_or_paths, (str, os.PathLike)):
        inputs = [Path(path_or_paths)]
    else:
        inputs = [Path(p) for p in path_or_paths]
    out: list[Path] = []
    seen: set[Path] = set()
    for inp in inputs:
        inp = inp.expanduser()
        if not inp.exists():
            raise DataError(f"input {inp} does not exist")
        if inp.is_file():
            if inp.suffix.lower() not in IMAGE_EXTENSIONS:
                raise DataError(f"input file {inp} is not an image (accepted extensions: {EXTENSIONS_TEXT})")
            found = [inp]
        else:
            found = find_images(inp)
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                out.append(p)
    if not out:
        raise DataError(f"no images found in {name_some(inputs)} (accepted extensions: {EXTENSIONS_TEXT})")
    return out


LIST_FILE_PREFIX = "@"
_GLOB_CHARS = frozenset("*?[")


def _is_pattern(text: str) -> bool:
    return any(char in _GLOB_CHARS for char in text)


def _expand_pattern(pattern: str, where: str) -> list[Path]:
    """The image files and folders a glob pattern matches, sorted (`**` spans folders; hidden names only match a
    pattern that spells the dot). `where` names the pattern's origin in the error when nothing matches."""
    matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(pattern), recursive=True))  # as find_images
    found = [m for m in matches if m.is_dir() or is_image_file(m)]
    if not found:
        raise DataError(f"{where}: the pattern {pattern!r} matches no images or folders "
                        f"(accepted extensions: {EXTENSIONS_TEXT})")
    return found


def read_list_file(list_file: Path) -> list[Path]:
    """The entries of a list file: one path (file, folder or glob pattern) per line; blank lines and lines
    starting with '#' skipped; relative paths taken from the list file's folder."""
    list_file = list_file.expanduser()
    if not list_file.is_file():
        raise DataError(f"list file {list_file} " + ("is not a file" if list_file.exists() else "does not exist"))
    try:
        text = list_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"list file {list_file} cannot be read: {error}") from None
    entries: list[Path] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry).expanduser()
        if not path.is_absolute():
            path = list_file.parent / path
        where = f"{list_file}:{line_number}"
        if not path.exists() and _is_pattern(entry):
            entries.extend(_expand_pattern(str(path), where))
        elif not path.exists():
            raise DataError(f"{where}: {path} does not exist")
        else:
            entries.append(path)
    if not entries:
        raise DataError(f"list file {list_file} names no paths (one path per line; '#' starts a comment)")
    return entries


def resolve_inputs(inputs: PathLike | Iterable[PathLike]) -> list[Path]:
    """Image files from files, folders (searched recursively), list files (`@paths.txt`, see `read_list_file`) and
    glob patterns the shell left unexpanded ('images/**/*.png'): sorted within each input, in input order,
    each file once. A path that exists as written is taken literally, even when it looks like a pattern."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    expanded: list[Path] = []
    for item in items:
        text = os.fspath(item)
        if os.path.exists(os.path.expanduser(text)):
            expanded.append(Path(text))
        elif text.startswith(LIST_FILE_PREFIX):
            expanded.extend(read_list_file(Path(text[len(LIST_FILE_PREFIX):])))
        elif _is_pattern(text):
            expanded.extend(_expand_pattern(text, "input"))
        else:
            expanded.append(Path(text))   # list_images says it does not exist
    return list_images(expanded)
