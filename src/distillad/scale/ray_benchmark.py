"""`distillad benchmark --engine ray`: the benchmark's cells as Ray tasks, on a local Ray or a cluster.

Why a second engine and not a second runner: a study is many independent train+test cells, and one process on one
machine runs them one after another. Here every unfinished cell is one Ray task with its own torch thread count and
the same number of Ray CPUs, so Ray runs as many side by side as the cluster has room for. Everything else is the
local engine's, by the same functions: the plan and the cell states (`plan_cells`, `cell_status`, `check_plan`:
done cells skipped, trained runs only evaluated, changed cells refused without --redo-changed), the per-cell work
(`compute_cell`, run in the task) and the results files (`write_cell`, `write_results`, `write_speed`, called here in
the driver only). So a cell's numbers do not depend on the engine, given the same torch thread count.

- A task trains into the cell's run folder (train_run publishes it atomically, resume=True as in the local engine)
  and evaluates it; it returns the record and the evaluation. The driver, and nobody else, writes test.json and
  cell.json and rewrites results.csv/results.md as cells finish (`ray.wait`), so two workers never race on a file.
- An evaluation-only cell (a variant with `evaluate_run_of`) gets the training task of the cell whose run it
  evaluates as a dependency: Ray starts it only after that run is published.
- A failed cell is logged with its label and error; the others go on; the driver writes the results of the finished
  ones and ends with `CellsFailedError` listing the failed cells (exit 2). Rerunning retries exactly those.
- Speed figures need a machine to themselves: after the grid, each variant's measurement is one task that reserves
  every CPU of one node (the one with the most CPUs, the same node for every variant so the figures compare) and
  they run one at a time; nothing else of this benchmark runs beside them. Work of other Ray users on that node is
  outside our control, as it would be on a shared machine.

The output folder and the data must be on a filesystem that every Ray node sees under the same paths (the tasks
check both and say so when they are missing).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillad.benchmark.cells import Cell, cell_status, plan_cells
from distillad.benchmark.report import write_results
from distillad.benchmark.runner import (BenchmarkResult, check_plan, clock, compute_cell, format_metrics,
                                        measure_cell_speed, speed_due, write_cell, write_speed)
from distillad.benchmark.spec import BenchmarkSpec
from distillad.benchmark.speed import SpeedError
from distillad.errors import ConfigError, DataError, DistilladError, RunError
from distillad.scale.ray_session import import_ray, ray_session

DEFAULT_CELL_THREADS = 1
SHARED_FILESYSTEM_HINT = "the data and the output folder must be on a filesystem every Ray node sees"


class CellsFailedError(RunError):
    """Some cells of a Ray benchmark failed; the others finished and are in the results. `failed`: (label, reason)."""

    def __init__(self, message: str, failed: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.failed = failed


@dataclass(frozen=True)
class _Node:
    node_id: str
    address: str
    cpus: float
    gpus: float


# ------------------------------------------------------------------------------------------------ in the workers


def _cell_task(cell: Cell, out: Path, threads: int, *after: Any) -> dict[str, Any]:
    """One cell in a Ray worker: `threads` torch threads, then `compute_cell`; returns record, evaluation, log lines.

    `after`: the result of the task that trains the run this cell evaluates (only there to make Ray wait for it)."""
    import torch

    for folder, what in ((out, "output folder"), (cell.data_dir, "category folder")):
        if not folder.is_dir():
            raise DataError(f"{what} {folder} does not exist on Ray node {socket.gethostname()}: "
                            f"{SHARED_FILESYSTEM_HINT}")
    torch.set_num_threads(threads)
    lines: list[str] = []
    record, evaluation = compute_cell(cell, progress=False, log=lines.append)
    return {"record": record, "evaluation": evaluation, "log": lines}


def _speed_task(settings: dict[str, int], cell: Cell) -> dict[str, Any]:
    """A variant's speed measurement in a Ray worker that holds every CPU of its node."""
    return measure_cell_speed(settings, cell)


# ------------------------------------------------------------------------------------------------ in the driver


def _one_line(text: str, limit: int = 400) -> str:
    line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _task_error(error: BaseException) -> tuple[str, bool]:
    """A failed task's error as one line, and whether it is a user error (DistilladError) rather than a bug or a
    crash (whose full text is worth logging)."""
    cause = getattr(error, "cause", None) or error
    if isinstance(cause, DistilladError):
        return _one_line(str(cause)), True
    return _one_line(f"{type(cause).__name__}: {cause}"), False


def _task_failed(ray: Any, ref: Any) -> bool:
    """Whether a task has finished with an error (a dependent task then fails with that same error)."""
    ready, _ = ray.wait([ref], timeout=0)
    if not ready:
        return False
    try:
        ray.get(ref)
    except Exception:
        return True
    return False


def _largest_node(ray: Any) -> _Node:
    """The alive node with the most CPUs (ties: the first listed): where speed is measured, and the upper bound of
    a cell's CPUs."""
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    if not nodes:
        raise ConfigError("the Ray cluster has no node with CPUs")
    best = max(nodes, key=lambda n: n["Resources"]["CPU"])
    return _Node(best["NodeID"], best.get("NodeManagerAddress", "?"), best["Resources"]["CPU"],
                 best["Resources"].get("GPU", 0))


def _run_grid(ray: Any, spec: BenchmarkSpec, cells: list[Cell], todo: list[Cell], statuses: dict[int, str],
              cell_threads: int, result: BenchmarkResult, log: Callable[[str], None],
              overrides: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Submit every unfinished cell, then write each one's results as it finishes; return the failed cells."""
    remote_cell = ray.remote(_cell_task)
    task_of: dict[Any, Cell] = {}
    training_task: dict[Path, Any] = {}        # cell folder -> the task that (re)trains or reuses its run
    for cell in todo:
        cell.cell_file.unlink(missing_ok=True)    # as the local engine does when it starts a cell
        upstream = training_task.get(cell.runs_of) if cell.runs_of is not None else None
        options: dict[str, Any] = {"num_cpus": cell_threads, "name": f"distillad {cell.label}"}
        if cell.config.device.startswith("cuda"):
            options["num_gpus"] = 1
        ref = remote_cell.options(**options).remote(cell, spec.out, cell_threads,
                                                   *([upstream] if upstream is not None else []))
        task_of[ref] = cell
        if cell.runs_of is None:
            training_task[cell.folder] = ref
    trained = sum(statuses[id(c)] != "trained" and c.runs_of is None for c in todo)
    log(f"  submitted {len(todo)} cell task(s) ({trained} to train, {len(todo) - trained} to evaluate only), "
        f"{cell_threads} thread(s) and CPU(s) each")
    failed: list[tuple[str, str]] = []
    pending = list(task_of)
    start = time.perf_counter()
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            cell = task_of[ready[0]]
            finished = len(result.skipped) + len(result.ran) + len(failed) + 1
            try:
                output = ray.get(ready[0])
            except Exception as error:   # a task's error, a crashed worker, a cancelled task: report, go on
                upstream = training_task.get(cell.runs_of) if cell.runs_of is not None else None
                if upstream is not None and _task_failed(ray, upstream):
                    reason, user_error = f"not evaluated: {task_of[upstream].label} failed", True
                else:
                    reason, user_error = _task_error(error)
                failed.append((cell.label, reason))
                log(f"[{finished}/{len(cells)}] {cell.label} FAILED: {reason}")
                if not user_error:
                    log(str(error))
                continue
            for line in output["log"]:
                log(f"    [{cell.label}] {line.strip()}")
            write_cell(cell, output["record"], output["evaluation"])
            result.ran.append(cell)
            elapsed = time.perf_counter() - start
            done_here = len(result.ran) + len(failed)
            left = elapsed / done_here * len(pending)
            log(f"[{finished}/{len(cells)}] {cell.label} done: {format_metrics(output['record'])}; trained "
                f"{output['record']['train_seconds']:.0f} s; elapsed {clock(elapsed)}, ~{clock(left)} left for "
                f"{len(pending)} cell(s)")
            result.csv_path, result.md_path = write_results(spec, cells, overrides)
    except BaseException:                  # interrupted (Ctrl-C) or a bug here: stop what still runs on the cluster
        for ref in pending:
            try:
                ray.cancel(ref, force=True)
            except Exception:
                pass
        raise
    return failed


def _run_speed(ray: Any, spec: BenchmarkSpec, cells: list[Cell], node: _Node,
               log: Callable[[str], None]) -> list[tuple[str, str]]:
    """Measure each variant's speed that is due, one task at a time, each holding every CPU of `node`."""
    if spec.speed is None:
        return []
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    failed: list[tuple[str, str]] = []
    for variant in spec.variants:
        cell = speed_due(spec, variant, cells)
        if cell is None:
            continue
        options: dict[str, Any] = {"num_cpus": node.cpus, "name": f"distillad speed {variant}",
                                   "scheduling_strategy": NodeAffinitySchedulingStrategy(node.node_id, soft=False)}
        if cell.config.device.startswith("cuda"):
            options["num_gpus"] = node.gpus
        log(f"  measuring the speed of {variant} on {cell.run_dir} ({spec.speed['threads']} thread(s)) on node "
            f"{node.address}, holding all its {node.cpus:g} CPUs")
        try:
            figures = ray.get(ray.remote(_speed_task).options(**options).remote(spec.speed, cell))
        except Exception as error:
            cause = getattr(error, "cause", None) or error
            if isinstance(cause, SpeedError):
                log(f"  warning: speed of {variant} not measured ({_one_line(str(cause))}); it is retried on the "
                    "next run")
                continue
            reason, _ = _task_error(error)
            failed.append((f"speed of {variant}", reason))
            log(f"  speed of {variant} FAILED: {reason}")
            continue
        write_speed(spec, variant, cell, figures, log)
    return failed


def run_benchmark_on_ray(spec: BenchmarkSpec, *, overrides: dict[str, Any] | None = None, redo_changed: bool = False,
                         address: str | None = None, num_cpus: int | None = None,
                         cell_threads: int = DEFAULT_CELL_THREADS,
                         log: Callable[[str], None] = print) -> BenchmarkResult:
    """Run every unfinished cell as a Ray task (a local Ray of `num_cpus` CPUs, or the cluster at `address`), then
    the due speed measurements; the driver writes every result. Raises CellsFailedError after writing the finished
    cells' results when some failed."""
    if cell_threads < 1:
        raise ConfigError(f"--cell-threads must be >= 1, got {cell_threads}")
    import_ray()                                   # no Ray: say how to install it before anything else
    cells = plan_cells(spec, overrides)
    statuses = {id(c): cell_status(c) for c in cells}
    check_plan(spec, cells, statuses, redo_changed)   # changed cells, orphan evaluations, missing data: before Ray
    todo = [c for c in cells if statuses[id(c)] != "done"]
    result = BenchmarkResult(cells=cells, skipped=[c for c in cells if statuses[id(c)] == "done"])
    start = time.perf_counter()
    with ray_session(address, num_cpus) as ray:
        spec.out.mkdir(parents=True, exist_ok=True)
        node = _largest_node(ray)
        if cell_threads > node.cpus:
            raise ConfigError(f"--cell-threads {cell_threads}: no Ray node has that many CPUs (the largest has "
                              f"{node.cpus:g})")
        total_cpus = ray.cluster_resources().get("CPU", 0)
        log(f"benchmark on Ray ({'cluster ' + address if address else 'local'}, {total_cpus:g} CPUs): {len(cells)} "
            f"cells in {spec.out}: {len(result.skipped)} already finished, {len(todo)} to run")
        result.csv_path, result.md_path = write_results(spec, cells, overrides)
        failed = _run_grid(ray, spec, cells, todo, statuses, cell_threads, result, log, overrides) if todo else []
        failed += _run_speed(ray, spec, cells, node, log)
    result.csv_path, result.md_path = write_results(spec, cells, overrides)
    log(f"benchmark finished: {len(result.ran)} cell(s) run, {len(result.skipped)} skipped, {len(failed)} failed, "
        f"{clock(time.perf_counter() - start)}; wrote {result.csv_path} and {result.md_path}")
    if failed:
        listing = "; ".join(f"{label} ({reason})" for label, reason in failed)
        raise CellsFailedError(f"{len(failed)} task(s) failed: {listing}; the finished cells are in "
                               f"{result.csv_path}; fix the cause and rerun to retry only these", failed)
    return result


__all__ = ["DEFAULT_CELL_THREADS", "CellsFailedError", "run_benchmark_on_ray"]
