"""The benchmark's results: rows of the finished cells, results.csv, results.md, and the --dry-run listing.

Its own module because everything here is derived from files (cell.json, the per-variant speed records) and
never trains or measures: results can be rewritten at any time (`benchmark --results-only`) from what is on disk,
and every number in results.csv is the one in a cell.json.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from distillad.benchmark.cells import Cell, cell_status, finished_record, plan_cells
from distillad.benchmark.spec import BenchmarkSpec
from distillad.engine.config import TrainConfig
from distillad.io import atomic_write_text

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "image_f1max", "pixel_f1max")
METRIC_TITLES = ("image AUROC", "pixel AUROC", "AUPRO@0.3", "image F1-max", "pixel F1-max")
SPEED_COLUMNS = ("latency_ms_bs1", "throughput_ips_bs16", "params", "trainable_params", "gflops", "peak_rss_mb")
CSV_COLUMNS = ("variant", "method", "backbone", "category", "seed", "image_size", "epochs", *METRIC_KEYS,
               "train_seconds", "inference_seconds", "n_test_images", "n_defective", *SPEED_COLUMNS, "run_dir")
SPEED_FOLDER = "speed"


# ------------------------------------------------------------------------------------------------ speed records


def speed_file(spec: BenchmarkSpec, variant: str) -> Path:
    """OUT/speed/<variant>.json: a variant's speed, measured once on the run of its first finished cell."""
    return spec.out / SPEED_FOLDER / f"{variant}.json"


def speed_identity(config: TrainConfig, settings: dict[str, int]) -> dict[str, Any]:
    """What a speed figure depends on: the architecture, input size, memory format and measurement settings."""
    return {"method": config.method, "backbone": config.backbone, "options": config.options,
            "image_size": config.image_size, "channels_last": config.channels_last, "device": config.device,
            **settings}


def read_speed(spec: BenchmarkSpec, variant: str, config: TrainConfig) -> dict[str, Any] | None:
    """The variant's saved speed figures when they were measured for this config and these settings; else None."""
    if spec.speed is None:
        return None
    try:
        saved = json.loads(speed_file(spec, variant).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return saved["result"] if saved.get("identity") == speed_identity(config, spec.speed) else None


# ------------------------------------------------------------------------------------------------ formatting


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    values = _finite(values)
    if not values:
        return "n/a"
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, spec)


def _seconds(value: float | None) -> str:
    """Training seconds: whole seconds from 100 s up, one decimal below (tiny test runs stay readable)."""
    if value is None or math.isnan(value):
        return ""
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


# ------------------------------------------------------------------------------------------------ results


def results_rows(spec: BenchmarkSpec, cells: list[Cell]) -> list[dict[str, Any]]:
    """One CSV row per finished cell of the plan (metrics as fractions, exactly as in cell.json)."""
    rows = []
    speeds = {c.variant: read_speed(spec, c.variant, c.config) for c in cells}
    for cell in cells:
        record = finished_record(cell)
        if record is None:
            continue
        speed = speeds.get(cell.variant) or {}
        row = {"variant": cell.variant, "method": cell.config.method, "backbone": cell.config.backbone,
               "category": cell.category, "seed": cell.seed, "image_size": cell.config.image_size,
               "epochs": record.get("epochs"), **{k: record["metrics"][k] for k in METRIC_KEYS},
               "train_seconds": round(record["train_seconds"], 2),
               "inference_seconds": round(record["inference_seconds"], 3),
               "n_test_images": record["n_images"], "n_defective": record["n_defective"],
               **{k: speed.get(k) for k in SPEED_COLUMNS}, "run_dir": str(cell.run_dir)}
        for key in ("latency_ms_bs1", "throughput_ips_bs16", "gflops", "peak_rss_mb"):
            if row[key] is not None:
                row[key] = round(row[key], 3)
        rows.append(row)
    return rows


def results_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_COLUMNS})
    return buffer.getvalue()


def _summary_metric(spec: BenchmarkSpec, vrows: list[dict[str, Any]], key: str) -> str:
    """Mean over categories of the per-category means; ± the std over seeds of the per-seed means over categories
    (seeds that finished every category)."""
    categories = [c for c in spec.categories if any(r["category"] == c for r in vrows)]
    category_means = [statistics.fmean(_finite([r[key] for r in vrows if r["category"] == c]) or [math.nan])
                      for c in categories]
    complete_seeds = [s for s in spec.seeds
                      if all(any(r["seed"] == s and r["category"] == c for r in vrows) for c in spec.categories)]
    per_seed = [statistics.fmean([r[key] for r in vrows if r["seed"] == s]) for s in complete_seeds]
    finite = _finite(category_means)
    if not finite:
        return "n/a"
    if len(_finite(per_seed)) >= 2:
        return f"{statistics.fmean(finite) * 100:.1f} ± {statistics.stdev(_finite(per_seed)) * 100:.1f}"
    return f"{statistics.fmean(finite) * 100:.1f}"


def results_markdown(spec: BenchmarkSpec, cells: list[Cell], rows: list[dict[str, Any]]) -> str:
    """Summary per variant (mean over categories, speed) and detail per category (mean ± std over seeds)."""
    total = {v: sum(c.variant == v for c in cells) for v in spec.variants}
    speed_note = (f"Speed: measured once per variant on the run of its first finished cell, in a fresh process, "
                  f"{spec.speed['threads']} thread(s), at the run's image size; latency = median of "
                  f"{spec.speed['repeats']} single-image runs after {spec.speed['warmup']} warm-up; throughput at "
                  "batch 16; params = teacher + students; GFLOPs per image as torch's FlopCounterMode counts them "
                  "(2 FLOPs per multiply-add)." if spec.speed else "Speed: not measured (speed: false).")
    lines = [
        "# Benchmark results", "",
        f"Spec: `{spec.source}` · {len(rows)} of {len(cells)} cells finished · seeds {', '.join(map(str, spec.seeds))}"
        f" · updated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}", "",
        "Metrics in % (one decimal), mean ± sample std over seeds; with one seed, the mean alone. "
        "Mean over categories: the mean of the per-category means; ± is the std over seeds of the per-seed "
        "means over categories (seeds that finished every category). Train s: training seconds per cell (mean), "
        "on the machine and thread count of the run.",
        "", speed_note, "",
        "## Mean over categories", "",
        "| variant | method | backbone | px | cells | " + " | ".join(METRIC_TITLES) +
        " | train s | latency ms (bs 1) | images/s (bs 16) | params M | GFLOPs |",
        "|" + " --- |" * 5 + " ---: |" * (len(METRIC_KEYS) + 5),
    ]
    by_variant: dict[str, list[dict[str, Any]]] = {v: [r for r in rows if r["variant"] == v] for v in spec.variants}
    for variant, vrows in by_variant.items():
        config = next(c.config for c in cells if c.variant == variant)
        speed = vrows[0] if vrows else {}
        seconds = [r["train_seconds"] for r in vrows]
        done = f"{len(vrows)}/{total[variant]}" + ("" if len(vrows) == total[variant] else " (partial)")
        lines.append(
            f"| {variant} | {config.method} | {config.backbone} | {config.image_size} | {done} | "
            + " | ".join(_summary_metric(spec, vrows, key) for key in METRIC_KEYS)
            + f" | {_seconds(statistics.fmean(seconds) if seconds else None)}"
            + f" | {_fmt(speed.get('latency_ms_bs1'), '.1f')} | {_fmt(speed.get('throughput_ips_bs16'), '.1f')}"
            + f" | {_fmt(speed['params'] / 1e6 if speed.get('params') else None, '.2f')}"
            + f" | {_fmt(speed.get('gflops'), '.2f')} |")
    lines += ["", "## Per category", "",
              "| category | variant | seeds | " + " | ".join(METRIC_TITLES) + " | train s |",
              "|" + " --- |" * 3 + " ---: |" * (len(METRIC_KEYS) + 1)]
    for category in spec.categories:
        for variant, vrows in by_variant.items():
            crows = [r for r in vrows if r["category"] == category]
            if not crows:
                lines.append(f"| {category} | {variant} | 0/{len(spec.seeds)} |" + " |" * (len(METRIC_KEYS) + 1))
                continue
            lines.append(f"| {category} | {variant} | {len(crows)}/{len(spec.seeds)} | "
                         + " | ".join(_mean_std([r[k] for r in crows]) for k in METRIC_KEYS)
                         + f" | {_seconds(statistics.fmean(r['train_seconds'] for r in crows))} |")
    return "\n".join(lines) + "\n"


def write_results(spec: BenchmarkSpec, cells: list[Cell],
                  overrides: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Rewrite OUT/results.csv and OUT/results.md from the finished cells, atomically: `cells` (planned with
    `overrides`) and, when flags narrowed the spec, every other cell of the spec file (`BenchmarkSpec.reported`)."""
    if spec.reported is not None:
        planned = {cell.folder: cell for cell in cells}
        spec = spec.reported
        cells = [planned.get(cell.folder, cell) for cell in plan_cells(spec, overrides)]
    rows = results_rows(spec, cells)
    csv_path, md_path = spec.out / "results.csv", spec.out / "results.md"
    atomic_write_text(csv_path, results_csv(rows))
    atomic_write_text(md_path, results_markdown(spec, cells, rows))
    return csv_path, md_path


def describe_plan(spec: BenchmarkSpec, cells: list[Cell]) -> str:
    """The --dry-run listing: what each variant trains and the state of every cell."""
    lines = [f"benchmark {spec.source}: {len(spec.variants)} variant(s) x {len(spec.categories)} categor"
             f"{'y' if len(spec.categories) == 1 else 'ies'} x {len(spec.seeds)} seed(s) = {len(cells)} cells "
             f"in {spec.out}"]
    for variant in spec.variants:
        config = next(c.config for c in cells if c.variant == variant)
        length = f"{config.epochs} epochs" if config.epochs is not None else f"~{config.steps} steps" + (
            f", >= {config.min_epochs} epochs" if config.min_epochs > 1 else "")
        lines.append(f"  variant {variant}: {config.method}, {config.backbone}, {config.image_size} px, {length}, "
                     f"batch {config.batch_size}, options {config.options or '{}'}")
    for category, path in spec.categories.items():
        lines.append(f"  category {category}: {path}" + ("" if path.is_dir() else "  (MISSING)"))
    counts: dict[str, int] = {}
    for cell in cells:
        status = cell_status(cell)
        counts[status] = counts.get(status, 0) + 1
        lines.append(f"  [{status:>7}] {cell.label}  {cell.folder}")
    lines.append("  " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) +
                 " (done: skipped; trained: run complete, will only be evaluated; changed: finished with "
                 "another config, needs --redo-changed; partial, pending: will be trained)")
    return "\n".join(lines)
