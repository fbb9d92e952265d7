"""`distillad export`: a run as one ONNX graph (images -> anomaly map, image score) or OpenVINO IR, with its
contract in the model's metadata and, for people and for OpenVINO IR, in a sidecar JSON beside it.

The graph and its checks are `deploy.graph`'s; static int8 is `deploy.int8`'s; `--runtime` for a run's
`predict`, `test` and `speed` (a cached export) is `deploy.runtime_switch`'s.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from distillad.deploy.graph import (RuntimeScorer, build_contract, check_parity, export_model_proto, load_proto,
                                    parity, probe_images, with_contract)
from distillad.deploy.int8 import (calibration_arrays, evaluate_category, format_int8, quantize_int8,
                                   recalibrate_int8)
from distillad.deploy.runtimes import DEFAULT_THREADS, OUTPUT_NAMES, open_session, require_runtime, sidecar_path
from distillad.engine.checkpoint import load_run
from distillad.errors import ConfigError, DataError, RunError
from distillad.io import atomic_write_bytes, atomic_write_json, fsync_dir

FORMATS = {"onnx": ".onnx", "openvino": ".xml"}


def _check_out(out: Path, fmt: str, overwrite: bool) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if out.suffix.lower() != FORMATS[fmt]:
        raise ConfigError(f"--out for --format {fmt} must end in {FORMATS[fmt]}, got {out.name}")
    if out.is_dir():
        raise RunError(f"--out {out} is a folder; give a file name ending in {FORMATS[fmt]}")
    if out.exists() and not overwrite:
        raise RunError(f"{out} already exists; choose another --out or pass --overwrite")


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, *, fmt: str = "onnx", int8: bool = False,
               calibration_data: str | os.PathLike | None = None, overwrite: bool = False,
               threads: int = DEFAULT_THREADS, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`distillad export`: write the run's scorer as one graph with its contract; returns what was written and
    the checks (parity with torch; for int8, the recalibrated threshold and the accuracy change)."""
    out = Path(out)
    _check_out(out, fmt, overwrite)
    if int8 and calibration_data is None:
        raise ConfigError("--int8 needs --calibration-data DIR: defect-free images to fit the int8 ranges on")
    if calibration_data is not None and not int8:
        raise ConfigError("--calibration-data is for --int8")
    require_runtime("onnxruntime")
    if fmt == "openvino":
        require_runtime("openvino")
    loaded = load_run(run_dir)
    if int8 and loaded.scorer.map_norm != "none":
        raise ConfigError(f"--int8 of a map_norm={loaded.scorer.map_norm} run is not supported: its per-level "
                          "statistics were fitted on float features; export fp32")
    start = time.perf_counter()
    proto = export_model_proto(loaded.scorer, loaded.config.image_size)
    outputs = [o.name for o in proto.graph.output]
    fp32 = proto.SerializeToString()
    session = open_session(fp32, "onnxruntime", threads)
    images, probe_source = probe_images(loaded)
    checks: dict[str, Any] = {"parity_fp32": {**parity(loaded.scorer, session, images), "on": probe_source}}
    check_parity(checks["parity_fp32"], "the exported graph")
    log(f"exported {loaded.config.method} at {loaded.config.image_size} px in {time.perf_counter() - start:.1f} s; "
        f"onnxruntime vs torch on {probe_source}: map {checks['parity_fp32']['map_max_abs_diff']:.1e}, "
        f"score {checks['parity_fp32']['score_max_abs_diff']:.1e}")
    calibration, precision, model_bytes = loaded.calibration, "fp32", fp32
    with tempfile.TemporaryDirectory(prefix="distillad_export_") as tmp:
        if int8:
            inputs = calibration_arrays(Path(calibration_data), loaded.config.image_size, loaded.config.resize)
            if not inputs:
                raise DataError(f"--calibration-data {calibration_data} holds no images")
            model_bytes = quantize_int8(fp32, inputs, Path(tmp))
            model_bytes, calibration, source, val_inputs = recalibrate_int8(
                loaded, model_bytes, open_session(model_bytes, "onnxruntime", threads), inputs)
            quantized = open_session(model_bytes, "onnxruntime", threads)
            val_fp32 = session.run(val_inputs)[OUTPUT_NAMES[1]]
            val_int8 = quantized.run(val_inputs)[OUTPUT_NAMES[1]]
            precision = "int8"
            checks["int8"] = {
                "calibration_images": len(inputs), "threshold_fitted_on": source,
                "threshold_fp32": loaded.calibration.threshold if loaded.calibration else None,
                "threshold_int8": calibration.threshold,
                "validation_score_mean_abs_change": float(np.abs(val_int8 - val_fp32).mean()),
                "validation_score_max_abs_change": float(np.abs(val_int8 - val_fp32).max()),
            }
            accuracy_fp32 = evaluate_category(RuntimeScorer(session), Path(calibration_data), loaded,
                                               loaded.calibration)
            if accuracy_fp32 is not None:
                checks["int8"]["test_fp32"] = accuracy_fp32
                checks["int8"]["test_int8"] = evaluate_category(RuntimeScorer(quantized), Path(calibration_data),
                                                                 loaded, calibration)
            log(format_int8(checks["int8"]))
        contract = build_contract(loaded, calibration, precision=precision, outputs=outputs,
                                  extra={"checks": checks, "format": fmt})
        final = with_contract(load_proto(model_bytes), contract)
        if fmt == "onnx":
            atomic_write_bytes(out, final)
        else:
            _write_openvino(final, out, Path(tmp))
    atomic_write_json(sidecar_path(out), contract)
    if fmt == "openvino":
        check = open_session(out, "openvino", threads)
        ov_parity = parity(loaded.scorer, check, images)
        checks["parity_openvino"] = ov_parity
        if precision == "fp32":
            check_parity(ov_parity, "the OpenVINO model")
        atomic_write_json(sidecar_path(out), contract)
    log(f"wrote {out} ({precision}, {out.stat().st_size / 2**20:.1f} MiB) and its contract {sidecar_path(out)}")
    return {"out": str(out), "contract": contract}


def _write_openvino(model: bytes, out: Path, tmp: Path) -> None:
    """Convert to OpenVINO IR (weights kept f32) and move .bin then .xml into place, each by an atomic rename."""
    import openvino as ov

    source = tmp / "model.onnx"
    source.write_bytes(model)
    staged = tmp / "ir" / out.name
    ov.save_model(ov.convert_model(str(source)), str(staged), compress_to_fp16=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".bin", ".xml"):
        part = staged.with_suffix(suffix)
        temporary = out.parent / f".{out.with_suffix(suffix).name}.tmp"
        shutil.copyfile(part, temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, out.with_suffix(suffix))
    fsync_dir(out.parent)


__all__ = ["FORMATS", "export_run"]
