"""Speedup of a study grid on a local Ray (`benchmark --engine ray`) against the local engine, on this machine.

Why three runs and not two: the Ray engine gives every cell 1 torch thread (--cell-threads 1) and runs as many cells
side by side as there are cores. Its metrics equal the local engine's only at the same thread count, so the local
engine runs once with --threads 1 (the same computation: metrics asserted equal to 1e-6) and once at torch's default
(every core for one cell at a time: the baseline a user gets without Ray, whose metrics may differ in the last
digits, reported as the largest difference). Each run is a fresh `python -m distillad.cli benchmark` process into a
fresh output folder, so wall times include starting Python, torch and (for Ray) the local Ray and its workers.

    python benchmarks/scale_bench.py                                   # 2 methods x bottle x 2 seeds at 128 px
    python benchmarks/scale_bench.py --seeds 0 1 2 --categories ../shared/data/mvtec_ad/bottle \\
        ../shared/data/mt/magnetic_tile                                 # a bigger grid
    python benchmarks/scale_bench.py --image-size 64 --steps 4 --seeds 0             # smoke run

Run it on an otherwise idle machine, from the repository root; it prints a markdown table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1max", "pixel_f1max")
DEFAULT_CATEGORIES = ["../shared/data/mvtec_ad/bottle"]


def write_spec(folder: Path, args: argparse.Namespace) -> Path:
    """The grid as a spec: each method at its defaults but `--steps` optimizer steps, at `--image-size` px."""
    categories = {Path(c).name: str(Path(c).resolve()) for c in args.categories}
    values = {"out": str(folder / "out"), "categories": categories, "seeds": list(args.seeds),
              "defaults": {"image_size": args.image_size}, "speed": False,
              "variants": {method: {"method": method, "steps": args.steps} for method in args.methods}}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def run_engine(name: str, spec: Path, extra: list[str]) -> float:
    """Run the benchmark command in a fresh process; its wall time in seconds (its output goes to a log file)."""
    log = spec.parent / "benchmark.log"
    command = [sys.executable, "-m", "distillad.cli", "benchmark", str(spec), "--no-progress", *extra]
    print(f"{name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        completed = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        sys.exit(f"{name} failed (exit {completed.returncode}); the end of its output:\n{tail}")
    print(f"{name}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return seconds


def read_metrics(out: Path) -> dict[tuple[str, str, str], list[float]]:
    with open(out / "results.csv", newline="") as handle:
        return {(r["variant"], r["category"], r["seed"]): [float(r[k]) for k in METRICS]
                for r in csv.DictReader(handle)}


def largest_difference(a: dict, b: dict) -> float:
    if sorted(a) != sorted(b):
        sys.exit(f"the runs finished different cells: {sorted(a)} vs {sorted(b)}")
    return max(abs(x - y) for key in a for x, y in zip(a[key], b[key]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["dskd", "stfpm"])
    parser.add_argument("--categories", nargs="+", default=DEFAULT_CATEGORIES, metavar="DIR")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="grid size: methods x categories x seeds")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per cell (methods' default: 360)")
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray")
    parser.add_argument("--work", type=Path, default=None, help="folder for the three output folders (default: a "
                        "temporary one, removed afterwards)")
    parser.add_argument("--skip-default-threads", action="store_true",
                        help="leave out the local run at torch's default thread count")
    args = parser.parse_args()
    missing = [c for c in args.categories if not Path(c).is_dir()]
    if missing:
        sys.exit(f"category folder(s) not found: {', '.join(missing)} (run from the repository root)")
    load_before = os.getloadavg()[0]
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="scale_bench_", dir=args.work) as tmp:
        root = Path(tmp)
        runs = {"local, 1 thread": ["--threads", "1"],
                f"ray, {args.ray_cpus} CPUs x 1 thread": ["--engine", "ray", "--ray-cpus", str(args.ray_cpus),
                                                          "--cell-threads", "1"]}
        if not args.skip_default_threads:
            runs["local, torch default threads"] = []
        seconds, metrics = {}, {}
        for number, (name, extra) in enumerate(runs.items()):
            folder = root / f"run{number}"
            folder.mkdir()
            spec = write_spec(folder, args)
            seconds[name] = run_engine(name, spec, extra)
            metrics[name] = read_metrics(folder / "out")
        local, ray = list(runs)[:2]
        difference = largest_difference(metrics[local], metrics[ray])
        if difference > 1e-6:
            sys.exit(f"the Ray engine's metrics differ from the local engine's at 1 thread by {difference:.2e}")
        cells = len(metrics[local])
        print(f"\n{cells} cells ({', '.join(args.methods)} x {', '.join(Path(c).name for c in args.categories)} x "
              f"seeds {' '.join(map(str, args.seeds))}), {args.image_size} px, {args.steps} steps; "
              f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}; load before: "
              f"{load_before:.2f}\n")
        baseline = "local, torch default threads" if "local, torch default threads" in runs else local
        print(f"| engine | wall s | s per cell | speedup vs {local} | speedup vs {baseline} | largest metric "
              f"difference vs {local} |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name in runs:
            print(f"| {name} | {seconds[name]:.1f} | {seconds[name] / cells:.1f} | "
                  f"{seconds[local] / seconds[name]:.2f}x | {seconds[baseline] / seconds[name]:.2f}x | "
                  f"{largest_difference(metrics[local], metrics[name]):.1e} |")


if __name__ == "__main__":
    main()
