"""Running an exported model without torch: onnxruntime or OpenVINO sessions, and `DeployedModel`, which turns
decoded images into the scores, labels, maps and masks `predict` gives.

Thread settings are chosen to survive a busy machine: onnxruntime's worker threads do not spin while waiting
(`allow_spinning=0`), and OpenVINO runs in latency mode with a fixed thread count. Spinning threads are what made
torch's 2-thread latency collapse from 43 ms to 2.4 s next to another CPU-bound job (issue 8); torch itself is
told the same through `OMP_WAIT_POLICY=PASSIVE` in the environment (see README, "Deploy").

numpy, Pillow and the runtime only: `distillad serve` runs on this module in a process that never imports torch.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distillad.data.images import resize_image_array
from distillad.errors import ConfigError, RunError
from distillad.heatmaps import map_at_image_size
from distillad.scoring.calibration import Calibration

RUNTIMES = ("torch", "onnxruntime", "openvino")
CONTRACT_KEY = "distillad.contract"        # ONNX metadata_props key holding the contract JSON
CONTRACT_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score")
DECISION_OUTPUT = "decision_map"           # a third output when the threshold applies to another map (position_norm=score)
DEFAULT_THREADS = 2
_PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "torch": "torch"}
_EXTRAS = {"onnxruntime": "export", "openvino": "openvino", "torch": ""}


def runtime_installed(runtime: str) -> bool:
    return importlib.util.find_spec(_PACKAGES.get(runtime, runtime)) is not None


def require_runtime(runtime: str) -> None:
    """Refuse an unknown or uninstalled runtime with what to install."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if not runtime_installed(runtime):
        raise ConfigError(f"runtime {runtime} is not installed: pip install 'distillad[{_EXTRAS[runtime]}]'")


def sidecar_path(model_path: str | Path) -> Path:
    """The contract JSON written beside an exported model: model.onnx -> model.onnx.json (model.xml ->
    model.xml.json, so an ONNX and an OpenVINO export of one run can sit side by side)."""
    return Path(f"{model_path}.json")


def image_to_input(array: np.ndarray, image_size: int, resize: str = "stretch") -> np.ndarray:
    """A decoded (H,W,1|3) image -> (3,S,S) float32 in [0,1]: the resize `predict` uses, and the same float values
    as `array_to_tensor` (uint8 / 255 in float32 rounds identically in numpy and torch)."""
    resized = resize_image_array(array, image_size, resize)
    if resized.dtype == np.uint8:
        chw = resized.astype(np.float32) / np.float32(255.0)
    else:
        chw = np.clip(resized.astype(np.float32), 0.0, 1.0)
    return np.ascontiguousarray(chw.transpose(2, 0, 1))


class OnnxRuntimeSession:
    """An onnxruntime CPU session: `threads` intra-op threads that sleep instead of spinning, one inter-op thread.
    `run` is thread-safe (onnxruntime's own guarantee)."""

    name = "onnxruntime"

    def __init__(self, model: str | Path | bytes, threads: int = DEFAULT_THREADS) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.log_severity_level = 3
        source = model if isinstance(model, bytes) else str(model)
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as error:   # onnxruntime raises its own exception types for unreadable files
            raise RunError(f"onnxruntime cannot load {'the model' if isinstance(model, bytes) else model}: "
                           f"{str(error).splitlines()[0]}") from None
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(None, {INPUT_NAME: images})
        return dict(zip(self.output_names, outputs))


class OpenVinoSession:
    """An OpenVINO CPU model compiled in f32 (the CPU plugin would pick bf16 on AMX/AVX-512 machines: maps off by
    0.06), latency mode, `threads` threads. One infer request behind a lock: requests are not thread-safe."""

    name = "openvino"

    def __init__(self, model: str | Path, threads: int = DEFAULT_THREADS) -> None:
        import openvino as ov

        core = ov.Core()
        try:
            compiled = core.compile_model(str(model), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                              "PERFORMANCE_HINT": "LATENCY",
                                                              "INFERENCE_NUM_THREADS": int(threads)})
        except Exception as error:   # OpenVINO raises RuntimeError subclasses of its own
            raise RunError(f"OpenVINO cannot load {model}: {str(error).splitlines()[0]}") from None
        self.output_names = [next(iter(o.get_names())) for o in compiled.outputs]
        self.request = compiled.create_infer_request()
        self.lock = threading.Lock()
        self.metadata: dict[str, str] = {}

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        with self.lock:
            result = self.request.infer({INPUT_NAME: images})
            return {name: np.array(result[i]) for i, name in enumerate(self.output_names)}


def open_session(model: str | Path | bytes, runtime: str = "onnxruntime",
                 threads: int = DEFAULT_THREADS) -> OnnxRuntimeSession | OpenVinoSession:
    require_runtime(runtime)
    if threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    if runtime == "onnxruntime":
        return OnnxRuntimeSession(model, threads)
    if runtime == "openvino":
        if isinstance(model, bytes):    # OpenVINO compiles from a file: a private temporary one, gone once compiled
            with tempfile.TemporaryDirectory(prefix="distillad_openvino_") as folder:
                path = Path(folder) / "model.onnx"
                path.write_bytes(model)
                return OpenVinoSession(path, threads)
        return OpenVinoSession(model, threads)
    raise ConfigError("the torch runtime runs a run folder, not an exported model")


def read_contract(model_path: str | Path, session: Any | None = None) -> dict[str, Any]:
    """The contract of an exported model: from the ONNX metadata when the session has it, else the sidecar JSON."""
    model_path = Path(model_path)
    text = (getattr(session, "metadata", None) or {}).get(CONTRACT_KEY)
    if text is None:
        sidecar = sidecar_path(model_path)
        if not sidecar.is_file():
            raise RunError(f"{model_path} carries no distillad contract and {sidecar} is missing: export it with "
                           "`distillad export`")
        text = sidecar.read_text(encoding="utf-8")
    try:
        contract = json.loads(text)
    except json.JSONDecodeError as error:
        raise RunError(f"the contract of {model_path} is not valid JSON: {error}") from None
    if not isinstance(contract, dict) or contract.get("contract_version") != CONTRACT_VERSION:
        raise RunError(f"{model_path} has a contract of another version ({contract.get('contract_version')!r}, "
                       f"this distillad reads {CONTRACT_VERSION}): export it again")
    return contract


@dataclass
class Verdict:
    """One image scored by a deployed model; maps at the image's own resolution when asked for."""

    score: float
    normalized_score: float | None
    label: str                          # normal | defective | uncalibrated
    anomaly_map: np.ndarray | None = None
    mask: np.ndarray | None = None

    def to_json(self) -> dict[str, Any]:
        return {"score": self.score, "normalized_score": self.normalized_score, "label": self.label}


class DeployedModel:
    """An exported model and its contract: decoded images in, `predict`'s scores, labels, maps and masks out."""

    def __init__(self, model_path: str | Path, *, runtime: str = "onnxruntime", threads: int = DEFAULT_THREADS,
                 session: Any | None = None) -> None:
        self.path = Path(model_path)
        if session is None and not self.path.is_file():
            raise RunError(f"model file {self.path} does not exist")
        self.session = session if session is not None else open_session(self.path, runtime, threads)
        self.runtime = self.session.name
        self.contract = read_contract(self.path, self.session)
        self.image_size = int(self.contract["image_size"])
        self.resize = str(self.contract.get("resize", "stretch"))    # contracts written before resize: stretched
        calibration = self.contract.get("calibration")
        self.calibration = Calibration.from_dict(calibration) if calibration else None

    @property
    def threshold(self) -> float | None:
        return self.calibration.threshold if self.calibration else None

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B,3,S,S) float32 in [0,1] -> maps (B,S,S), scores (B,), and the maps the threshold applies to."""
        outputs = self.session.run(np.ascontiguousarray(images, dtype=np.float32))
        maps = outputs[OUTPUT_NAMES[0]]
        return maps, outputs[OUTPUT_NAMES[1]], outputs.get(DECISION_OUTPUT, maps)

    def predict(self, arrays: list[np.ndarray], *, maps: bool = True) -> list[Verdict]:
        """Decoded images (any size) -> one Verdict each; with `maps`, the map and mask at the image's size."""
        if not arrays:
            return []
        batch = np.stack([image_to_input(a, self.image_size, self.resize) for a in arrays])
        anomaly_maps, scores, decision_maps = self.score(batch)
        own_units = decision_maps is anomaly_maps          # the threshold applies to the map itself
        verdicts = []
        for array, anomaly_map, decision_map, score in zip(arrays, anomaly_maps, decision_maps, scores):
            score = float(score)
            height, width = array.shape[:2]
            full = map_at_image_size(anomaly_map, height, width, self.resize) if maps else None
            if self.calibration is None:
                verdicts.append(Verdict(score, None, "uncalibrated", full, None))
                continue
            label = "defective" if self.calibration.is_defective(score) else "normal"
            mask = None
            if maps:
                decision = full if own_units else map_at_image_size(decision_map, height, width, self.resize)
                mask = decision > self.calibration.threshold
            verdicts.append(Verdict(score, self.calibration.normalize(score), label, full, mask))
        return verdicts


__all__ = ["CONTRACT_KEY", "DeployedModel", "OnnxRuntimeSession", "OpenVinoSession", "RUNTIMES", "Verdict",
           "image_to_input", "open_session", "read_contract", "require_runtime", "runtime_installed"]
