"""Deployment measurements of benchmarks/RESULTS.md section 6: contention, int8 speed, a bounded service load test.

    python benchmarks/deploy_bench.py contention RUN                  # batch-1 latency, then with a CPU hog beside it
    python benchmarks/deploy_bench.py int8-speed FP32.onnx INT8.onnx   # interleaved, medians
    python benchmarks/deploy_bench.py load --port 8799 --pid PID IMAGE  # against `python -m distillad.deploy.serve`

Each prints one JSON line. Run `contention` once with OMP_WAIT_POLICY unset and once with it PASSIVE: torch's
OpenMP threads busy-wait by default, which is what collapses its latency when another job shares the cores.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

THREADS = 2
HOG = "import time\nt = time.time()\nwhile time.time() - t < 300: pass"


def median_ms(call: Callable[[], object], repeats: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def contention(run: str) -> dict[str, object]:
    """torch (BN folded, as predict runs it) and onnxruntime (spinning off) batch-1 latency, then the same with one
    extra CPU-bound process started beside them."""
    import os

    import torch

    from distillad.deploy.runtime_switch import cached_onnx
    from distillad.deploy.runtimes import open_session
    from distillad.engine.checkpoint import load_run

    torch.set_num_threads(THREADS)
    loaded = load_run(run)
    session = open_session(cached_onnx(loaded), "onnxruntime", THREADS)
    images = np.random.default_rng(0).random((1, 3, loaded.config.image_size, loaded.config.image_size),
                                             dtype=np.float32)
    tensor = torch.from_numpy(images)

    def torch_call() -> None:
        with torch.inference_mode():
            loaded.scorer(tensor)

    result: dict[str, object] = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset"),
                                 "torch_ms": median_ms(torch_call),
                                 "onnxruntime_ms": median_ms(lambda: session.run(images))}
    hog = subprocess.Popen([sys.executable, "-c", HOG])
    try:
        time.sleep(1.0)
        result["torch_ms_plus_job"] = median_ms(torch_call)
        result["onnxruntime_ms_plus_job"] = median_ms(lambda: session.run(images))
    finally:
        hog.kill()
    return result


def int8_speed(fp32: str, int8: str, rounds: int = 5) -> dict[str, object]:
    """Both sessions in one process, interleaved rounds of 6 batch-1 calls and one batch of 16; medians."""
    from distillad.deploy.runtimes import open_session

    sessions = {"fp32": open_session(Path(fp32), "onnxruntime", THREADS),
                "int8": open_session(Path(int8), "onnxruntime", THREADS)}
    rng = np.random.default_rng(0)
    one, sixteen = rng.random((1, 3, 256, 256), dtype=np.float32), rng.random((16, 3, 256, 256), dtype=np.float32)
    latency: dict[str, list[float]] = {k: [] for k in sessions}
    throughput: dict[str, list[float]] = {k: [] for k in sessions}
    for session in sessions.values():
        session.run(one), session.run(sixteen)
    for _ in range(rounds):
        for name, session in sessions.items():
            latency[name].append(median_ms(lambda: session.run(one), repeats=6, warmup=0))
            start = time.perf_counter()
            session.run(sixteen)
            throughput[name].append(16 / (time.perf_counter() - start))
    return {name: {"latency_ms_bs1": round(statistics.median(latency[name]), 1),
                   "throughput_ips_bs16": round(statistics.median(throughput[name]), 1)} for name in sessions}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(image: str, port: int, pid: int, requests: int, concurrency: int) -> dict[str, object]:
    """`requests` POST /predict of one image, `concurrency` at a time on keep-alive connections; stops by itself."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{Path(image).name}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + Path(image).read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    local = threading.local()

    def one(_: int) -> tuple[float, bool]:
        if not hasattr(local, "connection"):
            local.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        start = time.perf_counter()
        try:
            local.connection.request("POST", "/predict", body=body, headers=headers)
            response = local.connection.getresponse()
            response.read()
            ok = response.status == 200
        except (OSError, http.client.HTTPException):
            local.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            ok = False
        return (time.perf_counter() - start) * 1000, ok

    rss_start, start = rss_mb(pid), time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)

    def quantile(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)

    return {"requests": requests, "concurrency": concurrency, "errors": sum(not r[1] for r in results),
            "p50_ms": quantile(0.5), "p90_ms": quantile(0.9), "p99_ms": quantile(0.99),
            "throughput_rps": round(requests / wall, 2), "rss_start_mb": round(rss_start, 1),
            "rss_end_mb": round(rss_mb(pid), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("contention").add_argument("run")
    int8 = commands.add_parser("int8-speed")
    int8.add_argument("fp32")
    int8.add_argument("int8")
    load_test = commands.add_parser("load")
    load_test.add_argument("image")
    load_test.add_argument("--port", type=int, required=True)
    load_test.add_argument("--pid", type=int, required=True, help="the server's process id (its memory is read)")
    load_test.add_argument("--requests", type=int, default=500)
    load_test.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    if args.command == "contention":
        result = contention(args.run)
    elif args.command == "int8-speed":
        result = int8_speed(args.fp32, args.int8)
    else:
        result = load(args.image, args.port, args.pid, args.requests, args.concurrency)
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
