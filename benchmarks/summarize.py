"""Group a benchmark's results.csv into the comparison tables of benchmarks/RESULTS.md.

    python benchmarks/summarize.py runs/benchmarks/study/results.csv > tables.md

Each table lists, per category, the mean ± sample std over seeds of every metric (in %) and of mean3 (the mean of
image AUROC, pixel AUROC and AUPRO: the number design choices are decided by), and for each variant the mean paired
difference to the reference variant (same category, same seed: same validation split and the same data order)
with how many seeds it scored higher. Nothing here is computed that results.csv does not hold.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

METRICS = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO@0.3"),
           ("image_f1max", "image F1"), ("pixel_f1max", "pixel F1"))

# The one number design choices are decided by: the mean of the three threshold-free metrics.
SUMMARY = "mean3"
SUMMARY_OF = ("image_auroc", "pixel_auroc", "aupro")

# title, reference variant, variants in order (the reference first)
TABLES = (
    ("Methods at their defaults", "dskd", ("dskd", "stfpm", "rd", "aand")),
    ("DSKD against its ablations (docs/methods.md#dskd-ablations)", "dskd",
     ("dskd", "dskd_se_only", "dskd_sd_only", "dskd_no_interaction", "dskd_one_level", "dskd_two_levels")),
    ("DSKD design choices: DF input, loss, teacher input normalisation", "dskd",
     ("dskd", "dskd_df_both", "dskd_global_cosine", "dskd_imagenet_norm")),
    ("DSKD map fusion (the same trained models, evaluated with other fusion rules)", "dskd",
     ("dskd", "dskd_fusion_max", "dskd_fusion_product", "dskd_level_product")),
    ("DSKD teachers", "dskd", ("dskd", "dskd_lite1", "dskd_lite2")),
    ("AAND and its amplification ablation, against RD with the same teacher and DSKD", "aand",
     ("aand", "aand_no_amplify", "rd", "dskd")),
    ("How DSKD's maps become an image score (benchmarks/study256.yaml: the same trained models)", "dskd",
     ("dskd", "dskd_norm", "dskd_top1", "dskd_norm_top1", "dskd_norm_max", "dskd_pos", "dskd_norm_pos",
      "dskd_pos_score", "dskd_norm_pos_score")),
    ("The training-free reference against default DSKD", "dskd", ("dskd", "patchcore")),
    ("Training length (benchmarks/length128.yaml, 128 px)", "dskd", ("dskd", "dskd_e30")),
    ("AAND at 256 px against DSKD (benchmarks/study256.yaml)", "dskd", ("dskd", "aand", "aand_pos_score")),
    ("Denoising students at 256 px against DSKD (benchmarks/study256.yaml)", "dskd",
     ("dskd", "dskd_denoise", "dskd_denoise_pos")),
    ("PatchCore's border averaging (benchmarks/study256.yaml)", "patchcore_inside", ("patchcore_inside", "patchcore")),
    ("A fourth, stride-32 level and 30 epochs at 256 px against DSKD (benchmarks/study256.yaml)", "dskd",
     ("dskd", "dskd_l4", "dskd_l4_e30")),
    ("The students matched to 3x3-averaged teacher features at 256 px (benchmarks/study256.yaml)", "dskd",
     ("dskd", "dskd_pool3")),
    ("The loss over each image's hardest pixels, and Se started from Lite1's weights, at 256 px "
     "(benchmarks/study256.yaml; dskd_hard10 is the default since)", "dskd",
     ("dskd", "dskd_hard10", "dskd_hard01", "dskd_hard30", "dskd_init_lite1", "dskd_hard10_l4")),
    ("The fourth level and 30 epochs with the hardest-pixel loss, against the default (benchmarks/study256.yaml)",
     "dskd_hard10", ("dskd_hard10", "dskd_hard10_l4", "dskd_hard10_l4_e30", "dskd_l4_e30")),
    ("Negative students (synthetic anomalies the students are trained not to copy), against the default "
     "(benchmarks/study256.yaml)", "dskd_hard10",
     ("dskd_hard10", "dskd_negative", "dskd_negative10", "dskd_negative_w02", "dskd_negative_w05",
      "dskd_negative25_w02", "dskd_negative_dec", "dskd_negative_enc")),
)


def load(path: Path) -> list[dict[str, object]]:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["seed"] = int(row["seed"])
        for key, _ in METRICS:
            row[key] = float(row[key])
        row["train_seconds"] = float(row["train_seconds"])
        row[SUMMARY] = statistics.fmean(row[k] for k in SUMMARY_OF)
    return rows


def mean_std(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0] * scale:.1f}"
    return f"{statistics.fmean(values) * scale:.1f} ± {statistics.stdev(values) * scale:.1f}"


def paired(rows: list[dict], variant: str, reference: str, category: str, key: str) -> str:
    """Mean difference variant − reference over the seeds both have, and the seeds where variant is higher."""
    ours = {r["seed"]: r[key] for r in rows if r["variant"] == variant and r["category"] == category}
    theirs = {r["seed"]: r[key] for r in rows if r["variant"] == reference and r["category"] == category}
    seeds = sorted(set(ours) & set(theirs))
    if not seeds:
        return "–"
    differences = [ours[s] - theirs[s] for s in seeds]
    higher = sum(d > 0 for d in differences)
    return f"{statistics.fmean(differences) * 100:+.1f} ({higher}/{len(seeds)})"


def table(rows: list[dict], title: str, reference: str, variants: tuple[str, ...]) -> list[str]:
    present = [v for v in variants if any(r["variant"] == v for r in rows)]
    if len(present) < 2:
        return []
    categories = list(dict.fromkeys(r["category"] for r in rows))
    lines = [f"### {title}", "",
             "| category | variant | seeds | " + " | ".join(t for _, t in METRICS)
             + f" | mean3 | Δ image AUROC vs {reference} (wins) | Δ pixel AUROC | Δ AUPRO | Δ mean3 | train s |",
             "|---|---|---|" + "---:|" * (len(METRICS) + 6)]
    for category in categories:
        for variant in present:
            selected = [r for r in rows if r["variant"] == variant and r["category"] == category]
            if not selected:
                continue
            keys = (*SUMMARY_OF, SUMMARY)
            deltas = (["(reference)", "", "", ""] if variant == reference else
                      [paired(rows, variant, reference, category, k) for k in keys])
            seconds = statistics.fmean(r["train_seconds"] for r in selected)
            lines.append(f"| {category} | {variant} | {len(selected)} | "
                         + " | ".join(mean_std([r[k] for r in selected]) for k in (*[k for k, _ in METRICS], SUMMARY))
                         + " | " + " | ".join(deltas) + f" | {seconds:.0f} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_csv", type=Path)
    args = parser.parse_args(argv)
    rows = load(args.results_csv)
    out: list[str] = []
    for title, reference, variants in TABLES:
        out += table(rows, title, reference, variants)
    sys.stdout.write("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
