"""Benchmarks and speed: variants x categories x seeds trained, tested and tabulated (resumable), and the profiler
that measures a model's latency, throughput, size and memory through the scorer `test` and `predict` run.

Its own package, apart from the engine, because it is built on top of it (train_run, load_run, evaluate_split) and
nothing in the engine needs it. Modules: spec (the YAML spec), cells (the plan and what is finished), report
(results.csv, results.md), runner (run_benchmark), measure (timing a scorer in this process), speed (what to measure,
in a fresh process), speed_child (that process's entry point).
"""

from distillad.benchmark.cells import Cell, cell_status, plan_cells, read_cell
from distillad.benchmark.measure import SPEED_KEYS, count_gflops, count_parameters, measure_speed, peak_rss_mb
from distillad.benchmark.report import METRIC_KEYS, describe_plan, results_rows, write_results
from distillad.benchmark.runner import BenchmarkResult, run_benchmark
from distillad.benchmark.spec import BenchmarkSpec, build_spec, load_spec
from distillad.benchmark.speed import SpeedError, build_scorer, format_report, speed_report

__all__ = ["METRIC_KEYS", "SPEED_KEYS", "BenchmarkResult", "BenchmarkSpec", "Cell", "SpeedError", "build_scorer",
           "build_spec", "cell_status", "count_gflops", "count_parameters", "describe_plan", "format_report",
           "load_spec", "measure_speed", "peak_rss_mb", "plan_cells", "read_cell", "results_rows", "run_benchmark",
           "speed_report", "write_results"]
