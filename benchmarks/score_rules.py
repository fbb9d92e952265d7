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
from distillad.methods.parts import cosine_distance_map, local_average
from distillad.metrics import image_auroc


def raw_maps(run: distillad.Run, samples: list[Sample], size: int,
             feature_pool: int = 1, pair: str = "teacher") -> tuple[torch.Tensor, np.ndarray]:
    """(N, students, levels, size, size) maps at `size` px, and the labels. With `feature_pool` k > 1 the maps are
    the cosine distance between the k x k local averages of the teacher's and the student's features. With
    `pair="students"` (two-student runs) there is one map per level: the distance between the two students."""
    out, labels = [], []
    k = feature_pool
    with torch.inference_mode():
        for batch in DataLoader(ImageDataset(samples, run.image_size), batch_size=16):
            if pair == "students":
                first, second = run.scorer.model.feature_pairs(batch["image"])
                per = [[cosine_distance_map(se, sd) for (_, se), (_, sd) in zip(first, second)]]
            elif k > 1:
                per = [[cosine_distance_map(local_average(t, k), local_average(s, k)) for t, s in student]
                       for student in run.scorer.model.feature_pairs(batch["image"])]
            else:
                per = run.scorer.raw_maps(batch["image"])
            stacked = torch.stack([torch.stack([F.interpolate(m[:, None], size=size, mode="bilinear",
                                                              align_corners=False)[:, 0] for m in levels], 1)
                                   for levels in per], 1)      # B,S,L,size,size
            out.append(stacked)
            labels.append(batch["label"].numpy())
    return torch.cat(out), np.concatenate(labels)


def blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    from distillad.scoring import GaussianBlur

    return GaussianBlur(sigma)(maps)


def load_or_compute(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, float]:
    """The validation and test raw maps, cached next to the run (`score_rules_<size>.pt`) so rules can be re-screened
    without a model pass."""
    suffix = "_students" if args.pair == "students" else ""
    cache = args.run / f"score_rules_{args.size}_pool{args.feature_pool}{suffix}.pt"
    run = distillad.load(args.run)
    sigma = run.config.options.get("sigma", 4.0) * args.size / run.image_size
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        return saved["val"], saved["test"], saved["labels"].numpy(), sigma
    split = load_category(args.data, val_fraction=run.config.val_fraction, seed=run.config.seed)
    val_samples = [Sample(Path(p), 0, "good", None) for p in run.meta["data"]["val_files"]]
    val, _ = raw_maps(run, val_samples, args.size, args.feature_pool, args.pair)
    test, labels = raw_maps(run, split.test, args.size, args.feature_pool, args.pair)
    torch.save({"val": val, "test": test, "labels": torch.from_numpy(labels)}, cache)
    return val, test, labels, sigma


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--size", type=int, default=64, help="map resolution for the screening (default 64)")
    parser.add_argument("--feature-pool", type=int, default=1,
                        help="k > 1: compare k x k local averages of the teacher's and students' features")
    parser.add_argument("--pair", choices=("teacher", "students"), default="teacher",
                        help="students: score the distance between a two-student run's students instead of each "
                             "student's distance to the teacher")
    args = parser.parse_args()
    val, test, labels, sigma = load_or_compute(args)
    n_students, n_levels = test.shape[1], test.shape[2]

    def rule_scores(fuse_maps, *, excess: bool = False, topk: float = 0.0, blur_factor: float = 1.0) -> torch.Tensor:
        """Image scores of the test images; with `excess`, over the per-position maximum of the validation maps
        (leave-one-out is not needed here: only test images are scored); `blur_factor` scales the map's blur."""
        t = blur(fuse_maps(test), sigma * blur_factor)
        if excess:
            t = t - blur(fuse_maps(val), sigma * blur_factor).amax(0)
        flat = t.flatten(1)
        if topk > 0:
            k = max(1, int(round(topk * flat.shape[1])))
            return flat.topk(k, dim=1).values.mean(1)
        return flat.amax(1)

    def subset(students: list[int], levels: list[int]):
        return lambda maps: maps[:, students][:, :, levels].sum(2).mean(1)

    everything = subset(list(range(n_students)), list(range(n_levels)))
    rules: dict[str, torch.Tensor] = {}
    rules["default: max of fused map"] = rule_scores(everything)
    rules["excess over per-position max (current default)"] = rule_scores(everything, excess=True)
    for k in (0.001, 0.01):
        rules[f"excess, top {k:g} mean"] = rule_scores(everything, excess=True, topk=k)
    for factor in (0.5, 2.0, 4.0):
        rules[f"excess, blur sigma x{factor:g}"] = rule_scores(everything, excess=True, blur_factor=factor)
    for s in range(n_students):
        rules[f"student {s}, all levels, excess"] = rule_scores(subset([s], list(range(n_levels))), excess=True)
        for lvl in range(n_levels):
            rules[f"student {s} level {lvl + 1} alone"] = rule_scores(subset([s], [lvl]))
            rules[f"student {s} level {lvl + 1} alone, excess"] = rule_scores(subset([s], [lvl]), excess=True)
    students = list(range(n_students))
    for levels in ([1, 2], [2], [0, 1]):
        name = "+".join(str(lvl + 1) for lvl in levels)
        rules[f"levels {name}, both students"] = rule_scores(subset(students, levels))
        rules[f"levels {name}, both students, excess"] = rule_scores(subset(students, levels), excess=True)

    # each level's image score standardised by its validation scores, then summed (every level votes)
    def level_votes(excess: bool) -> torch.Tensor:
        total = torch.zeros(test.shape[0])
        for lvl in range(n_levels):
            fuse_one = subset(students, [lvl])
            t, v = blur(fuse_one(test), sigma), blur(fuse_one(val), sigma)
            if excess:
                ref = v.amax(0)
                t = t - ref
                v = v - ref      # in-sample for validation: the z-scale only
            ts, vs = t.flatten(1).amax(1), v.flatten(1).amax(1)
            total += (ts - vs.mean()) / (vs.std() + 1e-6)
        return total

    rules["level votes (z of each level's max)"] = level_votes(False)
    rules["level votes on excess"] = level_votes(True)
    for name, scores in rules.items():
        print(f"{image_auroc(scores.numpy(), labels) * 100:6.1f}  {name}")


if __name__ == "__main__":
    main()
