"""Device selection with a clear message instead of a CUDA error from deep inside torch."""

from __future__ import annotations

import torch


from distillad.errors import ConfigError


class DeviceError(ConfigError):
    """The requested device does not exist on this machine."""


def resolve_device(name: str | torch.device | None) -> torch.device:
    name = str(name or "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name} was requested but this torch ({torch.__version__}) sees no CUDA "
                              "device; use --device cpu")
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif name != "cpu":
        raise DeviceError(f"--device must be cpu or cuda[:N], got {name!r}")
    return torch.device(name)
