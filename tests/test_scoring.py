"""The shared map/score pipeline and normal-only calibration."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from distillad.scoring import GaussianBlur, calibrate, fuse, gaussian_kernel1d
from distillad.scoring.maps import upsample


def test_gaussian_kernel_matches_scipy_radius_and_sums_to_one():
    kernel = gaussian_kernel1d(4.0)
    assert kernel.numel() == 2 * 16 + 1
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.argmax(kernel).item() == 16


@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_gaussian_blur_equals_scipy_reflect(sigma):
    rng = np.random.default_rng(0)
    maps = rng.random((2, 48, 40)).astype(np.float32)
    ours = GaussianBlur(sigma)(torch.from_numpy(maps)).numpy()
    # torch "reflect" excludes the edge pixel, which is scipy's "mirror" mode.
    expected = np.stack([gaussian_filter(m.astype(np.float64), sigma, mode="mirror", truncate=4.0) for m in maps])
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_gaussian_blur_zero_sigma_is_identity_and_tiny_maps_work():
    maps = torch.rand(1, 5, 5)
    assert torch.equal(GaussianBlur(0)(maps), maps)
    assert GaussianBlur(4.0)(maps).shape == (1, 5, 5)  # radius 16 > side: replicate padding


def test_fuse_modes_hand_computed():
    a = torch.tensor([[1.0, 2.0]])
    b = torch.tensor([[3.0, 0.5]])
    assert fuse([a, b], "sum").tolist() == [[4.0, 2.5]]
    assert fuse([a, b], "mean").tolist() == [[2.0, 1.25]]
    assert fuse([a, b], "max").tolist() == [[3.0, 2.0]]
    assert fuse([a, b], "product").tolist() == [[3.0, 1.0]]
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse([a], "median")


def test_upsample_keeps_constant_maps_constant():
    out = upsample(torch.full((2, 4, 4), 0.25), (16, 16))
    assert out.shape == (2, 16, 16)
    assert torch.allclose(out, torch.full_like(out, 0.25))


def test_calibration_threshold_and_normalisation():
    scores = [1.0, 2.0, 3.0, 4.0, 5.0]
    cal = calibrate(scores, k=3.0)
    std = np.std(scores, ddof=1)
    assert cal.center == pytest.approx(3.0)
    assert cal.scale == pytest.approx(std)
    assert cal.threshold == pytest.approx(3.0 + 3.0 * std)
    assert cal.val_false_alarm_rate == 0.0
    assert cal.normalize(cal.threshold) == pytest.approx(0.5)
    assert cal.normalize(cal.center) == pytest.approx(1 / (1 + math.exp(3.0)))
    assert cal.is_defective(cal.threshold + 1e-6) and not cal.is_defective(cal.threshold)
    assert calibrate(scores, k=3.0).to_dict() == cal.from_dict(cal.to_dict()).to_dict()


def test_calibration_single_image_and_bad_input():
    cal = calibrate([0.7])
    assert cal.scale > 0 and cal.threshold > 0.7
    with pytest.raises(ValueError, match="at least one"):
        calibrate([])
    with pytest.raises(ValueError, match="NaN"):
        calibrate([1.0, float("nan")])
