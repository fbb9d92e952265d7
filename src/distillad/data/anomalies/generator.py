"""The DRAEM-style anomaly generator AAND trains on, and a PNG grid to check its output by eye.

Recipe (docs/methods.md#aand-synthetic-anomalies): a Perlin-noise mask (2^k lattice cells per axis, k uniform in
0..5 and drawn per axis, rotated by up to +-90 degrees, thresholded at 0.5) restricted to the object's foreground,
filled with a texture that went through 3 random photometric/geometric augmentations, blended as

    img * (1 - m) + (1 - beta) * tex * m + beta * img * m,    beta ~ U[0, 0.8),

and applied to each image with probability 0.8 (otherwise the clean image and an empty mask).

Decisions worth knowing:

* **Empty masks**: when the thresholded noise misses the foreground, new noise is drawn (up to 10 times), so an image
  chosen for an anomaly really gets one; the rare image that still has none comes back clean (and counts as clean).
* **Grey-level images** (all channels equal, e.g. magnetic tile) get grey-level textures: a coloured patch on a grey
  category would be an anomaly the model learns to spot by colour alone.
* **Foreground**: ``"auto"`` finds the object per image (see ``foreground.py``), ``"whole"`` forces whole images,
  ``"mask"`` uses a user mask image (white = object) for every image; a call can also pass its own per-image
  foreground tensor.
* **Determinism**: every random draw comes from the generator's own ``numpy.random.Generator``; the same seed and the
  same input give the same output, and the global RNGs are neither used nor advanced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..discovery import load_category
from ..images import DataError, PathLike, load_image, load_mask
from .foreground import GREY_WEIGHTS, estimate_foreground
from .noise import perlin_noise
from .textures import TextureFolder, augment_texture, procedural_texture

__all__ = ["FOREGROUND_MODES", "AnomalyGenerator", "StageAnomalies", "SyntheticAnomalies", "save_anomaly_grid"]

FOREGROUND_MODES = ("auto", "whole", "mask")

_PERLIN_MAX_EXPONENT = 5          # lattice cells per axis: 2^0 .. 2^5
_PERLIN_THRESHOLD = 0.5
_MASK_ATTEMPTS = 10
_BETA_MAX = 0.8
_GREY_WEIGHTS = torch.tensor(GREY_WEIGHTS)


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
        if self.textures is None:
            return procedural_texture(self.rng, images, index)
        size = (images.shape[-2], images.shape[-1])
        return self.textures.get(int(self.rng.integers(0, len(self.textures))), size).to(images.device)

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


class StageAnomalies:
    """An `AnomalyGenerator` serving one training stage: seeded at the stage's first batch, resumable.

    The engine seeds torch before each stage, so seeding from `torch.initial_seed()` then ties the anomalies to the
    run's seed (or to `seed` when given) without advancing any global generator. `state()` goes into every epoch
    checkpoint and `load_state()` restores it, so a resumed run draws the anomalies the uninterrupted one would."""

    def __init__(self, generator: AnomalyGenerator, seed: int | None = None) -> None:
        self.generator = generator
        self.fixed_seed = seed
        self.seeded = False

    def ensure_seeded(self) -> int:
        """Seed at the first call (from the fixed seed, else torch's current seed); returns the seed in use."""
        if not self.seeded:
            seed = self.fixed_seed if self.fixed_seed is not None else torch.initial_seed()
            self.generator.reseed(int(seed) % 2**63)
            self.seeded = True
        return self.generator.seed

    def __call__(self, images: torch.Tensor) -> SyntheticAnomalies:
        self.ensure_seeded()
        return self.generator.generate(images)

    def state(self) -> dict:
        return {"seeded": self.seeded, "anomaly_seed": self.generator.seed,
                "anomalies": self.generator.rng.bit_generator.state}

    def load_state(self, saved: dict) -> None:
        self.seeded = bool(saved["seeded"])
        self.generator.reseed(int(saved["anomaly_seed"]))
        self.generator.rng.bit_generator.state = saved["anomalies"]


# ------------------------------------------------------------------------------------------------------------ grid


def _grid_images(source: PathLike | torch.Tensor, n: int, seed: int, image_size: int) -> torch.Tensor:
    """Up to `n` images at `image_size`: from a tensor, or drawn with `seed` from a category's defect-free
    training images (MVTec layout) or a plain folder of images."""
    if isinstance(source, torch.Tensor):
        images = source if source.dim() == 4 else source.unsqueeze(0)
        if images.shape[-2:] != (image_size, image_size):
            images = F.interpolate(images.float(), size=(image_size, image_size), mode="bilinear", align_corners=False)
        return images[:n].clamp(0, 1)
    files = [s.path for s in load_category(source, val_fraction=0.0, require_masks=False).train]
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
