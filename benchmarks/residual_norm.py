"""Exploration: would DSKD's maps separate better if each channel of the student error were weighed by how much it
varies on defect-free images?

The default map is 1 - cos(T, S) = 0.5 * |t - s|^2 with t, s the unit-length teacher and student features. If the
students failed on normal texture in a few unpredictable channels only, standardising the residual r = t - s per
channel (`diag`: mean of ((r - mean) / std)^2) or whitening it (`mahal`: a Mahalanobis distance with a shrunk
covariance, divided by the channel count) with statistics of the run's defect-free validation images would
down-weight them. Prints image AUROC (max of the blurred fused map, and its excess over the per-position validation
maximum as the default score) and pixel AUROC at `--size` px, per rule and student, then per level. A screen:
nothing here chooses a default, and the validation images are scored with statistics fitted on themselves.

    python benchmarks/residual_norm.py runs/benchmarks/study256/cells/dskd/magnetic_tile/seed0/run \
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
from distillad.metrics import image_auroc, pixel_auroc
from distillad.scoring import GaussianBlur

RULES = ("cos", "diag", "mahal")
Statistics = list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


def unit_residuals(model: torch.nn.Module, images: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per student, per level: t/|t| - s/|s| (B,C,h,w)."""
    return [[F.normalize(t, dim=1, eps=1e-6) - F.normalize(s, dim=1, eps=1e-6) for t, s in student]
            for student in model.feature_pairs(images)]


def fit_statistics(model: torch.nn.Module, loader: DataLoader, shrink: float) -> Statistics:
    """Per student and level: the residual's mean, per-channel std and shrunk inverse covariance over all positions."""
    moments: dict[tuple[int, int], list] = {}
    with torch.inference_mode():
        for batch in loader:
            for s, levels in enumerate(unit_residuals(model, batch["image"])):
                for lvl, r in enumerate(levels):
                    x = r.permute(0, 2, 3, 1).reshape(-1, r.shape[1]).double()
                    entry = moments.setdefault((s, lvl), [0, 0.0, 0.0])
                    entry[0] += x.shape[0]
                    entry[1] = entry[1] + x.sum(0)
                    entry[2] = entry[2] + x.T @ x
    n_students = 1 + max(s for s, _ in moments)
    statistics: Statistics = [[] for _ in range(n_students)]
    for (s, _), (n, first, second) in sorted(moments.items()):
        mean = first / n
        covariance = second / n - torch.outer(mean, mean)
        channels = covariance.shape[0]
        shrunk = covariance + shrink * covariance.trace() / channels * torch.eye(channels, dtype=torch.float64)
        statistics[s].append((mean.float(), covariance.diagonal().clamp_min(1e-12).sqrt().float(),
                              torch.linalg.inv(shrunk).float()))
    return statistics


def rule_maps(model: torch.nn.Module, loader: DataLoader, statistics: Statistics,
              size: int) -> tuple[dict[str, torch.Tensor], np.ndarray, torch.Tensor]:
    """Per rule: (N, students, levels, size, size) maps; the image labels; the masks at `size` px."""
    maps: dict[str, list[torch.Tensor]] = {rule: [] for rule in RULES}
    labels, masks = [], []
    with torch.inference_mode():
        for batch in loader:
            residuals = unit_residuals(model, batch["image"])
            per_rule = {rule: [[None] * len(levels) for levels in residuals] for rule in RULES}
            for s, levels in enumerate(residuals):
                for lvl, r in enumerate(levels):
                    mean, std, precision = statistics[s][lvl]
                    centred = r - mean[None, :, None, None]
                    flat = centred.permute(0, 2, 3, 1)
                    values = {"cos": 0.5 * (r ** 2).sum(1),
                              "diag": ((centred / std[None, :, None, None]) ** 2).mean(1),
                              "mahal": ((flat @ precision) * flat).sum(-1) / r.shape[1]}
                    for rule, m in values.items():
                        per_rule[rule][s][lvl] = F.interpolate(m[:, None], size=(size, size), mode="bilinear",
                                                               align_corners=False)[:, 0]
            for rule in RULES:
                maps[rule].append(torch.stack([torch.stack(levels, 1) for levels in per_rule[rule]], 1))
            labels.append(batch["label"].numpy())
            masks.append(F.interpolate(batch["mask"].float()[:, None], size=(size, size), mode="area")[:, 0] > 0.5)
    return {rule: torch.cat(m) for rule, m in maps.items()}, np.concatenate(labels), torch.cat(masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--size", type=int, default=64, help="map resolution of the screen (default 64)")
    parser.add_argument("--shrink", type=float, default=0.01,
                        help="covariance shrinkage towards the mean variance, as a share (default 0.01)")
    args = parser.parse_args()
    run = distillad.load(args.run)
    model = run.scorer.model.eval()
    split = load_category(args.data, val_fraction=run.config.val_fraction, seed=run.config.seed)
    validation = [Sample(Path(p), 0, "good", None) for p in run.meta["data"]["val_files"]]

    def loader(samples: list[Sample]) -> DataLoader:
        return DataLoader(ImageDataset(samples, run.image_size), batch_size=16)

    statistics = fit_statistics(model, loader(validation), args.shrink)
    val_maps, _, _ = rule_maps(model, loader(validation), statistics, args.size)
    test_maps, labels, masks = rule_maps(model, loader(split.test), statistics, args.size)
    blur = GaussianBlur(run.config.options.get("sigma", 4.0) * args.size / run.image_size)

    def report(name: str, test: torch.Tensor, val: torch.Tensor, pixels: bool) -> None:
        plain = image_auroc(test.flatten(1).amax(1).numpy(), labels)
        excess = image_auroc((test - val.amax(0)).flatten(1).amax(1).numpy(), labels)
        line = f"{name:28s} image AUROC {plain * 100:5.1f}   excess {excess * 100:5.1f}"
        if pixels:
            line += f"   pixel AUROC {pixel_auroc(test.numpy(), masks.numpy()) * 100:5.1f}"
        print(line)

    n_students, n_levels = test_maps["cos"].shape[1:3]
    for rule in RULES:
        for name, students in [("both students", list(range(n_students)))] + \
                [(f"student {s}", [s]) for s in range(n_students)]:
            report(f"{rule}, {name}", blur(test_maps[rule][:, students].sum(2).mean(1)),
                   blur(val_maps[rule][:, students].sum(2).mean(1)), pixels=True)
        for lvl in range(n_levels):
            report(f"{rule}, level {lvl + 1}", blur(test_maps[rule][:, :, lvl].mean(1)),
                   blur(val_maps[rule][:, :, lvl].mean(1)), pixels=False)


if __name__ == "__main__":
    main()
