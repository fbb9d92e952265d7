"""Measuring a scorer in this process: latency, throughput, parameters, GFLOPs, peak memory, machine facts.

Its own module because it is the part that needs nothing but a built `AnomalyScorer`: no run folder, no config, no
child process (those are `speed.py`'s). What is timed is `scorer(images)` under `torch.inference_mode()`:
normalisation, teacher and students, the per-level discrepancy maps, upsampling, level and student fusion, the
Gaussian blur and the image score. Image loading and resizing are not included (they depend on the files, not on
the model).

Peak resident memory is read from the kernel's high-water mark of the process's address space (`VmHWM` in
/proc/self/status). `getrusage(RUSAGE_SELF).ru_maxrss` is deliberately not used where /proc exists: Linux carries
the parent's peak across fork/vfork + exec, so a child started by a 3 GB training process would report >= 3 GB.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillad.errors import ConfigError
from distillad.scoring import AnomalyScorer

SPEED_KEYS = ("latency_ms_bs1", "throughput_ips_bs16", "peak_rss_mb", "params", "gflops")
DEFAULT_THREADS = 2          # the development machine's core count; the published CPU figures use 2 threads
DEFAULT_WARMUP = 5
DEFAULT_REPEATS = 30
DEFAULT_BATCHES = 3          # timed batches for the throughput figure (after one warm-up batch)
GFLOPS_CONVENTION = "torch.utils.flop_counter.FlopCounterMode: 2 FLOPs per multiply-add (1 MAC = 2 FLOPs)"


# ------------------------------------------------------------------------------------------------ machine facts


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else platform.processor(), else 'unknown'."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _status_kb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb() -> tuple[float, str]:
    """(peak resident MiB of this process, how it was read). VmHWM where /proc exists, else ru_maxrss."""
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm / 1024.0, "VmHWM"
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return (maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024.0), "ru_maxrss"


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


# ------------------------------------------------------------------------------------------------ size and cost


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """All parameters (teacher + students), the frozen teacher's share and the rest: what training updates
    (the students, and any other non-teacher module such as AAND's amplifiers)."""
    total = sum(p.numel() for p in model.parameters())
    teacher = getattr(model, "teacher", None)
    teacher_params = sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
    return {"params": int(total), "teacher_params": int(teacher_params),
            "trainable_params": int(total - teacher_params)}


def _device_of(scorer: AnomalyScorer) -> torch.device:
    parameter = next(scorer.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def count_gflops(scorer: AnomalyScorer, image_size: int) -> float:
    """GFLOPs of one image through the scorer, as torch's FlopCounterMode counts them (2 FLOPs per multiply-add).

    FlopCounterMode counts convolutions, matmuls and similar; element-wise work (BatchNorm folded or not,
    activations, the cosine maps, bilinear upsampling) is not counted, which is the usual convention."""
    from torch.utils.flop_counter import FlopCounterMode

    images = torch.rand(1, 3, image_size, image_size, device=_device_of(scorer))
    scorer.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        scorer(images)
    return counter.get_total_flops() / 1e9


# ------------------------------------------------------------------------------------------------ timing


def check_image_size(image_size: int, what: str = "image_size") -> None:
    """The scorer's input side must be a positive multiple of 32 (the backbones' coarsest stride)."""
    if image_size < 32 or image_size % 32:
        raise ConfigError(f"{what} must be a positive multiple of 32, got {image_size}")


def _timed_call(scorer: Any, images: torch.Tensor | np.ndarray) -> float:
    on_cuda = isinstance(images, torch.Tensor) and images.device.type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    scorer(images)
    sync()
    return time.perf_counter() - start


def measure_speed(scorer: AnomalyScorer, *, image_size: int, threads: int = DEFAULT_THREADS,
                  warmup: int = DEFAULT_WARMUP, repeats: int = DEFAULT_REPEATS, batch_size: int = 16,
                  batches: int = DEFAULT_BATCHES, runtime: Any = None) -> dict[str, Any]:
    """Latency at batch 1, throughput at `batch_size`, parameters, GFLOPs and this process's peak RSS.

    - latency: median (also min, mean, p90) of `repeats` single-image calls after `warmup` untimed ones;
    - throughput: images/s from the median of `batches` timed batches after one warm-up batch;
    - gflops: per image, counted by torch's FlopCounterMode, which counts 2 FLOPs per multiply-add;
    - peak_rss_mb: peak of the *whole calling process* (VmHWM) — use `speed_report(isolate=True)` for a figure that
      holds only the model and its inference.
    `torch.set_num_threads(threads)` holds during the measurement; the previous setting is restored afterwards.
    `runtime`: a `distillad.deploy` session running the scorer's export (numpy in and out), timed in its place;
    parameters and GFLOPs are still counted on the torch scorer (the same network).
    """
    check_image_size(image_size)
    if threads < 1 or warmup < 0 or repeats < 1 or batch_size < 1 or batches < 1:
        raise ConfigError("threads, repeats, batch_size and batches must be >= 1 and warmup >= 0")
    device = _device_of(scorer)
    load_before = _load_average()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    scorer.eval()
    generator = torch.Generator().manual_seed(0)
    try:
        single = torch.rand(1, 3, image_size, image_size, generator=generator).to(device)
        batch = torch.rand(batch_size, 3, image_size, image_size, generator=generator).to(device)
        call = scorer
        if runtime is not None:
            single, batch = single.cpu().numpy(), batch.cpu().numpy()
            call = runtime.run
        with torch.inference_mode():
            for _ in range(warmup):
                _timed_call(call, single)
            latencies = [_timed_call(call, single) * 1000.0 for _ in range(repeats)]
            _timed_call(call, batch)
            batch_seconds = [_timed_call(call, batch) for _ in range(batches)]
        gflops = count_gflops(scorer, image_size)
    finally:
        torch.set_num_threads(previous_threads)
    peak, peak_source = peak_rss_mb()
    throughput = batch_size / statistics.median(batch_seconds)
    result: dict[str, Any] = {
        "latency_ms_bs1": statistics.median(latencies),
        f"throughput_ips_bs{batch_size}": throughput,
        "peak_rss_mb": peak,
        **count_parameters(scorer.model),
        "gflops": gflops,
        "latency_ms_bs1_min": min(latencies),
        "latency_ms_bs1_mean": statistics.fmean(latencies),
        "latency_ms_bs1_p90": float(np.percentile(latencies, 90)),
        "throughput_ips": throughput,
        "throughput_batch_size": batch_size,
        "gflops_convention": GFLOPS_CONVENTION,
        "peak_rss_source": peak_source,
        "peak_rss_scope": "whole calling process",
        "image_size": image_size,
        "threads": threads,
        "warmup": warmup,
        "repeats": repeats,
        "batches": batches,
        "channels_last": scorer.memory_format == torch.channels_last,
        "device": str(device),
        "torch_version": torch.__version__,
        "runtime": runtime.name if runtime is not None else "torch",
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        # 1-minute load average before and after: above the core count, other work inflated the timings
        "load_average_1min": [load_before, _load_average()],
        # how idle OpenMP threads wait (None: the library's default, which spins); PASSIVE changes torch's timings
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result
