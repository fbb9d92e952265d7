"""Running a benchmark: every unfinished cell trained (or reused), evaluated, recorded; speed once per variant.

Its own module because it is the only part that trains, evaluates and measures; the spec, the cell states and the
results files it relies on are plain functions of files elsewhere in the package.

Each cell trains into OUT/cells/<variant>/<category>/seed<k>/run with `train_run`, is evaluated with
`evaluate_split` on the reloaded run (what `distillad test` does), and finishes by writing cell.json atomically.
That work is split in two so that another engine can run the first part elsewhere: `compute_cell` (train or reuse,
evaluate; writes the run folder only) and `write_cell` (test.json, then cell.json), which only the process that
owns the results calls (`distillad.scale.ray_benchmark` runs `compute_cell` in Ray tasks, `write_cell` in the
driver). `check_plan`, `speed_due` and `write_speed` are shared the same way.
A cell with a cell.json of the same configuration is never redone; a cell whose run folder is complete (meta.json
of the same configuration) but lacks cell.json is only evaluated; anything else is retrained with overwrite.
After every cell, results.csv and results.md are rewritten atomically.
Two benchmark processes may share a spec: a cell whose run another process is training (its training lock,
`distillad.engine.resume.training_lock`) is left to that process, and this one goes on with the next cell.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from distillad.benchmark.cells import (TEST_FILE, Cell, cell_status, config_difference, finished_record, plan_cells,
                                       read_cell, reusable_run, run_differences)
from distillad.benchmark.report import (METRIC_KEYS, METRIC_TITLES, read_speed, speed_file, speed_identity,
                                        write_results)
from distillad.benchmark.spec import BenchmarkSpec
from distillad.benchmark.speed import SpeedError, speed_report
from distillad.data import discover_mvtec
from distillad.engine.checkpoint import load_run
from distillad.engine.inference import evaluate_split
from distillad.engine.train import train_run
from distillad.errors import DataError, RunBusyError, RunError
from distillad.io import atomic_write_json


@dataclass
class BenchmarkResult:
    cells: list[Cell]
    ran: list[Cell] = field(default_factory=list)
    skipped: list[Cell] = field(default_factory=list)
    busy: list[Cell] = field(default_factory=list)     # being trained by another process: left to it
    csv_path: Path | None = None
    md_path: Path | None = None


def clock(seconds: float) -> str:
    """H:MM:SS."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_metrics(record: dict[str, Any]) -> str:
    """A finished cell's five metrics as percentages, for the progress log."""
    return ", ".join(f"{title} {record['metrics'][key] * 100:.1f}" for key, title in zip(METRIC_KEYS, METRIC_TITLES))


def compute_cell(cell: Cell, *, progress: bool, log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train (or reuse a complete run of the same config) and evaluate the reloaded run: (record, evaluation).

    The per-cell work of both engines: it writes the run folder only (train_run publishes it atomically); the
    cell's results files are written by `write_cell`, in the local engine right after, on Ray by the driver."""
    start = time.perf_counter()
    data = discover_mvtec(cell.data_dir, val_fraction=cell.config.val_fraction, seed=cell.config.seed)
    if not data.test:
        raise DataError(f"{cell.data_dir} has no test images; a benchmark category needs the MVTec layout with test/")
    if cell.runs_of is not None:
        differences = run_differences(cell)
        if differences is None:
            raise RunError(f"{cell.label} evaluates the run in {cell.run_dir}, which is not finished: run its variant "
                           "first")
        if differences:
            raise RunError(f"{cell.label}: the run in {cell.run_dir} was trained with other settings "
                           f"({', '.join(differences)})")
        log(f"    evaluating the run in {cell.run_dir} with {cell.map_options}")
    elif reusable_run(cell):
        log(f"    reusing the finished run in {cell.run_dir} (same config); evaluating only")
    else:
        train_run(cell.config, data, cell.run_dir, progress=progress, overwrite=True, resume=True,
                  log=lambda text: log(f"    {text}"))
    run = load_run(cell.run_dir, cell.config.device, map_options=cell.map_options)
    training = run.meta.get("training", {})
    evaluation = evaluate_split(run.scorer, data, cell.config.image_size, batch_size=cell.config.batch_size,
                                device=cell.config.device, calibration=run.calibration, progress=False,
                                resize=cell.config.resize)
    evaluation.update({"method": cell.config.method, "backbone": cell.config.backbone, "run": str(cell.run_dir)})
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
    return record, evaluation


def write_cell(cell: Cell, record: dict[str, Any], evaluation: dict[str, Any]) -> None:
    """Write the cell's test.json, then its cell.json (last: its presence means the cell is finished), atomically."""
    atomic_write_json(cell.folder / TEST_FILE, evaluation)
    atomic_write_json(cell.cell_file, record)


def _run_cell(cell: Cell, progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Train (or reuse a complete run of the same config), evaluate the reloaded run, write test.json and cell.json."""
    cell.cell_file.unlink(missing_ok=True)
    record, evaluation = compute_cell(cell, progress=progress, log=log)
    write_cell(cell, record, evaluation)
    return record


def speed_due(spec: BenchmarkSpec, variant: str, cells: list[Cell]) -> Cell | None:
    """The cell whose run a variant's speed is to be measured on (its first finished one), or None: no speed in the
    spec, an evaluation-only variant (same network as the one it evaluates), nothing finished, or already measured."""
    if spec.speed is None or variant in spec.evaluated_runs_of:
        return None
    finished = [c for c in cells if c.variant == variant and finished_record(c) is not None]
    if not finished or read_speed(spec, variant, finished[0].config) is not None:
        return None
    return finished[0]


def measure_cell_speed(settings: dict[str, int], cell: Cell) -> dict[str, Any]:
    """The speed figures of the cell's run (`speed_report` in a fresh process); SpeedError when it cannot run."""
    return speed_report(run=cell.run_dir, threads=settings["threads"], warmup=settings["warmup"],
                        repeats=settings["repeats"], device=cell.config.device)


def write_speed(spec: BenchmarkSpec, variant: str, cell: Cell, result: dict[str, Any],
                log: Callable[[str], None]) -> None:
    """Save a variant's speed figures (with what they depend on) to OUT/speed/<variant>.json and log them."""
    atomic_write_json(speed_file(spec, variant), {"identity": speed_identity(cell.config, spec.speed),
                                                  "result": result})
    log(f"  {variant}: {result['latency_ms_bs1']:.1f} ms per image at batch 1, "
        f"{result['throughput_ips_bs16']:.1f} images/s at batch 16, {result['params'] / 1e6:.2f} M params, "
        f"{result['gflops']:.2f} GFLOPs")


def _ensure_speed(spec: BenchmarkSpec, variant: str, cells: list[Cell], log: Callable[[str], None]) -> None:
    """Measure a variant's speed once, on its first finished cell's run; a failure is reported, not fatal."""
    cell = speed_due(spec, variant, cells)
    if cell is None:
        return
    log(f"  measuring the speed of {variant} on {cell.run_dir} ({spec.speed['threads']} thread(s))")
    try:
        result = measure_cell_speed(spec.speed, cell)
    except SpeedError as error:
        log(f"  warning: speed of {variant} not measured ({error}); it is retried on the next run")
        return
    write_speed(spec, variant, cell, result, log)


def check_plan(spec: BenchmarkSpec, cells: list[Cell], statuses: dict[int, str], redo_changed: bool) -> None:
    """Fail before any training: changed cells without --redo-changed, evaluations of runs that will not exist,
    category folders that are missing."""
    changed = [c for c in cells if statuses[id(c)] == "changed"]
    if changed and not redo_changed:
        first = changed[0]
        difference = config_difference(read_cell(first).get("config", {}), first.config)
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


def run_benchmark(spec: BenchmarkSpec, *, overrides: dict[str, Any] | None = None, progress: bool = True,
                  redo_changed: bool = False, log: Callable[[str], None] = print) -> BenchmarkResult:
    """Run every unfinished cell in order, rewriting the results after each; finished cells are skipped."""
    cells = plan_cells(spec, overrides)
    statuses = {id(c): cell_status(c) for c in cells}
    check_plan(spec, cells, statuses, redo_changed)
    todo = [c for c in cells if statuses[id(c)] != "done"]
    result = BenchmarkResult(cells=cells, skipped=[c for c in cells if statuses[id(c)] == "done"])
    log(f"benchmark: {len(cells)} cells in {spec.out}: {len(result.skipped)} already finished, {len(todo)} to run")
    spec.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for variant in spec.variants:
        _ensure_speed(spec, variant, cells, log)
    result.csv_path, result.md_path = write_results(spec, cells, overrides)
    for number, cell in enumerate(todo, 1):
        done_before = len(result.skipped) + len(result.ran)
        log(f"[{done_before + 1}/{len(cells)}] {cell.label}: {'evaluating' if statuses[id(cell)] == 'trained' else 'training'}"
            f" (elapsed {clock(time.perf_counter() - start)})")
        try:
            record = _run_cell(cell, progress, log)
        except RunBusyError as busy:   # a second benchmark process on the same spec: each cell is trained once
            result.busy.append(cell)
            log(f"[{done_before + 1}/{len(cells)}] {cell.label}: left to the other process ({busy})")
            continue
        result.ran.append(cell)
        elapsed = time.perf_counter() - start
        left = elapsed / number * (len(todo) - number)
        log(f"[{done_before + 1}/{len(cells)}] {cell.label} done: {format_metrics(record)}; trained "
            f"{record['train_seconds']:.0f} s; elapsed {clock(elapsed)}, ~{clock(left)} left for "
            f"{len(todo) - number} cell(s)")
        _ensure_speed(spec, cell.variant, cells, log)
        result.csv_path, result.md_path = write_results(spec, cells, overrides)
    log(f"benchmark finished: {len(result.ran)} cell(s) run, {len(result.skipped)} skipped, "
        + (f"{len(result.busy)} left to another process that is training them, " if result.busy else "")
        + f"{clock(time.perf_counter() - start)}; wrote {result.csv_path} and {result.md_path}")
    return result
