"""Image AUROC per defect type: each type's defective test images against all the good ones, from the image scores
the benchmark cells saved (cells/VARIANT/CATEGORY/seedS/test.json), averaged over seeds.

    python benchmarks/defect_types.py runs/benchmarks/study256 --variants dskd dskd_l4_e30 patchcore aand
    python benchmarks/defect_types.py runs/benchmarks/study256 --variants dskd patchcore --by-aspect

Shows which kinds of defect a method misses, which one image AUROC over all types hides. `--by-aspect` also splits
the test images by how far their aspect ratio is from square (every image is stretched to a square for the model)
and gives the rank correlation of the good images' scores with that distortion.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from distillad.data.images import read_size
from distillad.metrics import image_auroc

# |log(width / height)| bins: near square, up to 2:1, beyond
ASPECT_BINS = ((0.0, 0.3), (0.3, 0.7), (0.7, float("inf")))


def per_type(test_json: Path) -> dict[str, float]:
    """{defect type: image AUROC of its images against the good test images}."""
    images = json.loads(test_json.read_text(encoding="utf-8"))["images"]
    kinds = np.array([image["defect_type"] for image in images])
    scores = np.array([image["score"] for image in images], dtype=np.float64)
    labels = np.array([image["label"] for image in images])
    out = {}
    for kind in sorted(set(kinds[labels == 1])):
        chosen = (labels == 0) | (kinds == kind)
        out[f"{kind} ({int((kinds == kind).sum())})"] = image_auroc(scores[chosen], labels[chosen])
    return out


def by_aspect(test_json: Path) -> tuple[float, list[tuple[int, int, float]]]:
    """Spearman correlation of the good images' scores with |log aspect|, and per ASPECT_BINS bin
    (images, good images, image AUROC)."""
    images = json.loads(test_json.read_text(encoding="utf-8"))["images"]
    sizes = np.array([read_size(image["path"]) for image in images], dtype=np.float64)
    distortion = np.abs(np.log(sizes[:, 0] / sizes[:, 1]))
    scores = np.array([image["score"] for image in images], dtype=np.float64)
    labels = np.array([image["label"] for image in images])
    good = labels == 0
    bins = []
    for low, high in ASPECT_BINS:
        chosen = (distortion >= low) & (distortion < high)
        both = chosen.any() and 0 < labels[chosen].sum() < chosen.sum()
        bins.append((int(chosen.sum()), int((chosen & good).sum()),
                     image_auroc(scores[chosen], labels[chosen]) if both else float("nan")))
    varied = np.ptp(distortion[good]) > 0 and np.ptp(scores[good]) > 0
    return (float(spearmanr(scores[good], distortion[good])[0]) if varied else float("nan")), bins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="benchmark output folder (holds cells/)")
    parser.add_argument("--variants", nargs="+", required=True)
    parser.add_argument("--by-aspect", action="store_true", help="also split by the images' aspect ratio")
    args = parser.parse_args()
    for variant in args.variants:
        for category_dir in sorted((args.root / "cells" / variant).glob("*")):
            values: dict[str, list[float]] = {}
            for test_json in sorted(category_dir.glob("seed*/test.json")):
                for kind, auroc in per_type(test_json).items():
                    values.setdefault(kind, []).append(auroc)
            if values:
                seeds = max(len(v) for v in values.values())
                print(f"| {variant} | {category_dir.name} | {seeds} | " + " | ".join(
                    f"{kind} {statistics.fmean(v) * 100:.1f}" for kind, v in values.items()) + " |")
            if args.by_aspect:
                for test_json in sorted(category_dir.glob("seed*/test.json")):
                    rho, bins = by_aspect(test_json)
                    print(f"    {test_json.parent.name}: good scores vs |log aspect| Spearman {rho:+.2f}; "
                          + "; ".join(f"|log aspect| in [{low:g}, {high:g}): {n} images ({n_good} good), "
                                      f"image AUROC {auroc * 100:.1f}"
                                      for (low, high), (n, n_good, auroc) in zip(ASPECT_BINS, bins)))


if __name__ == "__main__":
    main()
