"""`benchmark`: variants (methods / ablations) x categories x seeds, trained, tested and tabulated; resumable.

A spec is a YAML file (or the equivalent flags)::

    out: benchmarks/runs/issue2            # cells, results.csv, results.md go here
    categories:                            # name -> MVTec-layout category folder (or a list of folders)
      bottle: ../shared/data/mvtec_ad/bottle
    seeds: [0, 1, 2]
    defaults: {image_size: 256}            # TrainConfig settings for every variant (optional)
    speed: true                            # or false, or {threads: 2, warmup: 5, repeats: 30}
    variants:                              # name -> TrainConfig settings, merged like a `train --config` file
      dskd: {method: dskd}
      dskd_se_only: {method: dskd, options: {students: encoder}}
      stfpm: {}                            # method defaults to the variant's name when that is a method
      dskd_max: {evaluate_run_of: dskd, options: {student_fusion: max}}   # no training: dskd's runs, another map

Relative paths (out, categories) are taken relative to the *current working directory*, like every other path
the CLI takes; the shipped specs in benchmarks/ are written to be run from the repository root.

Each cell (variant, category, seed) trains into OUT/cells/<variant>/<category>/seed<k>/run with `train_run`, is
evaluated with `evaluate_split` on the reloaded run (what `distillad test` does), and finishes by writing
cell.json atomically. A cell with a cell.json of the same configuration is never redone; a cell whose run folder
is complete (meta.json of the same configuration) but lacks cell.json is only evaluated; anything else is
retrained with overwrite. After every cell, results.csv and results.md are rewritten atomically.

A variant with `evaluate_run_of: OTHER` trains nothing: it evaluates OTHER's runs (an earlier variant of the
spec) with other map options (fusion rules, blur: MAP_OPTIONS), so map choices are compared on the same models.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from distillad.data import DataError, discover_mvtec
from distillad.engine.checkpoint import META_FILE, RunError, atomic_write_json, atomic_write_text, load_run, read_meta
from distillad.engine.config import TrainConfig, load_yaml, resolve_config
from distillad.engine.inference import evaluate_split
from distillad.engine.speed import DEFAULT_REPEATS, DEFAULT_THREADS, DEFAULT_WARMUP, SpeedError, speed_report
from distillad.engine.train import train_run
from distillad.methods import METHODS
from distillad.methods.base import MAP_OPTIONS

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "image_f1max", "pixel_f1max")
METRIC_TITLES = ("image AUROC", "pixel AUROC", "AUPRO@0.3", "image F1-max", "pixel F1-max")
SPEC_KEYS = ("out", "categories", "seeds", "defaults", "speed", "variants")
SPEED_SETTINGS = {"threads": DEFAULT_THREADS, "warmup": DEFAULT_WARMUP, "repeats": DEFAULT_REPEATS}
SPEED_COLUMNS = ("latency_ms_bs1", "throughput_ips_bs16", "params", "trainable_params", "gflops", "peak_rss_mb")
CSV_COLUMNS = ("variant", "method", "backbone", "category", "seed", "image_size", "epochs", *METRIC_KEYS,
               "train_seconds", "inference_seconds", "n_test_images", "n_defective", *SPEED_COLUMNS, "run_dir")
CELL_FILE = "cell.json"
TEST_FILE = "test.json"
CELLS_FOLDER = "cells"
SPEED_FOLDER = "speed"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# Settings that may differ between the run that made a cell and this one without changing its results.
_IGNORED_CONFIG_KEYS = ("device",)


# ------------------------------------------------------------------------------------------------ the spec


@dataclass
class BenchmarkSpec:
    """A validated spec: every variant resolves to a TrainConfig and every name is a safe folder name."""

    out: Path
    categories: dict[str, Path]
    seeds: list[int]
    variants: dict[str, dict[str, Any]]        # name -> TrainConfig settings (defaults already merged in)
    speed: dict[str, int] | None               # None: no speed measurement
    source: str = "command line"
    evaluated_runs_of: dict[str, str] = field(default_factory=dict)   # variant -> variant whose runs it evaluates


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _check_name(what: str, name: Any, source: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{source}: {what} name {name!r} must be a non-empty folder name of letters, digits, "
                         "'_', '.', '+' or '-'")
    return name


def _parse_categories(value: Any, source: str) -> dict[str, Path]:
    if isinstance(value, (str, Path)):
        value = [value]
    if isinstance(value, dict):
        pairs = [(_check_name("category", name, source), path) for name, path in value.items()]
    elif isinstance(value, list):
        pairs = [(Path(str(path)).name, path) for path in value]
        names = [name for name, _ in pairs]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"{source}: categories: two folders named {', '.join(duplicates)}; give them names "
                             "with the mapping form, e.g. {a_bottle: path/a/bottle, b_bottle: path/b/bottle}")
        for name, _ in pairs:
            _check_name("category", name, source)
    else:
        raise ValueError(f"{source}: categories must be a mapping name -> folder or a list of folders")
    categories: dict[str, Path] = {}
    for name, path in pairs:
        if not isinstance(path, (str, Path)) or not str(path):
            raise ValueError(f"{source}: categories: {name!r} needs a folder path, got {path!r}")
        categories[name] = Path(str(path)).expanduser()
    if not categories:
        raise ValueError(f"{source}: no categories given")
    return categories


def _parse_seeds(value: Any, source: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           and s >= 0 for s in value):
        raise ValueError(f"{source}: seeds must be a non-empty list of non-negative integers, e.g. [0, 1, 2]; "
                         f"got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{source}: seeds {value} repeat a seed")
    return list(value)


def _parse_speed(value: Any, source: str) -> dict[str, int] | None:
    if value is None or value is True:
        return dict(SPEED_SETTINGS)
    if value is False:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{source}: speed must be true, false or a mapping of {', '.join(SPEED_SETTINGS)}")
    unknown = sorted(set(value) - set(SPEED_SETTINGS))
    if unknown:
        raise ValueError(f"{source}: speed: unknown setting(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(SPEED_SETTINGS)}")
    settings = {**SPEED_SETTINGS, **value}
    for key, number in settings.items():
        if not isinstance(number, int) or isinstance(number, bool) or number < (0 if key == "warmup" else 1):
            raise ValueError(f"{source}: speed: {key} must be a positive integer, got {number!r}")
    return settings


def _evaluation_variant(name: str, settings: dict[str, Any], variants: dict[str, dict[str, Any]],
                        sources: dict[str, str], source: str) -> dict[str, Any]:
    """The settings of a variant that re-evaluates an earlier variant's runs with other map options."""
    other = settings["evaluate_run_of"]
    if other not in variants or other in sources:
        raise ValueError(f"{source}: variant {name!r}: evaluate_run_of must name an earlier variant that trains, "
                         f"got {other!r}")
    extra = sorted(set(settings) - {"evaluate_run_of", "options"})
    options = settings.get("options") or {}
    not_map = sorted(set(options) - set(MAP_OPTIONS)) if isinstance(options, dict) else ["options"]
    if extra or not_map or not options:
        raise ValueError(f"{source}: variant {name!r} evaluates {other!r}'s runs: it may only set map options "
                         f"({', '.join(MAP_OPTIONS)}) under options:, not {', '.join(extra + not_map) or 'nothing'}")
    return _deep_merge(variants[other], {"options": options})


def _parse_variants(value: Any, defaults: dict[str, Any], source: str
                    ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{source}: variants must be a non-empty mapping name -> settings")
    variants: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    for name, settings in value.items():
        _check_name("variant", name, source)
        settings = {} if settings is None else settings
        if not isinstance(settings, dict):
            raise ValueError(f"{source}: variant {name!r} must be a mapping of settings, got {type(settings).__name__}")
        if "evaluate_run_of" in settings:
            variants[name] = _evaluation_variant(name, settings, variants, sources, source)
            sources[name] = settings["evaluate_run_of"]
            continue
        merged = _deep_merge(defaults, settings)
        if "seed" in merged:
            raise ValueError(f"{source}: variant {name!r} sets 'seed'; seeds are set once, at the top level (seeds:)")
        if "method" not in merged:
            if name not in METHODS:
                raise ValueError(f"{source}: variant {name!r} needs a method (one of {', '.join(METHODS)})")
            merged["method"] = name
        try:
            resolve_config(merged["method"], file_values=merged)
        except ValueError as error:
            raise ValueError(f"{source}: variant {name!r}: {error}") from None
        variants[name] = merged
    return variants, sources


def build_spec(values: dict[str, Any] | None = None, *, source: str = "command line", out: str | Path | None = None,
               methods: list[str] | None = None, categories: list[str | Path] | None = None,
               seeds: list[int] | None = None, variants: list[str] | None = None,
               speed: bool | None = None) -> BenchmarkSpec:
    """Validate a spec mapping; the keyword arguments (the CLI flags) replace the mapping's entries.

    `methods` replaces the variants by one default variant per method; `variants` keeps a subset, in that order."""
    values = dict(values or {})
    unknown = sorted(set(values) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(SPEC_KEYS)}")
    if out is not None:
        values["out"] = str(out)
    if categories:
        values["categories"] = [str(c) for c in categories]
    if seeds:
        values["seeds"] = list(seeds)
    if methods:
        values["variants"] = {m: {"method": m} for m in methods}
    if speed is False:
        values["speed"] = False
    elif speed is True and values.get("speed") is False:
        values["speed"] = True
    if not values.get("out"):
        raise ValueError(f"{source}: no output folder: set out: in the spec or pass --out")
    if not isinstance(values["out"], (str, Path)):
        raise ValueError(f"{source}: out must be a folder path, got {values['out']!r}")
    if "categories" not in values:
        raise ValueError(f"{source}: no categories: set categories: in the spec or pass --categories")
    if "variants" not in values:
        raise ValueError(f"{source}: no variants: set variants: in the spec or pass --methods")
    defaults = values.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ValueError(f"{source}: defaults must be a mapping of TrainConfig settings")
    parsed_variants, sources = _parse_variants(values["variants"], defaults, source)
    if variants:
        missing = [v for v in variants if v not in parsed_variants]
        if missing:
            raise ValueError(f"{source}: unknown variant(s) {', '.join(missing)}; the spec has "
                             f"{', '.join(parsed_variants)}")
        parsed_variants = {v: parsed_variants[v] for v in variants}
    return BenchmarkSpec(out=Path(str(values["out"])).expanduser(),
                         categories=_parse_categories(values["categories"], source),
                         seeds=_parse_seeds(values.get("seeds", [0]), source),
                         variants=parsed_variants, speed=_parse_speed(values.get("speed", True), source),
                         source=source, evaluated_runs_of={v: o for v, o in sources.items() if v in parsed_variants})


def load_spec(path: str | Path, **flags: Any) -> BenchmarkSpec:
    """Read and validate a YAML spec; errors name the file and the key."""
    return build_spec(load_yaml(path), source=str(path), **flags)


# ------------------------------------------------------------------------------------------------ cells


@dataclass
class Cell:
    variant: str
    category: str
    seed: int
    data_dir: Path
    config: TrainConfig
    folder: Path
    runs_of: Path | None = None                 # an evaluation-only cell: the cell folder whose run it evaluates
    map_options: dict[str, Any] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return (self.runs_of or self.folder) / "run"

    @property
    def cell_file(self) -> Path:
        return self.folder / CELL_FILE

    @property
    def label(self) -> str:
        return f"{self.variant} / {self.category} / seed {self.seed}"


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _IGNORED_CONFIG_KEYS}


def _config_difference(saved: dict[str, Any], wanted: TrainConfig) -> list[str]:
    saved, current = _comparable(saved), _comparable(wanted.to_dict())
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


def plan_cells(spec: BenchmarkSpec, overrides: dict[str, Any] | None = None) -> list[Cell]:
    """Every (variant, category, seed) with its resolved config; `overrides` (flags) win over every variant."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    cells: list[Cell] = []
    for variant, settings in spec.variants.items():
        for category, data_dir in spec.categories.items():
            for seed in spec.seeds:
                try:
                    config = resolve_config(settings["method"], file_values=settings,
                                            overrides={**overrides, "seed": seed})
                except ValueError as error:
                    raise ValueError(f"{spec.source}: variant {variant!r}: {error}") from None
                folder = spec.out / CELLS_FOLDER / variant / category / f"seed{seed}"
                other = spec.evaluated_runs_of.get(variant)
                if other is None:
                    cells.append(Cell(variant, category, seed, data_dir, config, folder))
                    continue
                map_options = {k: v for k, v in config.options.items() if k in MAP_OPTIONS}
                cells.append(Cell(variant, category, seed, data_dir, config, folder,
                                  runs_of=spec.out / CELLS_FOLDER / other / category / f"seed{seed}",
                                  map_options=map_options))
    return cells


def read_cell(cell: Cell) -> dict[str, Any] | None:
    """The finished cell's record, or None when it has none (or an unreadable one, which is then redone)."""
    try:
        return json.loads(cell.cell_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def cell_status(cell: Cell) -> str:
    """done | changed (finished with another config) | trained (run complete, not evaluated) | partial | pending."""
    record = read_cell(cell)
    if record is not None:
        return "changed" if _config_difference(record.get("config", {}), cell.config) else "done"
    if _reusable_run(cell):
        return "trained"
    return "partial" if cell.folder.exists() else "pending"


def _trained_config(cell: Cell) -> TrainConfig:
    """The config the cell's run must have been trained with (an evaluation-only cell: without its map options)."""
    if cell.runs_of is None:
        return cell.config
    return dataclasses.replace(cell.config, options={k: v for k, v in cell.config.options.items()
                                                     if k not in cell.map_options})


def _run_differences(cell: Cell) -> list[str] | None:
    """None when the cell's run folder is not a finished run; else how its config differs from the wanted one."""
    if not (cell.run_dir / META_FILE).is_file():
        return None
    try:
        meta = read_meta(cell.run_dir)
    except RunError:
        return None
    saved = dict(meta.get("config", {}))
    if cell.runs_of is not None:     # map options may have been saved explicitly at their default values
        saved["options"] = {k: v for k, v in saved.get("options", {}).items() if k not in cell.map_options}
    return _config_difference(saved, _trained_config(cell))


def _reusable_run(cell: Cell) -> bool:
    return _run_differences(cell) == []


# ------------------------------------------------------------------------------------------------ results


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


def _speed_file(spec: BenchmarkSpec, variant: str) -> Path:
    return spec.out / SPEED_FOLDER / f"{variant}.json"


def _speed_identity(config: TrainConfig, settings: dict[str, int]) -> dict[str, Any]:
    """What a speed figure depends on: the architecture, input size, memory format and measurement settings."""
    return {"method": config.method, "backbone": config.backbone, "options": config.options,
            "image_size": config.image_size, "channels_last": config.channels_last, "device": config.device,
            **settings}


def read_speed(spec: BenchmarkSpec, variant: str, config: TrainConfig) -> dict[str, Any] | None:
    if spec.speed is None:
        return None
    try:
        saved = json.loads(_speed_file(spec, variant).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return saved["result"] if saved.get("identity") == _speed_identity(config, spec.speed) else None


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, spec)


def results_rows(spec: BenchmarkSpec, cells: list[Cell]) -> list[dict[str, Any]]:
    """One CSV row per finished cell of the plan (metrics as fractions, exactly as in cell.json)."""
    rows = []
    speeds = {c.variant: read_speed(spec, c.variant, c.config) for c in cells}
    for cell in cells:
        record = read_cell(cell)
        if record is None or _config_difference(record.get("config", {}), cell.config):
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
        categories = [c for c in spec.categories if any(r["category"] == c for r in vrows)]
        metric_texts = []
        for key in METRIC_KEYS:
            category_means = [statistics.fmean(_finite([r[key] for r in vrows if r["category"] == c]) or [math.nan])
                              for c in categories]
            complete_seeds = [s for s in spec.seeds
                              if all(any(r["seed"] == s and r["category"] == c for r in vrows) for c in spec.categories)]
            per_seed = [statistics.fmean([r[key] for r in vrows if r["seed"] == s]) for s in complete_seeds]
            finite = _finite(category_means)
            if not finite:
                metric_texts.append("n/a")
            elif len(_finite(per_seed)) >= 2:
                metric_texts.append(f"{statistics.fmean(finite) * 100:.1f} ± {statistics.stdev(_finite(per_seed)) * 100:.1f}")
            else:
                metric_texts.append(f"{statistics.fmean(finite) * 100:.1f}")
        speed = vrows[0] if vrows else {}
        seconds = [r["train_seconds"] for r in vrows]
        done = f"{len(vrows)}/{total[variant]}" + ("" if len(vrows) == total[variant] else " (partial)")
        lines.append(
            f"| {variant} | {config.method} | {config.backbone} | {config.image_size} | {done} | "
            + " | ".join(metric_texts)
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


def write_results(spec: BenchmarkSpec, cells: list[Cell]) -> tuple[Path, Path]:
    """Rewrite OUT/results.csv and OUT/results.md from the finished cells, atomically."""
    rows = results_rows(spec, cells)
    csv_path, md_path = spec.out / "results.csv", spec.out / "results.md"
    atomic_write_text(csv_path, results_csv(rows))
    atomic_write_text(md_path, results_markdown(spec, cells, rows))
    return csv_path, md_path


# ------------------------------------------------------------------------------------------------ running


def _seconds(value: float | None) -> str:
    """Training seconds: whole seconds from 100 s up, one decimal below (tiny test runs stay readable)."""
    if value is None or math.isnan(value):
        return ""
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def describe_plan(spec: BenchmarkSpec, cells: list[Cell]) -> str:
    """The --dry-run listing: what each variant trains and the state of every cell."""
    lines = [f"benchmark {spec.source}: {len(spec.variants)} variant(s) x {len(spec.categories)} categor"
             f"{'y' if len(spec.categories) == 1 else 'ies'} x {len(spec.seeds)} seed(s) = {len(cells)} cells "
             f"in {spec.out}"]
    for variant in spec.variants:
        config = next(c.config for c in cells if c.variant == variant)
        length = f"{config.epochs} epochs" if config.epochs is not None else f"~{config.steps} steps"
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


@dataclass
class BenchmarkResult:
    cells: list[Cell]
    ran: list[Cell] = field(default_factory=list)
    skipped: list[Cell] = field(default_factory=list)
    csv_path: Path | None = None
    md_path: Path | None = None


def _run_cell(cell: Cell, progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Train (or reuse a complete run of the same config), evaluate the reloaded run, write test.json and cell.json."""
    start = time.perf_counter()
    cell.cell_file.unlink(missing_ok=True)
    data = discover_mvtec(cell.data_dir, val_fraction=cell.config.val_fraction, seed=cell.config.seed)
    if not data.test:
        raise DataError(f"{cell.data_dir} has no test images; a benchmark category needs the MVTec layout with test/")
    if cell.runs_of is not None:
        differences = _run_differences(cell)
        if differences is None:
            raise RunError(f"{cell.label} evaluates the run in {cell.run_dir}, which is not finished: run its variant "
                           "first")
        if differences:
            raise RunError(f"{cell.label}: the run in {cell.run_dir} was trained with other settings "
                           f"({', '.join(differences)})")
        log(f"    evaluating the run in {cell.run_dir} with {cell.map_options}")
    elif _reusable_run(cell):
        log(f"    reusing the finished run in {cell.run_dir} (same config); evaluating only")
    else:
        train_run(cell.config, data, cell.run_dir, progress=progress, overwrite=True,
                  log=lambda text: log(f"    {text}"))
    run = load_run(cell.run_dir, cell.config.device, map_options=cell.map_options)
    training = run.meta.get("training", {})
    evaluation = evaluate_split(run.scorer, data, cell.config.image_size, batch_size=cell.config.batch_size,
                                device=cell.config.device, calibration=run.calibration, progress=False)
    evaluation.update({"method": cell.config.method, "backbone": cell.config.backbone, "run": str(cell.run_dir)})
    atomic_write_json(cell.folder / TEST_FILE, evaluation)
    record = {
        "variant": cell.variant, "category": cell.category, "seed": cell.seed, "data": str(cell.data_dir),
        "metrics": {k: evaluation[k] for k in METRIC_KEYS},
        "train_seconds": float(training.get("seconds", math.nan)),
        "epochs": training.get("epochs"),
        "inference_seconds": evaluation["inference_seconds"],
        "cell_seconds": time.perf_counter() - start,
        "n_images": evaluation["n_images"], "n_defective": evaluation["n_defective"],
        "threshold": evaluation["threshold"],
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(cell.run_dir),
        "config": cell.config.to_dict(),
    }
    atomic_write_json(cell.cell_file, record)      # last: its presence means the cell is finished
    return record


def _ensure_speed(spec: BenchmarkSpec, variant: str, cells: list[Cell], log: Callable[[str], None]) -> None:
    """Measure a variant's speed once, on its first finished cell's run; a failure is reported, not fatal."""
    if spec.speed is None or variant in spec.evaluated_runs_of:
        return
    finished = [c for c in cells if c.variant == variant and read_cell(c) is not None
                and not _config_difference(read_cell(c).get("config", {}), c.config)]
    if not finished or read_speed(spec, variant, finished[0].config) is not None:
        return
    cell = finished[0]
    log(f"  measuring the speed of {variant} on {cell.run_dir} ({spec.speed['threads']} thread(s))")
    try:
        result = speed_report(run=cell.run_dir, threads=spec.speed["threads"], warmup=spec.speed["warmup"],
                              repeats=spec.speed["repeats"], device=cell.config.device)
    except SpeedError as error:
        log(f"  warning: speed of {variant} not measured ({error}); it is retried on the next run")
        return
    atomic_write_json(_speed_file(spec, variant), {"identity": _speed_identity(cell.config, spec.speed),
                                                   "result": result})
    log(f"  {variant}: {result['latency_ms_bs1']:.1f} ms per image at batch 1, "
        f"{result['throughput_ips_bs16']:.1f} images/s at batch 16, {result['params'] / 1e6:.2f} M params, "
        f"{result['gflops']:.2f} GFLOPs")


def run_benchmark(spec: BenchmarkSpec, *, overrides: dict[str, Any] | None = None, progress: bool = True,
                  redo_changed: bool = False, log: Callable[[str], None] = print) -> BenchmarkResult:
    """Run every unfinished cell in order, rewriting the results after each; finished cells are skipped."""
    cells = plan_cells(spec, overrides)
    statuses = {id(c): cell_status(c) for c in cells}
    changed = [c for c in cells if statuses[id(c)] == "changed"]
    if changed and not redo_changed:
        first = changed[0]
        difference = _config_difference(read_cell(first).get("config", {}), first.config)
        raise RunError(f"{len(changed)} finished cell(s) were run with another configuration, e.g. {first.cell_file} "
                       f"(differs in: {', '.join(difference)}); use another --out, restore the settings, or pass "
                       "--redo-changed to retrain them")
    todo = [c for c in cells if statuses[id(c)] != "done"]
    will_train = {c.folder for c in todo if c.runs_of is None}
    orphans = [c for c in todo if c.runs_of is not None and statuses[id(c)] != "trained" and c.runs_of not in will_train]
    if orphans:
        raise RunError(f"{orphans[0].label} evaluates {orphans[0].run_dir}, which is neither finished nor planned: "
                       f"include variant {spec.evaluated_runs_of[orphans[0].variant]!r} (--variants) or run it first")
    missing = sorted({str(c.data_dir) for c in todo if not c.data_dir.is_dir()})
    if missing:
        raise DataError(f"{spec.source}: category folder(s) not found: {', '.join(missing)} (relative paths are taken "
                        f"from the current folder, {Path.cwd()})")
    result = BenchmarkResult(cells=cells, skipped=[c for c in cells if statuses[id(c)] == "done"])
    log(f"benchmark: {len(cells)} cells in {spec.out}: {len(result.skipped)} already finished, {len(todo)} to run")
    spec.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for variant in spec.variants:
        _ensure_speed(spec, variant, cells, log)
    result.csv_path, result.md_path = write_results(spec, cells)
    for number, cell in enumerate(todo, 1):
        done_before = len(result.skipped) + len(result.ran)
        log(f"[{done_before + 1}/{len(cells)}] {cell.label}: {'evaluating' if statuses[id(cell)] == 'trained' else 'training'}"
            f" (elapsed {_clock(time.perf_counter() - start)})")
        record = _run_cell(cell, progress, log)
        result.ran.append(cell)
        elapsed = time.perf_counter() - start
        left = elapsed / number * (len(todo) - number)
        metrics = ", ".join(f"{title} {record['metrics'][key] * 100:.1f}" for key, title in
                            zip(METRIC_KEYS, METRIC_TITLES))
        log(f"[{done_before + 1}/{len(cells)}] {cell.label} done: {metrics}; trained {record['train_seconds']:.0f} s; "
            f"elapsed {_clock(elapsed)}, ~{_clock(left)} left for {len(todo) - number} cell(s)")
        _ensure_speed(spec, cell.variant, cells, log)
        result.csv_path, result.md_path = write_results(spec, cells)
    log(f"benchmark finished: {len(result.ran)} cell(s) run, {len(result.skipped)} skipped, "
        f"{_clock(time.perf_counter() - start)}; wrote {result.csv_path} and {result.md_path}")
    return result
