"""distillad: unsupervised visual anomaly detection by teacher-student knowledge distillation.

    import distillad
    run = distillad.train("data/bottle", method="dskd", out="runs/bottle")   # the CLI's defaults
    predictions = run.predict(["a.png", "b.png"])   # paths, folders, PIL images or arrays -> scores, labels, maps
    metrics = run.evaluate("data/bottle")           # the dict `distillad test --json` writes
    run = distillad.load("runs/bottle")

The API names load lazily, so `import distillad` (and `distillad --help`) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from distillad.errors import ConfigError, DataError, DistilladError, RunError, WeightsUnavailableError

__version__ = "0.1.0"

_API = {"train": "distillad.api", "load": "distillad.api", "Run": "distillad.api",
        "Prediction": "distillad.engine.predict", "TrainConfig": "distillad.engine.config",
        "METHODS": "distillad.methods"}

if TYPE_CHECKING:
    from distillad.api import Run, load, train
    from distillad.engine.config import TrainConfig
    from distillad.engine.predict import Prediction
    from distillad.methods import METHODS


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'distillad' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["ConfigError", "DataError", "DistilladError", "METHODS", "Prediction", "Run", "RunError", "TrainConfig",
           "WeightsUnavailableError", "__version__", "load", "train"]
