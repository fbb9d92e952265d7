"""The shared map/score pipeline and normal-only calibration."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from distillad.scoring import Calibration, GaussianBlur, calibrate, fuse, gaussian_kernel1d
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


def test_gumbel_threshold_matches_scipy_and_its_false_alarm_rate():
    """The default rule against scipy as the oracle: the maximum-likelihood Gumbel fit's 3 % exceedance point; on
    fresh draws from the same law about 3 % of normal scores lie above it; k still gives threshold = center + k scale."""
    from scipy import stats

    from distillad.scoring.calibration import ThresholdRule

    law = stats.gumbel_r(loc=1.0, scale=0.2)
    scores = law.rvs(size=5000, random_state=np.random.default_rng(0))
    cal = ThresholdRule().fit(scores)
    assert cal.rule == "gumbel" and cal.false_alarm_rate == 0.03
    assert cal.threshold == pytest.approx(stats.gumbel_r.isf(0.03, *stats.gumbel_r.fit(scores)), rel=1e-9)
    assert cal.threshold == pytest.approx(cal.center + cal.k * cal.scale)
    fresh = law.rvs(size=200_000, random_state=np.random.default_rng(1))
    assert (fresh > cal.threshold).mean() == pytest.approx(0.03, abs=0.006)
    assert ThresholdRule(false_alarm_rate=0.01).fit(scores).threshold > cal.threshold
    assert "Gumbel" in cal.describe() and "3 %" in cal.describe()
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_gumbel_rule_falls_back_to_mean_std_without_a_tail_to_fit():
    from distillad.scoring.calibration import ThresholdRule

    few = ThresholdRule("gumbel", k=3.0).fit([1.0, 2.0, 3.0, 4.0])          # fewer than 5 scores
    assert few.rule == "mean_std" and few.false_alarm_rate is None and few == calibrate([1.0, 2.0, 3.0, 4.0], k=3.0)
    flat = ThresholdRule("gumbel").fit([0.5] * 8)                           # identical scores
    assert flat.rule == "mean_std" and flat.threshold > 0.5
    assert "mean + 3 std of 4 validation scores" == few.describe()
    # a calibration saved before the rule existed loads as mean + k std
    old = {k: v for k, v in few.to_dict().items() if k not in ("rule", "false_alarm_rate")}
    assert Calibration.from_dict(old).rule == "mean_std"
    with pytest.raises(ValueError, match="threshold rule"):
        calibrate([1.0, 2.0], rule="median")
    with pytest.raises(ValueError, match="false_alarm_rate"):
        calibrate([1.0, 2.0], rule="gumbel", false_alarm_rate=0.0)


def test_calibration_single_image_and_bad_input():
    cal = calibrate([0.7])
    assert cal.scale > 0 and cal.threshold > 0.7
    with pytest.raises(ValueError, match="at least one"):
        calibrate([])
    with pytest.raises(ValueError, match="NaN"):
        calibrate([1.0, float("nan")])


# ------------------------------------------------------------------------------------------------ BatchNorm folding


def _eval_bn(channels: int, seed: int) -> torch.nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm2d(channels, eps=1e-3)
    bn.weight.data = torch.rand(channels, generator=g) + 0.5
    bn.bias.data = torch.randn(channels, generator=g)
    bn.running_mean = torch.randn(channels, generator=g)
    bn.running_var = torch.rand(channels, generator=g) + 0.1
    return bn.eval()


def test_fold_batchnorm_hand_computed_1x1_conv():
    from distillad.scoring.fold import fold_batchnorm

    conv = torch.nn.Conv2d(1, 1, 1, bias=False)
    conv.weight.data.fill_(2.0)
    bn = torch.nn.BatchNorm2d(1, eps=0.0)
    bn.weight.data.fill_(3.0)
    bn.bias.data.fill_(1.0)
    bn.running_mean.fill_(4.0)
    bn.running_var.fill_(9.0)
    model = torch.nn.Sequential(conv, bn).eval()
    x = torch.full((1, 1, 2, 2), 5.0)
    assert fold_batchnorm(model, lambda m: m(x)) == 1
    assert isinstance(model[1], torch.nn.Identity)
    # BN(2x) = 3 * (2x - 4) / 3 + 1 = 2x - 3: weight 2, bias -3
    assert model[0].weight.item() == pytest.approx(2.0) and model[0].bias.item() == pytest.approx(-3.0)
    assert torch.equal(model(x), torch.full((1, 1, 2, 2), 7.0))


def test_fold_batchnorm_conv_transpose_grouped_conv_and_a_shared_output():
    from distillad.scoring.fold import fold_batchnorm

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = torch.nn.ConvTranspose2d(4, 6, 2, stride=2, bias=False)
            self.bn_up = _eval_bn(6, 1)
            self.dw = torch.nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=True)
            self.bn_dw = _eval_bn(6, 2)
            self.side = torch.nn.Conv2d(6, 6, 1)
            self.bn_side = _eval_bn(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn_dw(self.dw(self.bn_up(self.up(x))))
            z = self.side(y)
            return self.bn_side(z) + z          # z is used twice: folding bn_side would change the output

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        expected = net(x)
        assert fold_batchnorm(net, lambda m: m(x)) == 0        # the unsafe pair spoils the check: nothing changes
        assert torch.equal(net(x), expected) and isinstance(net.bn_side, torch.nn.BatchNorm2d)
        net.forward = lambda x: net.bn_dw(net.dw(net.bn_up(net.up(x))))   # only safe pairs left
        expected = net(x)
        assert fold_batchnorm(net, lambda m: m(x)) == 2
        assert torch.allclose(net(x), expected, atol=1e-5)


def test_fold_batchnorm_keeps_every_methods_maps(tmp_path):
    from distillad.methods import METHODS, build_model
    from distillad.scoring import AnomalyScorer

    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for name in sorted(METHODS):
        torch.manual_seed(0)
        model = build_model(name, "efficientnet_lite0", {}, pretrained=False).eval()
        for module in model.modules():          # non-trivial running statistics everywhere
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        scorer = AnomalyScorer(model).eval()
        with torch.no_grad():
            maps, scores = scorer(images)
            assert scorer.fold_batchnorm(64) > 30, name       # patchcore: the teacher alone folds 33 pairs
            folded_maps, folded_scores = scorer(images)
        assert torch.allclose(folded_maps, maps, rtol=1e-3, atol=1e-4), name
        assert torch.allclose(folded_scores, scores, rtol=1e-3, atol=1e-4), name


def test_fold_batchnorm_refuses_training_mode():
    from distillad.scoring.fold import fold_batchnorm

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.BatchNorm2d(1))
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(model, lambda m: m(torch.zeros(1, 1, 2, 2)))


def test_position_references_leave_each_image_out():
    from distillad.scoring.maps import POSITION_GRID, position_references

    maps = torch.zeros(3, POSITION_GRID, POSITION_GRID)
    maps[0, 0, 0], maps[1, 0, 0], maps[2, 10, 10] = 5.0, 3.0, 7.0
    reference, leave_one_out = position_references(maps)
    assert reference[0, 0] == 5.0 and reference[10, 10] == 7.0 and reference.sum() == 12.0
    assert leave_one_out[0, 0, 0] == 3.0 and leave_one_out[0, 10, 10] == 7.0      # image 0 held out
    assert leave_one_out[1, 0, 0] == 5.0                                           # image 1 did not set it
    assert leave_one_out[2, 10, 10] == 0.0 and leave_one_out[2, 0, 0] == 5.0      # image 2 held out


def test_position_references_of_a_single_image_are_zero():
    from distillad.scoring.maps import POSITION_GRID, position_references

    reference, leave_one_out = position_references(torch.full((1, POSITION_GRID, POSITION_GRID), 4.0))
    assert reference.abs().sum() == 0 and leave_one_out.shape == (1, POSITION_GRID, POSITION_GRID)
    assert leave_one_out.abs().sum() == 0          # scored as the plain map: not against itself (always <= 0)
