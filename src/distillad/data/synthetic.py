"""A small synthetic inspection dataset, so demos and end-to-end tests run without licensed data.

Normal images are a brushed-metal-like stationary texture: directional streaks (strongly anisotropic smoothed
noise), low-frequency mottling, fine periodic machining marks and a mild illumination gradient. Every image
draws its own noise, phase, brushing angle, brightness and tint from the same distribution, so a model has to
learn the texture rather than memorise one picture. Test defects (scratch, spot, crack, contamination) are drawn
with anti-aliased shapes of varying size and contrast; the ground-truth mask is where the defect visibly
changes the image.

Everything comes from numpy Generators seeded by (seed, split, index): the same seed writes byte-identical
files, and changing one count does not change the other images.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Union

import numpy as np
from PIL import Image

from .images import DataError

__all__ = ["make_synthetic_dataset", "DEFECT_TYPES", "render_surface", "render_defect"]

PathLike = Union[str, "os.PathLike[str]"]
DEFECT_TYPES = ("scratch", "spot", "crack", "contamination")
_MARKER = "synthetic.json"
_SPLIT_CODES = {"train": 1, "test_good": 2, "test_defect": 3}


# ------------------------------------------------------------------------------------------------ texture


def _filtered_noise(rng: np.random.Generator, n: int, sigma_along: float, sigma_across: float, angle: float) -> np.ndarray:
    """Unit-variance Gaussian-filtered white noise (periodic), elongated along `angle` (radians from the x axis)."""
    noise = rng.standard_normal((n, n))
    f = np.fft.fftfreq(n)
    fy, fx = np.meshgrid(f, f, indexing="ij")
    c, s = np.cos(angle), np.sin(angle)
    f_along = fx * c + fy * s
    f_across = -fx * s + fy * c
    transfer = np.exp(-2.0 * np.pi**2 * ((sigma_along * f_along) ** 2 + (sigma_across * f_across) ** 2))
    out = np.fft.ifft2(np.fft.fft2(noise) * transfer).real
    return (out - out.mean()) / (out.std() + 1e-12)


def render_surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """One defect-free image, (size, size, 3) float64 roughly in [0, 1]."""
    k = size / 128.0
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = np.deg2rad(rng.uniform(-6.0, 6.0))  # brushing direction, near horizontal

    streaks = _filtered_noise(rng, size, sigma_along=18.0 * k, sigma_across=0.6 * k, angle=angle)
    coarse_streaks = _filtered_noise(rng, size, sigma_along=40.0 * k, sigma_across=2.5 * k, angle=angle)
    mottle = _filtered_noise(rng, size, sigma_along=14.0 * k, sigma_across=14.0 * k, angle=0.0)
    # Fine periodic machining marks across the brushing direction, with a random phase and slight period change.
    period = rng.uniform(5.0, 6.0) * k
    across = (-xx * np.sin(angle) + yy * np.cos(angle)) * size
    marks = np.sin(2 * np.pi * across / period + rng.uniform(0, 2 * np.pi))
    marks += 0.5 * np.sin(2 * np.pi * (xx * size) / (period * 3.1) + rng.uniform(0, 2 * np.pi))

    g_dir = rng.uniform(0, 2 * np.pi)
    gradient = rng.uniform(0.03, 0.09) * ((xx - 0.5) * np.cos(g_dir) + (yy - 0.5) * np.sin(g_dir))
    vignette = -0.05 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)

    lum = (
        rng.uniform(0.47, 0.57)
        + 0.045 * streaks
        + 0.025 * coarse_streaks
        + 0.022 * mottle
        + 0.012 * marks
        + gradient
        + vignette
    )
    tint = np.array([1.0, 0.985, 0.955]) + rng.uniform(-0.015, 0.015, size=3)
    return lum[..., None] * tint


# ------------------------------------------------------------------------------------------------ defects


def _polyline_distance(yy: np.ndarray, xx: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Distance from every pixel centre to a polyline given as (N, 2) (y, x) points."""
    d = np.full(yy.shape, np.inf)
    for (y0, x0), (y1, x1) in zip(pts[:-1], pts[1:]):
        vy, vx = y1 - y0, x1 - x0
        L2 = vy * vy + vx * vx + 1e-12
        t = np.clip(((yy - y0) * vy + (xx - x0) * vx) / L2, 0.0, 1.0)
        d = np.minimum(d, np.hypot(yy - (y0 + t * vy), xx - (x0 + t * vx)))
    return d


def _line_alpha(d: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased coverage of a line of `width` pixels given the distance to its centre line."""
    return np.clip(width / 2.0 + 0.5 - d, 0.0, 1.0)


def _blob_alpha(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, lobes: float) -> np.ndarray:
    """Soft irregular blob: radius modulated by a few random harmonics of the polar angle."""
    theta = np.arctan2(yy - cy, xx - cx)
    rad = np.ones_like(theta)
    for h in range(2, 6):
        rad += lobes * rng.uniform(-1, 1) / h * np.cos(h * theta + rng.uniform(0, 2 * np.pi))
    rr = r * np.clip(rad, 0.4, None) * rng.uniform(0.7, 1.0) ** np.abs(np.sin(theta - rng.uniform(0, np.pi)))
    d = np.hypot(yy - cy, xx - cx)
    return np.clip((rr - d) / max(1.2, 0.25 * r) + 0.5, 0.0, 1.0)


def _scratch(rng: np.random.Generator, img: np.ndarray, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    k = size / 128.0
    length = rng.uniform(0.25, 0.5) * size
    cy, cx = rng.uniform(0.2, 0.8, size=2) * size
    a = rng.uniform(0, np.pi)
    bend = rng.uniform(-0.25, 0.25) * length
    t = np.linspace(-0.5, 0.5, 24)
    along = np.stack([np.sin(a), np.cos(a)])
    normal = np.stack([np.cos(a), -np.sin(a)])
    pts = np.array([cy, cx]) + np.outer(t * length, along) + np.outer((1 - 4 * t**2) * bend, normal)
    width = rng.uniform(1.4, 2.6) * k
    alpha = _line_alpha(_polyline_distance(yy, xx, pts), width)
    # Taper the ends so the scratch fades in and out like a real one.
    fade = np.clip(2.0 * (1.0 - np.hypot(yy - cy, xx - cx) / (0.55 * length)), 0.0, 1.0)
    alpha *= fade
    contrast = rng.uniform(0.25, 0.4) * (1 if rng.random() < 0.65 else -1)
    img += contrast * alpha[..., None]
    return alpha


def _crack(rng: np.random.Generator, img: np.ndarray, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    k = size / 128.0

    def walk(start: np.ndarray, heading: float, length: float, steps: int) -> np.ndarray:
        pts = [start]
        for _ in range(steps):
            heading += rng.normal(0, 0.45)
            pts.append(pts[-1] + (length / steps) * np.array([np.sin(heading), np.cos(heading)]))
        return np.array(pts)

    start = rng.uniform(0.25, 0.75, size=2) * size
    heading = rng.uniform(0, 2 * np.pi)
    main = walk(start, heading, rng.uniform(0.2, 0.4) * size, 12)
    alpha = _line_alpha(_polyline_distance(yy, xx, main), rng.uniform(1.2, 2.2) * k)
    if rng.random() < 0.6:
        j = int(rng.integers(3, 9))
        branch = walk(main[j], heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2), rng.uniform(0.08, 0.18) * size, 6)
        alpha = np.maximum(alpha, _line_alpha(_polyline_distance(yy, xx, branch), rng.uniform(0.9, 1.5) * k))
    depth = rng.uniform(0.45, 0.7)
    img *= 1.0 - depth * alpha[..., None]
    return alpha


def _spot(rng: np.random.Generator, img: np.ndarray, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    r = rng.uniform(0.04, 0.085) * size
    cy, cx = rng.uniform(0.15, 0.85, size=2) * size
    alpha = _blob_alpha(rng, yy, xx, cy, cx, r, lobes=0.35)
    centre = np.clip(1.0 - np.hypot(yy - cy, xx - cx) / (1.5 * r), 0.0, 1.0)
    shade = alpha * (0.7 + 0.3 * centre)
    contrast = rng.uniform(0.2, 0.35) * (-1 if rng.random() < 0.6 else 1)
    img += contrast * shade[..., None]
    return alpha


_STAIN_COLOURS = np.array(
    [
        [0.55, 0.30, 0.12],  # rust
        [0.16, 0.13, 0.10],  # oil / grease
        [0.30, 0.48, 0.22],  # green residue
        [0.22, 0.32, 0.62],  # blue paint
        [0.80, 0.74, 0.40],  # yellowish residue
    ]
)


def _contamination(rng: np.random.Generator, img: np.ndarray, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    r = rng.uniform(0.05, 0.1) * size
    cy, cx = rng.uniform(0.18, 0.82, size=2) * size
    alpha = _blob_alpha(rng, yy, xx, cy, cx, r, lobes=0.6)
    texture = 0.75 + 0.25 * np.clip(_filtered_noise(rng, size, 2.0 * size / 128, 2.0 * size / 128, 0.0), -1.5, 1.5) / 1.5
    opacity = rng.uniform(0.55, 0.85)
    colour = _STAIN_COLOURS[rng.integers(len(_STAIN_COLOURS))] * rng.uniform(0.85, 1.15)
    a = (alpha * opacity * np.clip(texture, 0, 1))[..., None]
    img[:] = img * (1 - a) + colour * a * (img.mean(axis=-1, keepdims=True) / 0.5)
    return alpha


_RENDERERS: dict[str, Callable[..., np.ndarray]] = {
    "scratch": _scratch,
    "spot": _spot,
    "crack": _crack,
    "contamination": _contamination,
}


def render_defect(rng: np.random.Generator, img: np.ndarray, defect_type: str) -> np.ndarray:
    """Draw one or two defects of `defect_type` into `img` in place; return the bool ground-truth mask."""
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    mask = np.zeros((size, size), dtype=bool)
    n = 2 if rng.random() < 0.2 else 1
    for _ in range(n):
        alpha = _RENDERERS[defect_type](rng, img, yy, xx, size)
        mask |= alpha > 0.3
    return mask


# ------------------------------------------------------------------------------------------------ writing


def _to_u8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def make_synthetic_dataset(
    root: PathLike,
    *,
    seed: int = 0,
    n_train: int = 60,
    n_test_good: int = 20,
    n_test_defect: int = 20,
    image_size: int = 128,
    name: str = "synthetic_surface",
) -> Path:
    """Write an MVTec-layout category ``root/name`` and return its path.

    Defect types take turns (scratch, spot, crack, contamination, scratch, ...). A folder this function wrote
    before (it holds ``synthetic.json``) is replaced; any other non-empty folder of that name is left alone and
    raises DataError, so user data is never deleted.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if n_train < 1 or n_test_good < 0 or n_test_defect < 0:
        raise ValueError("n_train must be >= 1 and test counts >= 0")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    cat = Path(root).expanduser() / name
    if cat.exists():
        if (cat / _MARKER).is_file():
            shutil.rmtree(cat)
        elif cat.is_dir() and any(cat.iterdir()):
            raise DataError(f"{cat} exists and was not written by make_synthetic_dataset; refusing to overwrite it")
    cat.mkdir(parents=True, exist_ok=True)

    def rng_for(split: str, i: int) -> np.random.Generator:
        return np.random.default_rng([seed, _SPLIT_CODES[split], i])

    for i in range(n_train):
        _save(_to_u8(render_surface(rng_for("train", i), image_size)), cat / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        _save(_to_u8(render_surface(rng_for("test_good", i), image_size)), cat / "test" / "good" / f"{i:03d}.png")
    per_type = {t: 0 for t in DEFECT_TYPES}
    for i in range(n_test_defect):
        dtype = DEFECT_TYPES[i % len(DEFECT_TYPES)]
        rng = rng_for("test_defect", i)
        img = render_surface(rng, image_size)
        mask = render_defect(rng, img, dtype)
        while not mask.any():  # practically never: a defect always lands inside the image
            mask = render_defect(rng, img, dtype)
        j = per_type[dtype]
        per_type[dtype] += 1
        _save(_to_u8(img), cat / "test" / dtype / f"{j:03d}.png")
        _save(mask.astype(np.uint8) * 255, cat / "ground_truth" / dtype / f"{j:03d}_mask.png")

    params = dict(seed=seed, n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect, image_size=image_size)
    (cat / _MARKER).write_text(json.dumps({"generator": "distillad.data.synthetic", **params}, indent=1) + "\n")
    return cat
