"""Perlin (gradient) noise: the shape of every synthetic anomaly mask and of the cloudy procedural textures.

The noise is evaluated directly at rotated pixel coordinates (no image rotation and resampling), on a lattice just
large enough for the rotated image, and scaled by sqrt(2) like DRAEM's generator, so thresholding at 0.5 gives
DRAEM's coverage. Everything is vectorised torch on the requested device; every random draw comes from the caller's
``numpy.random.Generator``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["fractal_noise", "perlin_noise"]


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(size: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator, *, angle: float = 0.0,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Gradient (Perlin) noise of shape ``size`` (H, W) with ``cells`` (rows, cols) lattice cells across the image,
    rotated by ``angle`` degrees about the centre; values in about [-1, 1] (DRAEM's sqrt(2) scaling).

    The noise is evaluated at rotated coordinates, so rotating costs nothing and leaves no empty corners.
    """
    h, w = size
    cy, cx = cells
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h - 0.5
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w - 0.5
    yy, xx = torch.meshgrid(ys * h, xs * w, indexing="ij")          # pixels, centred
    a = math.radians(angle)
    ca, sa = math.cos(a), math.sin(a)
    u = ((ca * xx - sa * yy) / w + 0.5) * cx                          # lattice units
    v = ((sa * xx + ca * yy) / h + 0.5) * cy
    # The lattice covers the rotated image: corners from the analytic extent, so no device sync is needed.
    half_diag = 0.5 * math.hypot(h, w)
    u_lo = math.floor((0.5 - half_diag / w) * cx) - 1
    v_lo = math.floor((0.5 - half_diag / h) * cy) - 1
    nu = math.ceil((0.5 + half_diag / w) * cx) - u_lo + 2
    nv = math.ceil((0.5 + half_diag / h) * cy) - v_lo + 2
    theta = torch.from_numpy(rng.uniform(0.0, 2.0 * math.pi, size=nv * nu).astype(np.float32)).to(u.device)
    # Unit gradients as complex numbers: one gather per corner fetches both components (4x faster than indexing).
    grads = torch.polar(torch.ones_like(theta), theta)
    u0, v0 = torch.floor(u), torch.floor(v)
    fu, fv = u - u0, v - v0
    flat = ((v0 - v_lo).clamp_(0, nv - 2) * nu + (u0 - u_lo).clamp_(0, nu - 2)).long()
    fu1, fv1 = fu - 1.0, fv - 1.0

    def corner(offset: int, du: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
        g = grads.take(flat + offset) if offset else grads.take(flat)
        return g.real * du + g.imag * dv

    tu, tv = _fade(fu), _fade(fv)
    top = torch.lerp(corner(0, fu, fv), corner(1, fu1, fv), tu)
    bottom = torch.lerp(corner(nu, fu, fv1), corner(nu + 1, fu1, fv1), tu)
    return math.sqrt(2.0) * torch.lerp(top, bottom, tv)


def fractal_noise(size: tuple[int, int], rng: np.random.Generator, device: torch.device) -> torch.Tensor:
    """A few Perlin octaves, min-max scaled to [0, 1]: cloudy, marbled or grainy depending on the base scale.

    Computed at no more than 128 px and upsampled: textures need no finer detail, and it keeps them cheap.
    """
    h, w = size
    shrink = max(1.0, max(h, w) / 128.0)
    small = (max(2, round(h / shrink)), max(2, round(w / shrink)))
    base = int(rng.integers(1, 5))
    octaves = int(rng.integers(2, 4))
    angle = float(rng.uniform(-90, 90))
    out = torch.zeros(small, device=device)
    for o in range(octaves):
        cells = min(2 ** (base + o), max(small) // 2)
        out += perlin_noise(small, (cells, cells), rng, angle=angle, device=device) / 2 ** o
    lo, hi = out.min(), out.max()
    out = (out - lo) / (hi - lo).clamp_min(1e-6)
    if small != size:
        out = F.interpolate(out[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return out
