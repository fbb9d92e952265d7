"""Diagnosis: how well do the frozen teacher's features alone separate a category's test images?

A training-free nearest-neighbour probe per teacher level (and pairs of levels): every patch feature of the
training images (optionally averaged over 3x3 neighbourhoods, PatchCore's local aggregation) goes into a bank,
randomly subsampled to `--bank` entries; a test image's score is the largest distance of its patches to their nearest
bank entry (L2, or cosine as the students' maps use). Printed: the image AUROC of each probe. It tells whether the
information a student-teacher method needs is in the teacher's features, and at which level.

    python benchmarks/teacher_probe.py ../shared/data/mt/magnetic_tile
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from distillad.backbones import backbone_spec, create_backbone
from distillad.data import ImageDataset, Sample, load_category
from distillad.methods.parts import local_average
from distillad.metrics import image_auroc


def teacher_levels(net: torch.nn.Module, spec, samples: list[Sample], size: int) -> tuple[list[torch.Tensor], np.ndarray]:
    mean = torch.tensor(spec.native_mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.native_std).view(1, 3, 1, 1)
    out: list[list[torch.Tensor]] = []
    labels = []
    with torch.inference_mode():
        for batch in DataLoader(ImageDataset(samples, size), batch_size=16):
            features = net((batch["image"] - mean) / std)
            out = out or [[] for _ in features]
            for level, f in enumerate(features):
                out[level].append(f)
            labels.append(batch["label"].numpy())
    return [torch.cat(parts) for parts in out], np.concatenate(labels)


def probe(train: list[torch.Tensor], test: list[torch.Tensor], labels: np.ndarray, levels: list[int], *,
          pool: bool, distance: str, bank_size: int, seed: int, count_padding: bool = False) -> float:
    """Image AUROC of the nearest-neighbour probe on `levels` (1-based, resized to the shallowest one's grid)."""
    def stack(features: list[torch.Tensor]) -> torch.Tensor:
        size = features[levels[0] - 1].shape[-2:]
        chosen = [local_average(features[lv - 1], 3 if pool else 1, count_padding=count_padding) for lv in levels]
        return torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in chosen], 1)

    tr, te = stack(train), stack(test)
    bank = tr.permute(0, 2, 3, 1).reshape(-1, tr.shape[1])
    bank = bank[torch.randperm(len(bank), generator=torch.Generator().manual_seed(seed))[:bank_size]]
    queries = te.permute(0, 2, 3, 1).reshape(te.shape[0], -1, te.shape[1])
    if distance == "cosine":
        bank = F.normalize(bank, dim=1)
        scores = [(1 - F.normalize(q, dim=1) @ bank.T).amin(1).amax().item() for q in queries]
    else:
        scores = [torch.cdist(q, bank).amin(1).amax().item() for q in queries]
    return image_auroc(np.asarray(scores), labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="a category folder in the MVTec layout")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--bank", type=int, default=30000, help="bank entries kept (random subsample)")
    parser.add_argument("--seed", type=int, default=0, help="the validation split and the bank subsample")
    parser.add_argument("--count-padding", action="store_true",
                        help="border averages count the zero padding (PatchCore's patch_padding=zeros)")
    args = parser.parse_args()
    split = load_category(args.data, val_fraction=0.1, seed=args.seed)
    spec = backbone_spec(args.backbone)
    net = create_backbone(args.backbone, levels=(1, 2, 3, 4), pretrained=True).freeze()
    train, _ = teacher_levels(net, spec, split.train, args.size)
    test, labels = teacher_levels(net, spec, split.test, args.size)
    print(f"{args.data.name}: {len(split.train)} training images, {len(labels)} test images, {args.size} px")
    probes = [([2], True, "l2"), ([3], True, "l2"), ([4], True, "l2"), ([2, 3], True, "l2"), ([3, 4], True, "l2"),
              ([3], True, "cosine"), ([3], False, "l2"), ([3], False, "cosine")]
    for levels, pool, distance in probes:
        auroc = probe(train, test, labels, levels, pool=pool, distance=distance, bank_size=args.bank, seed=args.seed,
                      count_padding=args.count_padding)
        what = f"levels {'+'.join(map(str, levels))}, {'3x3 average' if pool else 'raw'}, {distance}"
        print(f"{auroc * 100:6.1f}  {what}", flush=True)


if __name__ == "__main__":
    main()
