"""What fills a synthetic anomaly: texture images from a folder, or procedural textures, then random augmentations.

The texture source is a user folder of texture images (DTD in the paper), or by default a procedural source: fractal
Perlin noise in random colours, colour gradients and stripes, and patches cut from another image of the batch (a
normal image seen at a wrong place, scale and orientation is a plausible "foreign material"). Each texture then goes
through distinct random photometric/geometric augmentations (DRAEM's list, in torch). Every random draw comes from
the caller's ``numpy.random.Generator``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..images import DataError, PathLike, load_image, read_size
from ..listing import EXTENSIONS_TEXT, find_images, require_dir
from .noise import fractal_noise

__all__ = ["AUGMENTATIONS", "TextureFolder", "augment_texture", "procedural_texture"]

_AUGMENTATIONS_PER_TEXTURE = 3


class TextureFolder:
    """Texture images from a folder (searched recursively), loaded on first use and kept at the requested size.

    Every file's header is read up front, so a missing, empty or unreadable folder or file fails before training,
    with a DataError naming it.
    """

    def __init__(self, folder: PathLike, *, max_cached: int = 512) -> None:
        root = Path(folder).expanduser()
        require_dir(root, "texture folder")
        files = find_images(root)
        if not files:
            raise DataError(f"texture folder {root} contains no images (accepted extensions: {EXTENSIONS_TEXT})")
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


# ------------------------------------------------------------------------------------------- procedural textures


def _random_colour(rng: np.random.Generator, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(rng.uniform(0.0, 1.0, size=3).astype(np.float32)).to(device).view(3, 1, 1)


def _noise_texture(rng: np.random.Generator, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    t = fractal_noise(size, rng, device).unsqueeze(0)
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


def procedural_texture(rng: np.random.Generator, images: torch.Tensor, index: int) -> torch.Tensor:
    """A procedural texture for image `index` of the (B,3,H,W) batch `images`, before augmentation: (3,H,W) in
    [0,1]. Noise, gradient/stripes or a patch of another image of the batch, one third each."""
    size = (images.shape[-2], images.shape[-1])
    kind = int(rng.integers(0, 3))
    if kind == 0:
        return _noise_texture(rng, size, images.device)
    if kind == 1:
        return _gradient_texture(rng, size, images.device)
    b = images.shape[0]
    other = (index + int(rng.integers(1, b))) % b if b > 1 else index
    return _patch_texture(rng, images[other].float())


# ------------------------------------------------------------------------------------------------- augmentations


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
