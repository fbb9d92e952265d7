"""Building blocks shared by the distillation methods.

Every method compares a frozen teacher pyramid with one or more student pyramids; the pieces below are the only
implementations of the discrepancy, the losses, the multi-scale embedding (RD's one-class bottleneck, DSKD's
deep-feature embedding) and the mirrored decoder student, so STFPM, RD, DSKD and AAND differ only in how they
wire them together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-6


def cosine_distance_map(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Per-pixel 1 - cos(T, S) along channels: (B,C,h,w) x2 -> (B,h,w).

    Normalised L2 (STFPM) equals 2 * (1 - cos), so this one discrepancy serves every method.
    """
    return 1.0 - F.cosine_similarity(teacher, student, dim=1, eps=_EPS)


def global_cosine_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """RD's loss term: 1 - cos between whole flattened maps, one value per image (B,)."""
    return 1.0 - F.cosine_similarity(teacher.flatten(1), student.flatten(1), dim=1, eps=_EPS)


def hard_pixel_distance(teacher: torch.Tensor, student: torch.Tensor, k: int) -> torch.Tensor:
    """AAND's hard-knowledge term: mean of the k largest per-pixel distances of each image (B,)."""
    return hardest_mean(cosine_distance_map(teacher, student), k)


def hardest_mean(distances: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the k largest values of each image's map (B,h,w) -> (B,); k is clipped to [1, h*w]."""
    flat = distances.flatten(1)
    k = max(1, min(k, flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)


def hardest_share_mean(distances: torch.Tensor, share: float) -> torch.Tensor:
    """Mean of the largest `share` of each image's map values (B,h,w) -> (B,); share 1 is the plain mean.

    The image score is the maximum of a map, so the normal pixels a student reproduces worst are what raises a
    defect-free image's score; a loss over them spends the training on that tail (EfficientAD's hard feature loss).
    """
    if share >= 1.0:
        return distances.flatten(1).mean(dim=1)
    return hardest_mean(distances, math.ceil(share * distances[0].numel()))


def negative_similarity(distances: torch.Tensor, anomalous: torch.Tensor) -> torch.Tensor:
    """The mean cosine similarity 1 - d, floored at 0, over the anomalous pixels of a batch, weighted by each pixel's
    anomalous area share (B,h,w) x2 -> (); 0 when the batch has none. Minimising it drives a student's features at
    a synthetic defect to at least orthogonal to the teacher's, so the discrepancy there is as large as it gets."""
    return (anomalous * (1.0 - distances).clamp(min=0.0)).sum() / anomalous.sum().clamp(min=_EPS)


def local_average(features: torch.Tensor, patch_size: int = 3, *, count_padding: bool = False) -> torch.Tensor:
    """Each position's feature averaged over its patch_size x patch_size neighbourhood (B,C,h,w) -> (B,C,h,w).

    At the border only the neighbours inside the map are averaged, unless `count_padding`: then the missing ones
    count as zeros (the sum is divided by patch_size^2 everywhere), which shrinks border features towards 0."""
    if patch_size == 1:
        return features
    return F.avg_pool2d(features, patch_size, stride=1, padding=patch_size // 2, count_include_pad=count_padding)


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """ResNet basic block; `stride` 2 halves the resolution, `upsample` doubles it with a transposed conv (RD)."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, upsample: bool = False,
                 relu_output: bool = True) -> None:
        super().__init__()
        if upsample and stride != 1:
            raise ValueError("a block either down- or up-samples, not both")
        if upsample:
            first: nn.Module = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, bias=False)
        else:
            first = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.conv1 = first
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if upsample:
            self.shortcut = nn.Sequential(nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, bias=False),
                                          nn.BatchNorm2d(out_channels))
        elif stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))
        else:
            self.shortcut = nn.Identity()
        self.relu_output = relu_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return F.relu(out) if self.relu_output else out


class PyramidEmbedding(nn.Module):
    """Fuses a pyramid of consecutive levels (strides 4, 8, 16 by default) into one compact code at twice the
    deepest level's stride.

    This is RD's one-class bottleneck and DSKD's deep-feature (DF) embedding module: each level is brought to the
    deepest level's stride by strided 3x3 conv+BN+ReLU (widths doubling towards the deepest level's), the levels are
    concatenated, and a residual stage with stride 2 compresses them. The code is the only path from the input to a
    decoder student, which is what keeps the decoder from copying anomalies. Levels are `reduce1`, `reduce2`, ...
    shallow first, so a three-level embedding keeps the parameter names of earlier checkpoints.
    """

    def __init__(self, in_channels: Sequence[int], code_channels: int, *, blocks: int = 2) -> None:
        super().__init__()
        if len(in_channels) < 2:
            raise ValueError(f"the embedding fuses at least two levels, got {len(in_channels)}")
        width = in_channels[-1]
        self.n_levels = len(in_channels)
        for index, channels in enumerate(in_channels):
            downsamplings = self.n_levels - 1 - index
            if downsamplings == 0:
                reduce: nn.Module = conv_bn_relu(channels, width, 1)
            else:
                # widths w / 2^(n-1), ..., w / 2, w: each stride-2 step doubles the channels up to the deepest's
                widths = [max(1, width >> shift) if width >= 2 else width for shift in range(downsamplings - 1, -1, -1)]
                steps = [conv_bn_relu(c_in, c_out, 2) for c_in, c_out in zip([channels, *widths[:-1]], widths)]
                reduce = steps[0] if len(steps) == 1 else nn.Sequential(*steps)
            self.add_module(f"reduce{index + 1}", reduce)
        stage: list[nn.Module] = [ResidualBlock(self.n_levels * width, code_channels, stride=2)]
        stage += [ResidualBlock(code_channels, code_channels) for _ in range(blocks - 1)]
        self.fuse = nn.Sequential(*stage)
        self.code_channels = code_channels

    def forward(self, pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(pyramid) != self.n_levels:
            raise ValueError(f"the embedding was built for {self.n_levels} levels, got {len(pyramid)}")
        reduced = [getattr(self, f"reduce{index + 1}")(level) for index, level in enumerate(pyramid)]
        return self.fuse(torch.cat(reduced, dim=1))


class MirroredDecoder(nn.Module):
    """Decoder student: restores the teacher levels from the embedding's code, deep to shallow (RD).

    Each stage doubles the resolution with a transposed-conv residual block followed by plain residual blocks.
    `relu_output=False` leaves each stage's output linear, for teachers whose taps are not ReLU outputs
    (EfficientNet's projection convolutions are signed).
    """

    def __init__(self, code_channels: int, level_channels: Sequence[int], *, blocks_per_stage: int = 2,
                 relu_output: bool = True) -> None:
        super().__init__()
        stages = []
        in_channels = code_channels
        for out_channels in reversed(list(level_channels)):
            blocks: list[nn.Module] = []
            for index in range(blocks_per_stage):
                last = index == blocks_per_stage - 1
                blocks.append(ResidualBlock(in_channels if index == 0 else out_channels, out_channels,
                                            upsample=index == 0, relu_output=relu_output or not last))
            stages.append(nn.Sequential(*blocks))
            in_channels = out_channels
        self.stages = nn.ModuleList(stages)

    def forward(self, code: torch.Tensor) -> list[torch.Tensor]:
        """Returns the restored levels in increasing stride order (shallow first), like the teacher."""
        outputs = []
        x = code
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs[::-1]


def reverse_student(in_channels: Sequence[int], level_channels: Sequence[int], *, bottleneck_blocks: int,
                    decoder_blocks: int, relu_output: bool) -> tuple[PyramidEmbedding, MirroredDecoder]:
    """RD's student, shared by RD, DSKD's Sd and AAND: a pyramid embedding to a code of twice the deepest level's
    channels at twice its stride (32 for levels 1-3), and the mirrored decoder that restores `level_channels`."""
    code_channels = 2 * level_channels[-1]
    embedding = PyramidEmbedding(in_channels, code_channels, blocks=bottleneck_blocks)
    decoder = MirroredDecoder(code_channels, level_channels, blocks_per_stage=decoder_blocks, relu_output=relu_output)
    return embedding, decoder
