"""The exported graph: the run's scorer as one ONNX model, its contract, and its parity with torch.

The exported module is the run's `AnomalyScorer` itself, BatchNorm folded as `load_run` builds it: normalisation,
teacher, students, per-level maps, upsampling, level and student fusion, map normalisation, position reference,
blur and image score (max or top-k mean) are all in the graph, so a map option cannot be silently left behind.
Only the batch dimension is dynamic; the image side is the run's (the score's top-k count and the blur's padding
depend on it). The contract (input, method, teacher, threshold, normalisation, version) is written into the ONNX
metadata. Every graph is checked against torch on real (or probe) images before it is written or used.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import distillad
from distillad.deploy.runtimes import (CONTRACT_KEY, CONTRACT_VERSION, DECISION_OUTPUT, INPUT_NAME, OUTPUT_NAMES,
                                       image_to_input)
from distillad.engine.checkpoint import LoadedRun
from distillad.errors import ConfigError, RunError
from distillad.scoring import AnomalyScorer, Calibration

OPSET = 18
MAP_TOLERANCE = 1e-4           # parity of an fp32 export with torch: map max abs diff
SCORE_TOLERANCE = 1e-5         # and image score max abs diff


class _Graph(nn.Module):
    """The scorer's (map, score), plus the map the threshold applies to when that is another one."""

    def __init__(self, scorer: AnomalyScorer) -> None:
        super().__init__()
        self.scorer = scorer
        self.with_decision = getattr(scorer, "position_norm", "none") == "score"

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        anomaly_map, score = self.scorer(images)
        if self.with_decision:
            return anomaly_map, score, self.scorer.decision_map(anomaly_map)
        return anomaly_map, score


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """torch.onnx prints progress and warns about optional packages (torchvision); a CLI prints one line."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_model_proto(scorer: AnomalyScorer, image_size: int) -> Any:
    """The scorer as an ONNX ModelProto (opset 18, torch.onnx's dynamo exporter, dynamic batch, weights inside)."""
    try:
        import onnx  # noqa: F401  (the exporter needs it; say so before a long trace)
        import onnxscript  # noqa: F401
    except ImportError:
        raise ConfigError("export needs onnx and onnxscript: pip install 'distillad[export]'") from None
    graph = _Graph(scorer).eval()
    probe = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    probe = probe.to(next(scorer.parameters()).device)
    outputs = [*OUTPUT_NAMES, DECISION_OUTPUT] if graph.with_decision else list(OUTPUT_NAMES)
    with quiet_exporter(), torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(graph, (probe,), dynamo=True, input_names=[INPUT_NAME], output_names=outputs,
                                    dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=4096)}},
                                    opset_version=OPSET, verbose=False, optimize=True)
    return program.model_proto


def probe_images(loaded: LoadedRun, count: int = 4) -> tuple[np.ndarray, str]:
    """Images to check an export on: the run's own defect-free validation images when they are still there,
    else a seeded random batch (a weaker check: said in the report)."""
    from distillad.data.images import decode_image

    files = [Path(p) for p in (loaded.meta.get("data") or {}).get("val_files") or []]
    files = [p for p in files if p.is_file()][:count]
    size = loaded.config.image_size
    if files:
        return (np.stack([image_to_input(decode_image(p), size, loaded.config.resize) for p in files]),
                f"{len(files)} validation images")
    rng = np.random.default_rng(0)
    return rng.random((count, 3, size, size), dtype=np.float32), f"{count} random images"


def torch_outputs(scorer: AnomalyScorer, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    device = next(scorer.parameters()).device
    with torch.inference_mode():
        maps, scores = scorer(torch.from_numpy(images).to(device))
    return maps.float().cpu().numpy(), scores.float().cpu().numpy()


def parity(scorer: AnomalyScorer, session: Any, images: np.ndarray) -> dict[str, float]:
    """Largest map and score differences between torch and a runtime session on the same images."""
    maps, scores = torch_outputs(scorer, images)
    out = session.run(images)
    return {"map_max_abs_diff": float(np.abs(out[OUTPUT_NAMES[0]] - maps).max()),
            "score_max_abs_diff": float(np.abs(out[OUTPUT_NAMES[1]] - scores).max())}


def check_parity(result: dict[str, float], what: str) -> None:
    if result["map_max_abs_diff"] > MAP_TOLERANCE or result["score_max_abs_diff"] > SCORE_TOLERANCE:
        raise RunError(f"{what} disagrees with torch beyond tolerance (map {result['map_max_abs_diff']:.2e} > "
                       f"{MAP_TOLERANCE:g} or score {result['score_max_abs_diff']:.2e} > {SCORE_TOLERANCE:g}); "
                       "use --runtime torch")


def build_contract(loaded: LoadedRun, calibration: Calibration | None, *, precision: str,
                   outputs: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a consumer of the exported model must know to feed it and read its outputs."""
    config = loaded.config
    size = config.image_size
    options = {k: v for k, v in config.options.items()}
    scorer = loaded.scorer
    return {
        "contract_version": CONTRACT_VERSION,
        "distillad_version": distillad.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32", "layout": "NCHW",
                  "channels": "RGB", "value_range": [0.0, 1.0],
                  "preprocessing": "decode (alpha composited on black, grey repeated to 3 channels), resize to "
                                   f"{size}x{size} with Pillow bilinear (antialiased when shrinking)"
                                   + (", keeping the aspect ratio: the longer side becomes "
                                      f"{size}, the image is centred and the rest filled by mirroring it at its "
                                      "edges (numpy 'symmetric' padding)" if config.resize == "letterbox" else "")
                                   + ", divide by 255; the model normalises with the teacher's mean and std itself"},
        "resize": config.resize,
        "outputs": {OUTPUT_NAMES[0]: ["batch", size, size], OUTPUT_NAMES[1]: ["batch"],
                    **({DECISION_OUTPUT: ["batch", size, size]} if DECISION_OUTPUT in outputs else {})},
        "image_size": size,
        "method": config.method,
        "teacher": loaded.meta.get("teacher", {"backbone": config.backbone}),
        "options": options,
        "map": {"level_fusion": scorer.level_fusion, "student_fusion": scorer.student_fusion,
                "sigma": float(scorer.blur.sigma), "map_norm": scorer.map_norm,
                "position_norm": scorer.position_norm, "score_topk": scorer.score_topk},
        "calibration": calibration.to_dict() if calibration else None,
        "threshold": calibration.threshold if calibration else None,
        "score_normalisation": "sigmoid((score - threshold) / scale): 0.5 at the threshold; label defective when "
                               "score > threshold; mask: decision map (anomaly_map unless a decision_map output "
                               "exists) > threshold",
        "precision": precision,
        "run": {"dir": str(loaded.run_dir), "model_sha256": loaded.meta.get("model_sha256")},
        "exporter": {"torch": torch.__version__, "opset": OPSET, "batchnorm_folded": loaded.batchnorm_folded},
        **(extra or {}),
    }


def with_contract(proto: Any, contract: dict[str, Any]) -> bytes:
    """The serialized model with the contract in its metadata_props."""
    import onnx

    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {CONTRACT_KEY: json.dumps(contract), "distillad_version":
                                        distillad.__version__})
    proto.producer_name = "distillad"
    proto.producer_version = distillad.__version__
    if proto.ByteSize() >= 2**31:
        raise ConfigError("the exported model is larger than 2 GB, the ONNX file limit (a PatchCore bank this "
                          "large needs a smaller coreset_ratio or max_bank)")
    return proto.SerializeToString()


def load_proto(data: bytes) -> Any:
    import onnx

    return onnx.load_model_from_string(data)


class RuntimeScorer:
    """An exported model that `predict` and `test` call like the torch scorer: images (B,3,S,S) tensor in [0,1]
    -> (maps, scores) tensors. `decision_map` is the torch scorer's (a subtraction, not the network)."""

    def __init__(self, session: Any, scorer: AnomalyScorer | None = None) -> None:
        self.session = session
        self.runtime = session.name
        self._scorer = scorer

    def eval(self) -> RuntimeScorer:
        return self

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.session.run(np.ascontiguousarray(images.detach().float().cpu().numpy()))
        return torch.from_numpy(out[OUTPUT_NAMES[0]]), torch.from_numpy(out[OUTPUT_NAMES[1]])

    def decision_map(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        decide = getattr(self._scorer, "decision_map", None)
        return decide(anomaly_map) if decide is not None else anomaly_map


__all__ = ["MAP_TOLERANCE", "OPSET", "SCORE_TOLERANCE", "RuntimeScorer", "build_contract", "check_parity",
           "export_model_proto", "load_proto", "parity", "probe_images", "torch_outputs", "with_contract"]
