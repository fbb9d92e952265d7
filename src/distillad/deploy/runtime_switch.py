"""`--runtime` for a trained run: its graph exported once into a cache, checked against torch on the run's own
validation images, and swapped in for the torch scorer of `predict`, `test` and `speed`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

import distillad
from distillad.deploy.graph import (OPSET, RuntimeScorer, build_contract, check_parity, export_model_proto, parity,
                                    probe_images, with_contract)
from distillad.deploy.runtimes import DEFAULT_THREADS, open_session, require_runtime, runtime_installed
from distillad.engine.checkpoint import LoadedRun
from distillad.errors import ConfigError, RunError
from distillad.io import atomic_write_bytes


def cache_dir() -> Path:
    """Where `--runtime` keeps exported graphs: $DISTILLAD_CACHE_DIR, else $XDG_CACHE_HOME/distillad, else
    ~/.cache/distillad (the run folder is never written to)."""
    root = os.environ.get("DISTILLAD_CACHE_DIR")
    if root:
        return Path(root) / "exports"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "distillad" / "exports"


def cached_onnx(loaded: LoadedRun) -> Path:
    """The run's fp32 graph, exported once per (model, settings, versions) and kept in `cache_dir()`."""
    key_source = json.dumps({"sha": loaded.meta.get("model_sha256"), "run": str(Path(loaded.run_dir).resolve()),
                             "config": loaded.config.to_dict(),
                             "calibration": loaded.calibration.to_dict() if loaded.calibration else None,
                             "statistics": loaded.meta.get("map_statistics"), "distillad": distillad.__version__,
                             "torch": torch.__version__, "opset": OPSET}, sort_keys=True, default=str)
    path = cache_dir() / f"{hashlib.sha256(key_source.encode()).hexdigest()[:32]}.onnx"
    if path.is_file():
        return path
    proto = export_model_proto(loaded.scorer, loaded.config.image_size)
    contract = build_contract(loaded, loaded.calibration, precision="fp32",
                              outputs=[o.name for o in proto.graph.output], extra={"format": "onnx"})
    atomic_write_bytes(path, with_contract(proto, contract))
    return path


def runtime_scorer(loaded: LoadedRun, runtime: str, *, threads: int = DEFAULT_THREADS
                   ) -> tuple[RuntimeScorer, dict[str, float]]:
    """The run's scorer on another runtime, checked against torch on the run's validation images first."""
    require_runtime(runtime)
    session = open_session(cached_onnx(loaded), runtime, threads)
    images, _ = probe_images(loaded)
    result = parity(loaded.scorer, session, images)
    check_parity(result, runtime)
    return RuntimeScorer(session, loaded.scorer), result


# `auto`, fastest first, as measured for default DSKD at 256 px on 2 threads (benchmarks/RESULTS.md section 6:
# OpenVINO f32 17.7 ms and 59 img/s, onnxruntime 20.6 ms and 53 img/s, torch 37.8 ms and 17 img/s)
AUTO_ORDER = ("openvino", "onnxruntime")


def auto_candidates() -> list[str]:
    """The installed runtimes `auto` tries, fastest first; exporting needs onnx and onnxscript as well."""
    if not (runtime_installed("onnx") and runtime_installed("onnxscript") and runtime_installed("onnxruntime")):
        return []
    return [name for name in AUTO_ORDER if runtime_installed(name)]


def resolve_runtime(runtime: str | None) -> str:
    """`auto` (predict's default): the fastest installed runtime (its parity is still checked per run), else torch."""
    if runtime in (None, "auto"):
        return next(iter(auto_candidates()), "torch")
    return runtime


def with_runtime(loaded: LoadedRun, runtime: str | None, *, threads: int = DEFAULT_THREADS,
                 log: Callable[[str], None] | None = None) -> tuple[LoadedRun, str]:
    """`loaded` with its scorer run by `runtime` for predict and test, and the runtime actually used. With `auto`,
    a runtime whose graph cannot be exported or disagrees with torch is skipped for the next one, torch last
    (said through `log`)."""
    if runtime not in (None, "auto"):
        if runtime == "torch":
            return loaded, "torch"
        scorer, _ = runtime_scorer(loaded, runtime, threads=threads)
        return dataclasses.replace(loaded, scorer=scorer), runtime
    for candidate in auto_candidates():
        try:
            scorer, _ = runtime_scorer(loaded, candidate, threads=threads)
        except (RunError, ConfigError) as error:
            if log is not None:
                log(f"note: not running on {candidate} ({error})")
            continue
        return dataclasses.replace(loaded, scorer=scorer), candidate
    return loaded, "torch"


__all__ = ["AUTO_ORDER", "auto_candidates", "cache_dir", "cached_onnx", "resolve_runtime", "runtime_scorer",
           "with_runtime"]
