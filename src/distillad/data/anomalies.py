"""Synthetic anomalies for AAND's amplification stage (DRAEM style), and a grid to look at them.

Recipe (METHODS.md section 3): a Perlin-noise mask (2^k lattice cells per axis, k uniform in 0..5 and drawn per axis,
rotated by up to +-90 degrees, thresholded at 0.5) restricted to the object's foreground, filled with a texture that
went through 3 random photometric/geometric augmentations, blended as

    img * (1 - m) + (1 - beta) * tex * m + beta * img * m,    beta ~ U[0, 0.8),

and applied to each image with probability 0.8 (otherwise the clean image and an empty mask).

Decisions worth knowing:

* **Perlin noise** is evaluated directly at rotated pixel coordinates (no image rotation and resampling), on a lattice
  just large enough for the rotated image, and scaled by sqrt(2) like DRAEM's generator, so the 0.5 threshold gives
  DRAEM's coverage. Everything is vectorised torch on the images' device.
* **Empty masks**: when the thresholded noise misses the foreground, new noise is drawn (up to 10 times), so an image
  chosen for an anomaly really gets one; the rare image that still has none comes back clean (and counts as clean).
* **Texture source**: a user folder of texture images (DTD in the paper), or by default a procedural source: fractal
  Perlin noise in random colours, colour gradients and stripes, and patches cut from another image of the batch
  (a normal image seen at a wrong place, scale and orientation is a plausible "foreign material").
* **Grey-level images** (all channels equal, e.g. magnetic tile) get grey-level textures: a coloured patch on a grey
  category would be an anomaly the model learns to spot by colour alone.
* **Foreground** ``"auto"``: per image, the grey image is area-shrunk to 64 px, Gaussian-blurred and split by Otsu's
  threshold. The split is used only when it is clearly bimodal (Otsu separability >= 0.8) and one side clearly
  sits in the image centre rather than on the border (centre share minus border share >= 0.3); that side is the
  object. Otherwise (textures, surfaces, uniform images) the whole image is foreground. On MVTec bottle this keeps
  anomalies on the bottle and off the light background; the magnetic-tile and synthetic surfaces come out whole.
  ``"whole"`` forces whole images; ``"mask"`` uses a user mask image (white = object) for every image, and a call can
  also pass its own per-image foreground tensor.
* **Determinism**: every random draw comes from the generator's own ``numpy.random.Generator``; the same seed and the
  same input give the same output, and the global RNGs are neither used nor advanced.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from .images import IMAGE_EXTENSIONS, DataError, is_image_file, load_image, load_mask, read_size

__all__ = [
    "AnomalyGenerator",
    "SyntheticAnomalies",
    "TextureFolder",
    "estimate_foreground",
    "perlin_noise",
    "save_anomaly_grid",
]

PathLike = Union[str, "os.PathLike[str]"]
FOREGROUND_MODES = ("auto", "whole", "mask")

_PERLIN_MAX_EXPONENT = 5          # lattice cells per axis: 2^0 .. 2^5
_PERLIN_THRESHOLD = 0.5
_MASK_ATTEMPTS = 10
_BETA_MAX = 0.8
_AUGMENTATIONS_PER_TEXTURE = 3
_FOREGROUND_SIZE = 64             # foreground is estimated on an area-shrunk copy: cheap and smooth enough
_MIN_SEPARABILITY = 0.8
_MIN_CENTRE_CONTRAST = 0.3
_MIN_FOREGROUND = 0.02
_GREY = (0.299, 0.587, 0.114)


# --------------------------------------------------------------------------------------------------- Perlin noise


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


def _fractal_noise(size: tuple[int, int], rng: np.random.Generator, device: torch.device) -> torch.Tensor:
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


# ----------------------------------------------------------------------------------------------------- foreground


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B,1,H,W) with replicate padding."""
    radius = max(1, int(3.0 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


def estimate_foreground(images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [0,1] -> (B,1,H,W) float {0,1}: the object, or the whole image when there is no clear object.

    Otsu on a blurred, shrunk grey image; see the module docstring for the rule and why.
    """
    b, _, h, w = images.shape
    weights = torch.tensor(_GREY, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    grey = (images.float() * weights).sum(1, keepdim=True)
    small = F.interpolate(grey, size=(_FOREGROUND_SIZE, _FOREGROUND_SIZE), mode="area")
    small = _gaussian_blur(small, _FOREGROUND_SIZE / 48.0)
    levels = (small.flatten(1).clamp(0, 1) * 255).round().long()
    ones = torch.ones_like(levels, dtype=torch.float32)
    hist = torch.zeros(b, 256, device=images.device).scatter_add_(1, levels, ones)
    p = hist / hist.sum(1, keepdim=True)
    grey_levels = torch.arange(256, dtype=torch.float32, device=images.device)
    w0 = p.cumsum(1)
    m0 = (p * grey_levels).cumsum(1)
    mean = m0[:, -1:]
    between = (mean * w0 - m0) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    threshold = between.argmax(1, keepdim=True)
    total = (p * (grey_levels - mean) ** 2).sum(1)
    separability = between.gather(1, threshold)[:, 0] / total.clamp_min(1e-12)
    bright = (levels > threshold).view(b, _FOREGROUND_SIZE, _FOREGROUND_SIZE).float()

    n = _FOREGROUND_SIZE
    border = torch.ones(n, n, dtype=torch.bool, device=images.device)
    border[n // 8: n - n // 8, n // 8: n - n // 8] = False
    centre = torch.zeros(n, n, dtype=torch.bool, device=images.device)
    centre[n // 4: n - n // 4, n // 4: n - n // 4] = True
    contrast = bright[:, centre].mean(1) - bright[:, border].mean(1)   # > 0: the bright side is central
    obj = torch.where((contrast > 0).view(b, 1, 1), bright, 1.0 - bright)
    use_object = (separability >= _MIN_SEPARABILITY) & (contrast.abs() >= _MIN_CENTRE_CONTRAST) \
        & (obj.flatten(1).mean(1) >= _MIN_FOREGROUND)
    # Threshold at full size the upsampled grey margin (positive on the object side): smooth outlines, not 64-px steps.
    side = torch.where(contrast > 0, 1.0, -1.0).view(b, 1, 1)
    margin = (small[:, 0] * 255 - threshold.view(b, 1, 1).float() - 0.5) * side
    margin = torch.where(use_object.view(b, 1, 1), margin, torch.ones_like(margin))
    full = F.interpolate(margin.unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False)
    return (full > 0).to(images.dtype)


# ------------------------------------------------------------------------------------------------------- textures


class TextureFolder:
    """Texture images from a folder (searched recursively), loaded on first use and kept at the requested size.

    Every file's header is read up front, so a missing, empty or unreadable folder or file fails before training,
    with a DataError naming it.
    """

    def __init__(self, folder: PathLike, *, max_cached: int = 512) -> None:
        root = Path(folder).expanduser()
        if not root.exists():
            raise DataError(f"texture folder {root} does not exist")
        if not root.is_dir():
            raise DataError(f"texture folder {root} is not a folder")
        files = sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p)
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not files:
            raise DataError(f"texture folder {root} contains no images (accepted extensions: "
                            f"{', '.join(IMAGE_EXTENSIONS)})")
        for p in files:
            read_size(p)  # DataError naming the file
        self.root = root
        self.files = files
        self.max_cached = max_cached
        self._cache: dict[tuple[int, int, int], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.files)

    def get(self, index: int, size: tuple[int, int]) -> torch.Tensor:
        """(3,H,W) float in [0,1] of texture `index`, resized to `size`."""
        key = (index, size[0], size[1])
        texture = self._cache.get(key)
        if texture is None:
            texture = load_image(self.files[index], size)
            if len(self._cache) >= self.max_cached:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = texture
        return texture


def _random_colour(rng: np.random.Generator, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(rng.uniform(0.0, 1.0, size=3).astype(np.float32)).to(device).view(3, 1, 1)


def _noise_texture(rng: np.random.Generator, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    t = _fractal_noise(size, rng, device).unsqueeze(0)
    if rng.random() < 0.5:  # two-colour marbling
        return torch.lerp(_random_colour(rng, device), _random_colour(rng, device), t)
    # A cosine palette: each channel cycles at its own rate and phase, giving multi-coloured noise from one field.
    rate = torch.from_numpy(rng.uniform(0.5, 3.0, size=3).astype(np.float32)).to(device).view(3, 1, 1)
    phase = torch.from_numpy(rng.uniform(0, 2 * math.pi, size=3).astype(np.float32)).to(device).view(3, 1, 1)
    return 0.5 + 0.5 * torch.cos(2 * math.pi * rate * t + phase)


def _gradient_texture(rng: np.random.Generator, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    h, w = size
    a = rng.uniform(0, 2 * math.pi)
    yy, xx = torch.meshgrid(torch.linspace(-0.5, 0.5, h, device=device), torch.linspace(-0.5, 0.5, w, device=device),
                            indexing="ij")
    along = math.cos(a) * xx + math.sin(a) * yy
    if rng.random() < 0.5:  # smooth ramp
        t = (along - along.min()) / (along.max() - along.min()).clamp_min(1e-6)
    else:                   # stripes / waves
        t = 0.5 + 0.5 * torch.sin(2 * math.pi * float(rng.uniform(2, 24)) * along + float(rng.uniform(0, 2 * math.pi)))
        if rng.random() < 0.5:
            t = (t > 0.5).float()
    return torch.lerp(_random_colour(rng, device), _random_colour(rng, device), t.unsqueeze(0))


def _patch_texture(rng: np.random.Generator, source: torch.Tensor) -> torch.Tensor:
    """A random crop of `source` (3,H,W), scaled back to full size, flipped and turned by a multiple of 90 degrees."""
    _, h, w = source.shape
    scale = rng.uniform(0.25, 1.0)
    ch, cw = max(2, int(round(h * scale))), max(2, int(round(w * scale)))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    patch = source[:, y0:y0 + ch, x0:x0 + cw].unsqueeze(0)
    patch = F.interpolate(patch, size=(h, w), mode="bilinear", align_corners=False)[0]
    if rng.random() < 0.5:
        patch = patch.flip(-1)
    turns = int(rng.integers(0, 4)) if h == w else 2 * int(rng.integers(0, 2))
    return torch.rot90(patch, turns, dims=(-2, -1)).clamp(0, 1)


# --------------------------------------------------------------------------------------------------- augmentations


def _gamma(t: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    gamma = torch.from_numpy(rng.uniform(0.5, 2.0, size=3).astype(np.float32)).to(t.device).view(3, 1, 1)
    return t.clamp_min(0).pow(gamma)


def _brightness(t: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    return t * float(rng.uniform(0.8, 1.2)) + float(rng.uniform(-30, 30)) / 255.0


def _sharpness(t: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=t.device) / 13.0  # PIL's smooth
    smooth = F.conv2d(F.pad(t.unsqueeze(1), (1, 1, 1, 1), mode="replicate"), k.view(1, 1, 3, 3))[:, 0]
    return torch.lerp(smooth, t, float(rng.uniform(0.0, 2.0)))


def _hue_saturation(t: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Rotate the hue and scale the saturation in YIQ space (one 3x3 colour matrix)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    a = rng.uniform(-math.pi / 2, math.pi / 2)
    s = rng.uniform(0.5, 1.5)
    rot = torch.tensor([[1.0, 0.0, 0.0],
                        [0.0, s * math.cos(a), -s * math.sin(a)],
                        [0.0, s * math.sin(a), s * math.cos(a)]])
    matrix = (torch.linalg.inv(to_yiq) @ rot @ to_yiq).to(t.device)
    return torch.einsum("ij,jhw->ihw", matrix, t)


def _solarize(t: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    threshold = float(rng.uniform(32, 128)) / 255.0
    return torch.where(t > threshold, 1.0 - t, t)


def _posterize(t: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    levels = 2 ** int(rng.integers(2, 7))
    return torch.floor(t.clamp(0, 1) * (levels - 1) + 0.5) / (levels - 1)


def _invert(t: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    return 1.0 - t


def _autocontrast(t: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    lo = t.flatten(1).amin(1).view(3, 1, 1)
    hi = t.flatten(1).amax(1).view(3, 1, 1)
    return torch.where(hi - lo > 1e-3, (t - lo) / (hi - lo).clamp_min(1e-3), t)


def _equalize(t: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Per-channel histogram equalisation through a 256-level cumulative histogram."""
    q = (t.clamp(0, 1) * 255).round().long().flatten(1)
    hist = torch.zeros(3, 256, device=t.device).scatter_add_(1, q, torch.ones_like(q, dtype=torch.float32))
    cdf = hist.cumsum(1)
    first = cdf.gather(1, (hist > 0).float().argmax(1, keepdim=True))
    lut = ((cdf - first) / (cdf[:, -1:] - first).clamp_min(1)).clamp(0, 1)
    return lut.gather(1, q).view_as(t)


def _rotate(t: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    a = math.radians(rng.uniform(-45, 45))
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], device=t.device)
    grid = F.affine_grid(theta.unsqueeze(0), [1, *t.shape], align_corners=False)
    return F.grid_sample(t.unsqueeze(0), grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]


AUGMENTATIONS = (_gamma, _brightness, _sharpness, _hue_saturation, _solarize, _posterize, _invert, _autocontrast,
                 _equalize, _rotate)


def augment_texture(texture: torch.Tensor, rng: np.random.Generator,
                    count: int = _AUGMENTATIONS_PER_TEXTURE) -> torch.Tensor:
    """`count` distinct random augmentations (DRAEM's list, in torch) in random order; result in [0, 1]."""
    for index in rng.choice(len(AUGMENTATIONS), size=count, replace=False):
        texture = AUGMENTATIONS[int(index)](texture, rng).clamp(0, 1)
    return texture


# ------------------------------------------------------------------------------------------------------ generator

_GREY_WEIGHTS = torch.tensor(_GREY)


def _is_grey(image: torch.Tensor) -> bool:
    """True for a (3,H,W) image whose channels are equal (grey-level data loaded as RGB)."""
    return bool((image.amax(0) - image.amin(0)).max() < 1e-3)



@dataclass
class SyntheticAnomalies:
    """One generated batch: anomalous images (B,3,H,W), anomaly masks and foreground masks (B,1,H,W) float {0,1},
    whether each image got an anomaly (B,) bool, each image's blend factor beta (B,) and augmented texture
    (B,3,H,W) (both 0 where clean)."""

    images: torch.Tensor
    masks: torch.Tensor
    foreground: torch.Tensor
    applied: torch.Tensor
    beta: torch.Tensor
    textures: torch.Tensor


class AnomalyGenerator:
    """DRAEM-style synthetic anomalies on clean batches; see the module docstring for the recipe and the choices.

    ``foreground``: "auto" (object found per image), "whole" (textures) or "mask" (``foreground_mask``, an image file
    or an (H,W) tensor, white/non-zero = object, used for every image).
    """

    def __init__(self, image_size: int | tuple[int, int] | None = None, *, texture_dir: PathLike | None = None,
                 probability: float = 0.8, foreground: str = "auto",
                 foreground_mask: PathLike | torch.Tensor | None = None, seed: int = 0) -> None:
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        # Only a hint (the foreground mask file is read at this size); every batch is handled at its own size.
        self.image_size: tuple[int, int] | None = tuple(int(s) for s in image_size) if image_size else None
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"anomaly probability must be in [0, 1], got {probability}")
        if foreground not in FOREGROUND_MODES:
            raise ValueError(f"foreground must be one of {', '.join(FOREGROUND_MODES)}; got {foreground!r}")
        if (foreground == "mask") != (foreground_mask is not None):
            raise ValueError("foreground='mask' needs foreground_mask, and foreground_mask needs foreground='mask'")
        self.probability = float(probability)
        self.foreground = foreground
        self._fixed_foreground: torch.Tensor | None = None
        if foreground_mask is not None:
            if isinstance(foreground_mask, torch.Tensor):
                fixed = foreground_mask.float().reshape(1, 1, *foreground_mask.shape[-2:])
            else:
                fixed = load_mask(foreground_mask, self.image_size).float()[None, None]
            if not fixed.any():
                what = "the foreground mask tensor" if isinstance(foreground_mask, torch.Tensor) \
                    else f"foreground mask {foreground_mask}"
                raise DataError(f"{what} marks no pixel as object (white / non-zero = object)")
            self._fixed_foreground = (fixed > 0).float()
        self.textures = TextureFolder(texture_dir) if texture_dir is not None else None
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)

    def reseed(self, seed: int) -> None:
        """Restart the random stream: the same seed then reproduces the same anomalies."""
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)

    # -- pieces ---------------------------------------------------------------------------------------------------
    def foreground_masks(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        if self.foreground == "whole":
            return torch.ones(b, 1, h, w, device=images.device, dtype=images.dtype)
        if self.foreground == "mask":
            fixed = F.interpolate(self._fixed_foreground.to(images.device), size=(h, w), mode="nearest")
            return fixed.expand(b, 1, h, w).to(images.dtype)
        return estimate_foreground(images)

    def perlin_mask(self, size: tuple[int, int], device: torch.device) -> torch.Tensor:
        """One thresholded, rotated Perlin mask (H,W) bool."""
        ky, kx = (int(k) for k in self.rng.integers(0, _PERLIN_MAX_EXPONENT + 1, size=2))
        angle = float(self.rng.uniform(-90.0, 90.0))
        return perlin_noise(size, (2 ** ky, 2 ** kx), self.rng, angle=angle, device=device) > _PERLIN_THRESHOLD

    def texture(self, images: torch.Tensor, index: int) -> torch.Tensor:
        """A texture for image `index` of the batch, before augmentation: (3,H,W) in [0,1]."""
        size = (images.shape[-2], images.shape[-1])
        if self.textures is not None:
            return self.textures.get(int(self.rng.integers(0, len(self.textures))), size).to(images.device)
        kind = int(self.rng.integers(0, 3))
        if kind == 0:
            return _noise_texture(self.rng, size, images.device)
        if kind == 1:
            return _gradient_texture(self.rng, size, images.device)
        b = images.shape[0]
        other = (index + int(self.rng.integers(1, b))) % b if b > 1 else index
        return _patch_texture(self.rng, images[other].float())

    # -- the batch ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, images: torch.Tensor, foreground: torch.Tensor | None = None) -> SyntheticAnomalies:
        """Anomalies for a (B,3,H,W) batch in [0,1]; `foreground` (B,1,H,W) overrides the generator's rule."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        b, _, h, w = images.shape
        clean = images.float().contiguous()   # one layout throughout: mixed layouts take slow paths
        fg = (foreground.float() > 0).float() if foreground is not None else self.foreground_masks(clean).float()
        masks = torch.zeros(b, 1, h, w, device=images.device)
        textures = torch.zeros_like(clean)
        applied = torch.zeros(b, dtype=torch.bool)
        beta = torch.zeros(b)
        for i in range(b):
            if self.rng.random() >= self.probability:
                continue
            for _ in range(_MASK_ATTEMPTS):
                mask = self.perlin_mask((h, w), images.device) & (fg[i, 0] > 0)
                if bool(mask.any()):
                    break
            else:
                continue
            masks[i, 0] = mask.float()
            texture = augment_texture(self.texture(clean, i), self.rng)
            if _is_grey(clean[i]):  # a coloured patch on a grey-level category would be a trivial giveaway
                grey = (texture * _GREY_WEIGHTS.to(texture.device).view(3, 1, 1)).sum(0, keepdim=True)
                texture = grey.expand(3, -1, -1)
            textures[i] = texture
            beta[i] = float(self.rng.uniform(0.0, _BETA_MAX))
            applied[i] = True
        bv = beta.to(images.device).view(b, 1, 1, 1)
        # img (1-m) + (1-beta) tex m + beta img m with a binary m: the mix inside, the clean pixels bit for bit outside.
        out = torch.where(masks > 0, torch.lerp(textures, clean, bv).clamp_(0, 1), clean).to(images.dtype)
        if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        return SyntheticAnomalies(out, masks.to(images.dtype), fg.to(images.dtype), applied, beta, textures)

    def __call__(self, images: torch.Tensor,
                 foreground: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(anomalous images (B,3,H,W) in [0,1], masks (B,1,H,W) float {0,1})."""
        result = self.generate(images, foreground)
        return result.images, result.masks


# ------------------------------------------------------------------------------------------------------------ grid


def _grid_images(source: PathLike | torch.Tensor, n: int, seed: int, image_size: int) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        images = source if source.dim() == 4 else source.unsqueeze(0)
        if images.shape[-2:] != (image_size, image_size):
            images = F.interpolate(images.float(), size=(image_size, image_size), mode="bilinear", align_corners=False)
        return images[:n].clamp(0, 1)
    root = Path(source).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    folder = root / "train" / "good" if (root / "train" / "good").is_dir() else root
    if not folder.is_dir():
        raise DataError(f"{root} is not a folder")
    if (folder / "rgb").is_dir() and not any(is_image_file(p) for p in folder.iterdir() if p.is_file()):
        folder = folder / "rgb"
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    if not files:
        raise DataError(f"folder {folder} contains no images (accepted extensions: {', '.join(IMAGE_EXTENSIONS)})")
    if len(files) > n:
        chosen = np.sort(np.random.default_rng(seed).choice(len(files), size=n, replace=False))
        files = [files[int(i)] for i in chosen]
    return torch.stack([load_image(p, image_size) for p in files])


def save_anomaly_grid(source: PathLike | torch.Tensor, out_png: PathLike, *, n: int = 16, seed: int = 0,
                      image_size: int = 256, texture_dir: PathLike | None = None, foreground: str = "auto",
                      foreground_mask: PathLike | None = None, probability: float = 1.0, columns: int = 4) -> Path:
    """Write a PNG of (image | mask | anomalous) triplets, `columns` triplets per row, to check the generator by eye.

    `source` is a category folder (its train/good images), a folder of images, or a (N,3,H,W) tensor in [0,1];
    n images are drawn with `seed`. In the mask tile the foreground is dark grey and the anomaly white, so anomalies
    falling off the object are easy to spot. `probability` defaults to 1 so that every triplet shows an anomaly.
    """
    from PIL import Image

    if n < 1 or columns < 1:
        raise ValueError(f"n and columns must be >= 1, got n={n}, columns={columns}")
    images = _grid_images(source, n, seed, image_size)
    generator = AnomalyGenerator((images.shape[-2], images.shape[-1]), texture_dir=texture_dir,
                                 probability=probability, foreground=foreground, foreground_mask=foreground_mask,
                                 seed=seed)
    result = generator.generate(images)
    mask_tile = (0.3 * result.foreground + 0.7 * result.masks).clamp(0, 1).expand(-1, 3, -1, -1)
    count = images.shape[0]
    h, w = images.shape[-2:]
    gap = max(2, h // 64)
    cols = min(columns, count)
    rows = math.ceil(count / cols)
    cell_w = 3 * w + 2 * gap
    canvas = torch.ones(3, rows * h + (rows - 1) * gap, cols * cell_w + (cols - 1) * 3 * gap)
    for i in range(count):
        r, c = divmod(i, cols)
        y, x = r * (h + gap), c * (cell_w + 3 * gap)
        for j, tile in enumerate((images[i], mask_tile[i], result.images[i])):
            canvas[:, y:y + h, x + j * (w + gap): x + j * (w + gap) + w] = tile
    out = Path(out_png).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    array = (canvas.permute(1, 2, 0).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
    Image.fromarray(array).save(out)
    return out
