"""Batch prediction on a local Ray (`predict --engine ray`) against the local engine, on this machine.

Each setting is a fresh `python -m distillad predict` process into a fresh output folder, so wall times include
starting Python and torch and, for Ray, the local Ray, its actors and shipping the model; the predictions.csv of
every Ray run is checked byte for byte against the local run with the same threads per scorer (the thread count
changes how torch splits its sums, see distillad/scale/ray_predict.py).

    python benchmarks/predict_bench.py --run RUN_DIR ../shared/data/mvtec_ad/bottle   # every image under it

Run it on an otherwise idle machine from the repository root; it prints a markdown table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(command: list[str], log: Path) -> float:
    """Wall time of a fresh `distillad predict` process; exits with its output's end when it fails."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        completed = subprocess.run([sys.executable, "-m", "distillad", *command], stdout=handle,
                                   stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if completed.returncode not in (0, 1):       # 1: some inputs unreadable, the others scored
        sys.exit(f"{' '.join(command)} failed (exit {completed.returncode}):\n" + log.read_text()[-2000:])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="a trained run folder")
    parser.add_argument("inputs", nargs="+", help="image files, folders, @list files or globs")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Ray actors (1 thread each)")
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnxruntime"])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="predict_bench_") as tmp:
        root = Path(tmp)
        env_cache = root / "cache"
        os.environ["DISTILLAD_CACHE_DIR"] = str(env_cache)    # exports made once, outside the user's cache
        if set(args.runtimes) - {"torch"}:                      # export before timing: no run pays for it
            from distillad.deploy.runtime_switch import cached_onnx
            from distillad.engine.checkpoint import load_run

            cached_onnx(load_run(args.run))
        for runtime in args.runtimes:
            for images in (True, False):
                base = ["predict", "--run", str(args.run), *args.inputs, "--runtime", runtime, "--no-progress"]
                base += [] if images else ["--no-images"]
                settings = {f"local, {cores} thread(s)": ["--threads", str(cores)]
                            for cores in sorted({1, os.cpu_count() or 1})}
                settings[f"ray, {args.workers} actors x 1 thread"] = ["--engine", "ray", "--workers",
                                                                      str(args.workers), "--worker-threads", "1"]
                seconds = {}
                for number, (name, extra) in enumerate(settings.items()):
                    out = root / f"{runtime}-{images}-{number}"
                    seconds[name] = timed([*base, "--out", str(out), *extra], root / "log.txt")
                    seconds[name, "csv"] = (out / "predictions.csv").read_bytes()
                one_thread = seconds["local, 1 thread(s)", "csv"]
                ray_csv = seconds[f"ray, {args.workers} actors x 1 thread", "csv"]
                if runtime == "torch" and ray_csv != one_thread:
                    sys.exit("the Ray engine's predictions.csv differs from the local engine's at 1 thread")
                n_images = one_thread.count(b"\n") - 1
                fastest_local = min(v for k, v in seconds.items() if isinstance(k, str) and k.startswith("local"))
                for name in settings:
                    rows.append(f"| {runtime} | {'yes' if images else 'no'} | {name} | {seconds[name]:.1f} | "
                                f"{n_images / seconds[name]:.1f} | {fastest_local / seconds[name]:.2f}x |")
    print(f"\n{n_images} images, {os.cpu_count()} cores; wall time of the whole command\n")
    print("| runtime | heatmaps and masks | engine | wall s | images/s | speedup vs fastest local |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
