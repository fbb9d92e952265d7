"""One exception family for everything a user can get wrong.

The command line turns exactly these into a one-line message and exit code 2; any other exception is a bug in
distillad and keeps its traceback. Each kind names what to fix: the data, the run folder, or a setting.
"""

from __future__ import annotations


class DistilladError(Exception):
    """Base class: a problem with the user's input, files or settings, never an internal bug."""

    kind = "error"


class DataError(DistilladError, ValueError):
    """Unreadable, missing or inconsistent images, masks or dataset folders; the message names the file."""

    kind = "data"


class RunError(DistilladError, RuntimeError):
    """A run folder that is missing, incomplete, unreadable or in the way; or a training that cannot go on."""

    kind = "run"


class RunBusyError(RunError):
    """The run folder is being trained by another process right now (it holds the folder's training lock)."""


class ConfigError(DistilladError, ValueError):
    """A setting, option or command-line value of the wrong name, type or range."""

    kind = "config"


class WeightsUnavailableError(DistilladError, RuntimeError):
    """Teacher weights that are neither installed, nor in a given file, nor downloadable."""

    kind = "weights"


__all__ = ["ConfigError", "DataError", "DistilladError", "RunBusyError", "RunError", "WeightsUnavailableError"]
