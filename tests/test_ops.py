"""distillad.ops: the Gaussian kernel and separable blur shared by the data and scoring packages."""

import pytest
import torch
from scipy.ndimage import gaussian_filter

from distillad.ops import gaussian_kernel1d, separable_blur


def test_kernel_radius_normalisation_and_compute_dtype():
    kernel = gaussian_kernel1d(4 / 3, truncate=3.0)
    assert kernel.dtype == torch.float32 and kernel.numel() == 2 * 4 + 1
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(kernel, kernel.flip(0))
    # computed in float32 it is the float32 formula to the bit; the float64 default differs only by rounding
    x = torch.arange(-4, 5, dtype=torch.float32)
    direct = torch.exp(-0.5 * (x / (4 / 3)) ** 2)
    assert torch.equal(gaussian_kernel1d(4 / 3, 3.0, dtype=torch.float32), direct / direct.sum())
    assert torch.allclose(kernel, direct / direct.sum(), atol=1e-7)
    assert gaussian_kernel1d(0.1).numel() == 3  # radius at least 1


@pytest.mark.parametrize("mode, scipy_mode", [("replicate", "nearest"), ("reflect", "mirror")])
def test_separable_blur_equals_scipy(mode, scipy_mode):
    sigma = 1.5
    image = torch.rand(2, 1, 20, 17, generator=torch.Generator().manual_seed(0))
    ours = separable_blur(image, gaussian_kernel1d(sigma), mode)
    assert ours.shape == image.shape
    for b in range(2):
        expected = gaussian_filter(image[b, 0].double().numpy(), sigma, mode=scipy_mode, truncate=4.0)
        assert torch.allclose(ours[b, 0].double(), torch.from_numpy(expected), atol=1e-6)
