"""Low-level tensor operations shared by packages that must not import each other (data and scoring).

Depends on torch only, so any part of distillad can use it without pulling in models or datasets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gaussian_kernel1d", "separable_blur"]


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, *, dtype: torch.dtype = torch.float64,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian, radius round(truncate * sigma) (at least 1) like scipy.ndimage.gaussian_filter.

    Computed in `dtype` on `device` and returned as float32: the float64 default gives the most accurate weights;
    another dtype or device reproduces weights computed there.
    """
    radius = max(1, int(truncate * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def separable_blur(x: torch.Tensor, kernel: torch.Tensor, mode: str = "replicate") -> torch.Tensor:
    """Separable blur of (N,1,H,W) `x` with the odd-length 1-D `kernel`, padding by `mode` (an F.pad mode).

    Rows first, then columns; the output has the input's shape.
    """
    radius = kernel.numel() // 2
    kernel = kernel.to(device=x.device, dtype=x.dtype)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=mode), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode=mode), kernel.view(1, 1, -1, 1))
