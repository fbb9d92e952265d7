"""Where on an image synthetic anomalies may go: the object, found without labels, or the whole image.

Rule (``"auto"`` foreground): per image, the grey image is area-shrunk to 64 px, Gaussian-blurred and split by
Otsu's threshold. The split is used only when it is clearly bimodal (Otsu separability >= 0.8) and one side clearly
sits in the image centre rather than on the border (centre share minus border share >= 0.3); that side is the
object. Otherwise (textures, surfaces, uniform images) the whole image is foreground. On MVTec bottle this keeps
anomalies on the bottle and off the light background; the magnetic-tile and synthetic surfaces come out whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distillad.ops import gaussian_kernel1d, separable_blur

__all__ = ["GREY_WEIGHTS", "estimate_foreground"]

GREY_WEIGHTS = (0.299, 0.587, 0.114)   # ITU-R BT.601 luma
_FOREGROUND_SIZE = 64                  # estimated on an area-shrunk copy: cheap and smooth enough
_BLUR_SIGMA = _FOREGROUND_SIZE / 48.0
_BLUR_TRUNCATE = 3.0                   # kernel radius round(3 sigma)
_MIN_SEPARABILITY = 0.8
_MIN_CENTRE_CONTRAST = 0.3
_MIN_FOREGROUND = 0.02


def estimate_foreground(images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [0,1] -> (B,1,H,W) float {0,1}: the object, or the whole image when there is no clear object.

    Otsu on a blurred, shrunk grey image; see the module docstring for the rule and why.
    """
    b, _, h, w = images.shape
    weights = torch.tensor(GREY_WEIGHTS, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    grey = (images.float() * weights).sum(1, keepdim=True)
    small = F.interpolate(grey, size=(_FOREGROUND_SIZE, _FOREGROUND_SIZE), mode="area")
    # float32 weights computed on the images' device: the numbers this estimate has always used
    kernel = gaussian_kernel1d(_BLUR_SIGMA, _BLUR_TRUNCATE, dtype=small.dtype, device=small.device)
    small = separable_blur(small, kernel, mode="replicate")
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
