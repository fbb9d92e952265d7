"""Exploration: how a trained run's per-student, per-level maps can become an image score.

Scores the run's validation images (defect-free) and the category's test images once, keeps every student's and
level's raw map, and prints the image AUROC of candidate rules built from them, so rules can be screened before one
becomes a map option and goes through the paired 3-seed benchmark (nothing here chooses a default).

    python benchmarks/score_rules.py runs/benchmarks/study256/cells/dskd/magnetic_tile/seed0/run \
        ../shared/data/mt/magnetic_tile
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import distillad
from distillad.data import ImageDataset, Sample, load_category
from distillad.metrics import image_auroc


def raw_maps(run: distillad.Run, samples: list[Sample], size: int) -> tuple[torch.Tensor, np.ndarray]:
    """(N, students, levels, size, size) maps at `size` px, and the labels."""
    out, labels = [], []
    with torch.inference_mode():
        for batch in DataLoader(ImageDataset(samples, run.image_size), batch_size=16):
            per = run.scorer.raw_maps(batch["image"])
            stacked = torch.stack([torch.stack(levels, 1) for levels in per], 1)      # B,S,L,H,W
            b, s, l, h, w = stacked.shape
            out.append(F.adaptive_avg_pool2d(stacked.reshape(b, s * l, h, w), size).reshape(b, s, l, size, size))
            labels.append(batch["label"].numpy())
    return torch.cat(out), np.concatenate(labels)


def blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    from distillad.scoring import GaussianBlur

    return GaussianBlur(sigma)(maps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--size", type=int, default=64, help="map resolution for the screening (default 64)")
    args = parser.parse_args()
    run = distillad.load(args.run)
    split = load_category(args.data, val_fraction=run.config.val_fraction, seed=run.config.seed)
    val, _ = raw_maps(run, [Sample(Path(p), 0, "good", None) for p in run.meta["data"]["val_files"]], args.size)
    test, labels = raw_maps(run, split.test, args.size)
    sigma = run.config.options.get("sigma", 4.0) * args.size / run.image_size
    n_students, n_levels = test.shape[1], test.shape[2]

    q_low = torch.quantile(val.transpose(0, 2).reshape(n_levels, n_students, -1).transpose(0, 1)[..., ::7], 0.9, dim=-1)
    q_high = torch.quantile(val.transpose(0, 2).reshape(n_levels, n_students, -1).transpose(0, 1)[..., ::7], 0.995,
                            dim=-1)

    def normalised(maps: torch.Tensor) -> torch.Tensor:
        return (maps - q_low[None, :, :, None, None]) / (q_high - q_low)[None, :, :, None, None]

    def fused(maps: torch.Tensor) -> torch.Tensor:
        return blur(maps.sum(2).mean(1), sigma)

    rules: dict[str, torch.Tensor] = {}
    rules["default: max of fused map"] = fused(test).flatten(1).amax(1)
    rules["quantile-normalised levels"] = fused(normalised(test)).flatten(1).amax(1)
    for s in range(n_students):
        for lvl in range(n_levels):
            rules[f"student {s} level {lvl} alone"] = blur(test[:, s, lvl], sigma).flatten(1).amax(1)
    val_fused, test_fused = fused(val), fused(test)
    rules["excess over per-position max of validation"] = (test_fused - val_fused.amax(0)).flatten(1).amax(1)
    z = (test_fused - val_fused.mean(0)) / (val_fused.std(0) + 1e-6)
    rules["per-position z-score"] = z.flatten(1).amax(1)
    val_n, test_n = fused(normalised(val)), fused(normalised(test))
    rules["normalised + excess over per-position max"] = (test_n - val_n.amax(0)).flatten(1).amax(1)
    margin = max(1, args.size // 16)
    rules["default, border of 1/16 ignored"] = test_fused[:, margin:-margin, margin:-margin].flatten(1).amax(1)
    for name, scores in rules.items():
        print(f"{image_auroc(scores.numpy(), labels) * 100:6.1f}  {name}")


if __name__ == "__main__":
    main()
