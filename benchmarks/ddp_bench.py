"""Training throughput of 1 process against 2 data-parallel processes (`distillad train --nproc 2`, gloo on CPU).

    python benchmarks/ddp_bench.py --data ../shared/data/mvtec_ad/bottle              # the real measurement
    python benchmarks/ddp_bench.py --data ... --image-size 64 --epochs 2 --smoke      # seconds, to check it runs

Why: issue 11 asks whether data-parallel training pays off on the machine it runs on. The setups share the
cores differently: 1 process x 1 thread (the baseline per core), 1 process x 2 threads (the usual single-process
run), 2 processes x 1 thread (DDP, the same global batch). Each setup trains the default DSKD from a fresh run folder
via the command line, and its throughput is read from meta.json's history: training images per second over the
epochs after the first (the first also builds the teacher-feature cache), and over the whole training. Run it on an
otherwise idle machine: the setups are timed one after another, and any other load skews them. Prints a markdown
table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SETUPS = [("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2), ("2 processes x 1 thread (DDP)", 2, 1)]


def train_once(data: Path, out: Path, processes: int, threads: int, args: argparse.Namespace) -> dict:
    """Train one setup through the CLI; return meta.json's training section."""
    command = [sys.executable, "-m", "distillad", "train", "--data", str(data), "--out", str(out),
               "--image-size", str(args.image_size), "--epochs", str(args.epochs), "--batch-size",
               str(args.batch_size), "--seed", "0", "--threads", str(threads), "--no-progress"]
    if processes > 1:
        command += ["--nproc", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    return json.loads((out / "meta.json").read_text())


def throughput(meta: dict) -> tuple[float, float, float]:
    """(training seconds, images/s over all epochs, images/s over the epochs after the first)."""
    training, n_train = meta["training"], meta["data"]["n_train"]
    history = training["history"]
    total = history[-1]["seconds"]
    overall = n_train * len(history) / total
    steady = (n_train * (len(history) - 1) / (history[-1]["seconds"] - history[0]["seconds"])
              if len(history) > 1 else float("nan"))
    return total, overall, steady


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="an MVTec-layout category (default DSKD on it)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="say in the table that this was a smoke run")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="ddp_bench_") as folder:
        for name, processes, threads in SETUPS:
            meta = train_once(args.data, Path(folder) / f"p{processes}t{threads}", processes, threads, args)
            assert meta["training"]["world_size"] == processes
            rows.append((name, meta["training"]["final_train_loss"], *throughput(meta)))
    baseline = rows[1][4]
    print(f"DSKD on {args.data.name}, {args.image_size} px, {args.epochs} epochs, global batch {args.batch_size}, "
          f"{os.cpu_count()} CPU cores" + (" (SMOKE RUN: not a measurement)" if args.smoke else ""))
    print()
    print("| setup | final train loss | training s | img/s (all epochs) | img/s (epochs 2+) | vs 1 x 2 threads |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, loss, total, overall, steady in rows:
        print(f"| {name} | {loss:.4f} | {total:.1f} | {overall:.1f} | {steady:.1f} | {steady / baseline:.2f}x |")


if __name__ == "__main__":
    main()
