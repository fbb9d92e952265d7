"""Threshold rules fitted on defect-free validation scores, judged on the labelled test images of benchmark cells.

For every finished cell of the given variants, the run is loaded with the cell's map options, its validation images
(listed in meta.json) are scored, and each rule below sets a threshold from those scores alone. The test scores
(the cell's test.json) then give each rule's false-alarm rate on good images and detection rate on defective ones,
next to the best possible threshold on the same test scores (the most detections with at most 5 % false alarms),
which no rule may look at.

    python benchmarks/thresholds.py runs/benchmarks/study256 --variants dskd dskd_norm --out thresholds.md
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import stats


def mean_std(k: float) -> Callable[[np.ndarray], float]:
    return lambda v: float(v.mean() + k * v.std(ddof=1))


def quantile_margin(q: float, margin: float) -> Callable[[np.ndarray], float]:
    """The q quantile plus `margin` times its distance from the median: scale-free, robust to one outlier."""
    return lambda v: float(np.quantile(v, q) + margin * (np.quantile(v, q) - np.median(v)))


def gumbel(p: float) -> Callable[[np.ndarray], float]:
    """Image scores are maxima of maps: fit a Gumbel law (maximum likelihood) and cut at exceedance `p`."""
    def rule(v: np.ndarray) -> float:
        loc, scale = stats.gumbel_r.fit(v)
        return float(stats.gumbel_r.isf(p, loc, scale))
    return rule


def gumbel_upper(p: float, confidence: float, resamples: int = 1000) -> Callable[[np.ndarray], float]:
    """The `confidence` quantile, over bootstrap resamples of the validation scores, of the Gumbel threshold at
    exceedance `p`: a threshold whose false-alarm rate stays under `p` with that confidence, so it backs off where
    the validation set is small or its tail uncertain."""
    def rule(v: np.ndarray) -> float:
        rng = np.random.default_rng(0)
        fitted = [stats.gumbel_r.isf(p, *stats.gumbel_r.fit(rng.choice(v, v.size))) for _ in range(resamples)]
        return float(np.quantile(fitted, confidence))
    return rule


def max_margin(margin: float) -> Callable[[np.ndarray], float]:
    """The largest validation score plus `margin` times the validation range."""
    return lambda v: float(v.max() + margin * (v.max() - v.min()))


RULES: dict[str, Callable[[np.ndarray], float]] = {
    "mean+2std": mean_std(2.0),
    "mean+2.5std": mean_std(2.5),
    "mean+3std (the default until issue 12)": mean_std(3.0),
    "mean+4std": mean_std(4.0),
    "gumbel p=0.01": gumbel(0.01),
    "gumbel p=0.001": gumbel(0.001),
    "q95 + 1.0 (q95-median)": quantile_margin(0.95, 1.0),
    "max + 0.25 range": max_margin(0.25),
    "max": max_margin(0.0),
    "gumbel p=0.05": gumbel(0.05),
    "gumbel p=0.02": gumbel(0.02),
    "gumbel p=0.03 (default)": gumbel(0.03),
    "mean+1.5std": mean_std(1.5),
    "gumbel p=0.05, bootstrap 50 %": gumbel_upper(0.05, 0.5),
    "gumbel p=0.05, bootstrap 75 %": gumbel_upper(0.05, 0.75),
    "gumbel p=0.05, bootstrap 90 %": gumbel_upper(0.05, 0.9),
    "gumbel p=0.04, bootstrap 75 %": gumbel_upper(0.04, 0.75),
    "gumbel p=0.03, bootstrap 75 %": gumbel_upper(0.03, 0.75),
}


def best_threshold(scores: np.ndarray, labels: np.ndarray, max_false_alarms: float = 0.05) -> float:
    """The oracle: the lowest threshold whose false-alarm rate on the good test images is <= `max_false_alarms`,
    i.e. the most detections any threshold can give at that false-alarm budget (images above it are defective)."""
    good = np.sort(scores[labels == 0])[::-1]
    allowed = int(np.floor(max_false_alarms * len(good)))      # good images allowed above the threshold
    return float(good[allowed]) if allowed < len(good) else float(good.min()) - 1.0


def rates(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float]:
    """(false-alarm rate on good images, detection rate on defective ones) of `threshold`."""
    predicted = scores > threshold
    return float(predicted[labels == 0].mean()), float(predicted[labels == 1].mean())


def validation_scores(cell: dict, cell_dir: Path) -> np.ndarray:
    import distillad
    from distillad.data import ImageDataset, Sample
    from distillad.engine.calibrate import fit_normal_statistics
    from distillad.scoring.calibration import ThresholdRule

    run_dir = Path(cell["run_dir"])
    saved = json.loads((run_dir / "meta.json").read_text())["config"]["options"]
    wanted = cell["config"]["options"]
    changed = {k: v for k, v in wanted.items() if saved.get(k, v) != v or k not in saved}
    run = distillad.load(run_dir, map_options=changed or None)
    files = [Path(p) for p in run.meta["data"]["val_files"]]
    dataset = ImageDataset([Sample(p, 0, "good", None) for p in files], run.image_size)
    # the scores calibration itself sees (leave-one-out under position_norm, where a validation image scored
    # against a reference that contains it would be <= 0)
    _, _, scores = fit_normal_statistics(run.scorer, dataset, threshold=ThresholdRule(), batch_size=16, device="cpu")
    return np.asarray(scores, dtype=np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="benchmark output folder (holds cells/)")
    parser.add_argument("--variants", nargs="+", required=True)
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    args = parser.parse_args()
    rows: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for variant in args.variants:
        for cell_file in sorted((args.root / "cells" / variant).glob("*/seed*/cell.json")):
            cell = json.loads(cell_file.read_text())
            test = json.loads((cell_file.parent / "test.json").read_text())
            scores = np.array([i["score"] for i in test["images"]], dtype=np.float64)
            labels = np.array([i["label"] for i in test["images"]])
            val = validation_scores(cell, cell_file.parent)
            for name, rule in RULES.items():
                rows.setdefault((variant, cell["category"], name), []).append(rates(scores, labels, rule(val)))
            best = best_threshold(scores, labels)
            rows.setdefault((variant, cell["category"], "oracle: most detections at <= 5 % false alarms"),
                            []).append(rates(scores, labels, best))
            print(f"{variant} {cell['category']} seed {cell['seed']}: {len(val)} validation scores", flush=True)
    lines = ["| variant | category | rule | false alarms % | detections % | seeds | worst seed: false alarms % | "
             "worst seed: detections % |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for (variant, category, name), values in rows.items():
        far = np.mean([v[0] for v in values]) * 100
        det = np.mean([v[1] for v in values]) * 100
        worst_far = max(v[0] for v in values) * 100
        worst_det = min(v[1] for v in values) * 100
        lines.append(f"| {variant} | {category} | {name} | {far:.1f} | {det:.1f} | {len(values)} | {worst_far:.1f} | "
                     f"{worst_det:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
