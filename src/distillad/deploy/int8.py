"""Static int8 export: activation ranges from defect-free images, the threshold refitted on the quantized model,
and the accuracy change measured on a labelled test split when one is given. No dynamic int8 (it destroys maps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from distillad.deploy.graph import quiet_exporter
from distillad.deploy.runtimes import INPUT_NAME, OUTPUT_NAMES, image_to_input
from distillad.engine.checkpoint import LoadedRun
from distillad.errors import DataError, RunError
from distillad.scoring import Calibration

MAX_CALIBRATION_IMAGES = 64


def calibration_arrays(folder: Path, image_size: int, resize: str = "stretch") -> list[np.ndarray]:
    """Up to MAX_CALIBRATION_IMAGES defect-free images, evenly spaced, as model inputs. A category folder in the
    MVTec layout gives its train/good images; a plain folder all its images."""
    from distillad.data import list_images
    from distillad.data.images import decode_image

    if not folder.is_dir():
        raise DataError(f"--calibration-data {folder} is not a folder")
    root = folder / "train" / "good" if (folder / "train" / "good").is_dir() else folder
    paths = list_images(root)
    if len(paths) > MAX_CALIBRATION_IMAGES:
        step = len(paths) / MAX_CALIBRATION_IMAGES
        paths = [paths[int(i * step)] for i in range(MAX_CALIBRATION_IMAGES)]
    return [image_to_input(decode_image(p), image_size, resize) for p in paths]


def quantize_int8(fp32: bytes, inputs: list[np.ndarray], workdir: Path) -> bytes:
    """Static int8 (QDQ, per-channel signed weights, unsigned activations, min-max ranges) of the convolutions,
    calibrated on `inputs`; the map arithmetic after the features stays float."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(inputs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(self.items, None)
            return None if item is None else {INPUT_NAME: item[None]}

    import onnx

    source, prepared, quantized = workdir / "fp32.onnx", workdir / "prepared.onnx", workdir / "int8.onnx"
    source.write_bytes(fp32)
    with quiet_exporter():
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        # Single-channel convolutions are the map's Gaussian blur, not features: in uint8 every map collapses to
        # one value (measured: every bottle image scored 1.247), so they stay float.
        model = onnx.load(str(prepared))
        weights = {w.name: list(w.dims) for w in model.graph.initializer}
        map_convs = [n.name for n in model.graph.node
                     if n.op_type == "Conv" and weights.get(n.input[1], [0, 0])[:2] == [1, 1]]
        quantize_static(str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=["Conv"], nodes_to_exclude=map_convs,
                        calibrate_method=CalibrationMethod.MinMax)
    return quantized.read_bytes()


def refit_position_reference(loaded: LoadedRun, model_bytes: bytes, session: Any, inputs: np.ndarray
                             ) -> tuple[bytes, np.ndarray]:
    """The int8 model with its per-position reference (position_norm) refitted on its own maps of `inputs`, and
    its leave-one-out validation scores, as training fits them on the fp32 model.

    Quantization moves the maps; a reference fitted on the fp32 maps then no longer matches them (measured: bottle
    image AUROC 1.000 -> 0.785). The exporter folds the upsampled reference into one or more (S,S) constants;
    those are found by value and replaced. No match means an exporter that stores it otherwise: refused."""
    import onnx
    import torch
    from onnx import numpy_helper

    from distillad.scoring.maps import image_score, position_references, upsample

    scorer = loaded.scorer
    size = loaded.config.image_size
    maps = torch.from_numpy(np.concatenate([session.run(inputs[i:i + 8])[OUTPUT_NAMES[0]]
                                            for i in range(0, len(inputs), 8)]))
    old = upsample(scorer.position_reference.detach().float().cpu()[None], (size, size))[0]
    if scorer.position_norm == "max":               # the map output is already the excess: undo it
        maps = maps + old
    reference, leave_one_out = position_references(maps)
    new = upsample(reference[None], (size, size))[0].numpy()
    model = onnx.load_model_from_string(model_bytes)
    replaced = 0
    for initializer in model.graph.initializer:
        if int(np.prod(initializer.dims)) != size * size:
            continue
        values = numpy_helper.to_array(initializer)
        if np.allclose(values.reshape(size, size), old.numpy(), atol=1e-5):
            initializer.CopyFrom(numpy_helper.from_array(new.reshape(values.shape).astype(values.dtype),
                                                         initializer.name))
            replaced += 1
    if not replaced:
        raise RunError(f"int8 export of a position_norm={scorer.position_norm} run: the position reference was not "
                       "found in the graph to refit it; export fp32, or train with --option position_norm=none")
    scores = image_score(maps - upsample(leave_one_out, (size, size)), scorer.score_topk).numpy()
    return model.SerializeToString(), scores


def recalibrate_int8(loaded: LoadedRun, model_bytes: bytes, session: Any, calibration_inputs: list[np.ndarray]
                     ) -> tuple[bytes, Calibration, str, np.ndarray]:
    """(the int8 model, its threshold, where the threshold was fitted, those inputs): the threshold refitted on the
    quantized model's scores of the run's validation images (as training fits it), or of the calibration images
    when those are gone (in-sample: said in the report); a position reference is refitted first."""
    from distillad.data.images import decode_image

    files = [Path(p) for p in (loaded.meta.get("data") or {}).get("val_files") or []]
    if files and all(p.is_file() for p in files):
        inputs = np.stack([image_to_input(decode_image(p), loaded.config.image_size, loaded.config.resize)
                           for p in files])
        source = f"the run's {len(files)} validation images"
    else:
        inputs = np.stack(calibration_inputs)
        source = f"the {len(calibration_inputs)} calibration images (in-sample)"
    if loaded.scorer.position_norm != "none":
        model_bytes, scores = refit_position_reference(loaded, model_bytes, session, inputs)
    else:
        scores = np.concatenate([session.run(inputs[i:i + 8])[OUTPUT_NAMES[1]] for i in range(0, len(inputs), 8)])
    return model_bytes, loaded.config.threshold().fit(scores), source, inputs


def evaluate_category(scorer: Any, folder: Path, loaded: LoadedRun, calibration: Calibration | None
                       ) -> dict[str, Any] | None:
    """Image and pixel AUROC of `scorer` on a category's labelled test split (None for a plain folder)."""
    from distillad.data import load_category
    from distillad.engine.inference import evaluate_split

    if not (folder / "test").is_dir():
        return None
    split = load_category(folder, val_fraction=loaded.config.val_fraction, seed=loaded.config.seed)
    result = evaluate_split(scorer, split, loaded.config.image_size, calibration=calibration,
                            resize=loaded.config.resize)
    return {k: result[k] for k in ("image_auroc", "pixel_auroc", "aupro_30", "image_f1max") if k in result} | {
        "threshold": result.get("threshold"), "n_images": result["n_images"]}


def format_int8(report: dict[str, Any]) -> str:
    lines = [f"int8: ranges from {report['calibration_images']} defect-free images; threshold refitted on "
             f"{report['threshold_fitted_on']}: {report['threshold_fp32'] or float('nan'):.4g} (fp32) -> "
             f"{report['threshold_int8']:.4g} "
             f"(int8); validation scores moved by {report['validation_score_mean_abs_change']:.3g} on average"]
    if report.get("test_fp32"):
        for key in ("image_auroc", "pixel_auroc"):
            a, b = report["test_fp32"][key], report["test_int8"][key]
            lines.append(f"  {key:<12} fp32 {a:.4f}  int8 {b:.4f}  change {b - a:+.4f}")
    return "\n".join(lines)
