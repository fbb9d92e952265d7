"""The public Python API: train a run, load it, predict, evaluate. The command line is a thin layer over it.

    import distillad
    run = distillad.train("data/bottle", method="dskd", out="runs/bottle")
    predictions = run.predict(["a.png", "b.png"])       # files, folders, PIL images or arrays
    metrics = run.evaluate("data/bottle")               # the dict `distillad test --json` writes
    run = distillad.load("runs/bottle")
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from distillad.data import CategorySplit, load_category
from distillad.data.images import decode_image
from distillad.data.listing import resolve_inputs
from distillad.engine.checkpoint import LoadedRun, load_run
from distillad.engine.config import TrainConfig, load_yaml, resolve_config
from distillad.engine.inference import evaluate_split
from distillad.engine.predict import Prediction, predict_batch, predict_paths
from distillad.engine.train import train_run
from distillad.errors import ConfigError
from distillad.scoring import AnomalyScorer, Calibration

ImageInput = Union[str, "os.PathLike[str]", Image.Image, np.ndarray]
DataInput = Union[str, "os.PathLike[str]", CategorySplit]


class Run:
    """A trained run, ready for inference: its config, calibrated threshold and BatchNorm-folded scorer.

    Get one from `distillad.train(...)` or `distillad.load(run_dir)`.
    """

    def __init__(self, loaded: LoadedRun, device: str | torch.device = "cpu", *, inference: LoadedRun | None = None,
                 runtime: str = "torch") -> None:
        self._loaded = loaded
        self.device = torch.device(device)
        # What predict and evaluate call: the torch scorer, or the same graph exported to another runtime
        self._inference = inference or loaded
        self.runtime = runtime

    # -- what the run is ----------------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return self._loaded.run_dir

    @property
    def config(self) -> TrainConfig:
        return self._loaded.config

    @property
    def method(self) -> str:
        return self._loaded.config.method

    @property
    def image_size(self) -> int:
        return self._loaded.config.image_size

    @property
    def calibration(self) -> Calibration | None:
        """Threshold and score normalisation from defect-free validation images (None if map options changed)."""
        return self._loaded.calibration

    @property
    def threshold(self) -> float | None:
        return self._loaded.calibration.threshold if self._loaded.calibration else None

    @property
    def meta(self) -> dict[str, Any]:
        """Everything meta.json records: config, teacher, calibration, training history, versions."""
        return self._loaded.meta

    @property
    def scorer(self) -> AnomalyScorer:
        """The torch module images (B,3,H,W) in [0,1] -> (maps (B,H,W), scores (B,)) that every command runs."""
        return self._loaded.scorer

    @property
    def loaded(self) -> LoadedRun:
        return self._loaded

    def __repr__(self) -> str:
        threshold = "uncalibrated" if self.threshold is None else f"threshold {self.threshold:.4g}"
        return (f"Run({str(self.run_dir)!r}, method={self.method!r}, backbone={self.config.backbone!r}, "
                f"image_size={self.image_size}, {threshold}, runtime={self.runtime!r})")

    # -- using it -----------------------------------------------------------------------------------------------
    def predict(self, images: ImageInput | Iterable[ImageInput], *, batch_size: int = 8) -> list[Prediction]:
        """Score images: a path, a folder (searched recursively), a PIL image, an (H,W[,3]) array (uint8, or
        float in [0,1]), or a list of these. Returns one Prediction per image, in order, with its score,
        normalised score (0.5 at the threshold), label, and anomaly map and mask at the image's own resolution.

        >>> [p.label for p in run.predict("new_parts/")]
        ['normal', 'defective', ...]
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        items = [images] if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)) else list(images)
        sources: list[tuple[Path | None, ImageInput]] = []
        for item in items:
            if isinstance(item, (str, os.PathLike)):
                sources.extend((path, path) for path in resolve_inputs(item))
            else:
                sources.append((None, item))
        predictions: list[Prediction] = []
        for start in range(0, len(sources), batch_size):
            chunk = sources[start:start + batch_size]
            arrays = [decode_image(source) for _, source in chunk]
            predictions.extend(predict_batch(self._inference, arrays, [path for path, _ in chunk], self.device))
        return predictions

    def predict_to_folder(self, inputs: ImageInput | Iterable[ImageInput], out: str | os.PathLike, *,
                          batch_size: int = 8, overwrite: bool = False, save_images: bool = True,
                          progress: bool = False, engine: str = "local", address: str | None = None,
                          ray_cpus: int | None = None, workers: int | None = None,
                          worker_threads: int = 1) -> list[Prediction]:
        """`distillad predict`: score files, folders, @list files or glob patterns and write predictions.csv,
        heatmaps/ and masks/ into `out`.

        `engine="ray"` scores in a Ray Data actor pool (`workers` actors of `worker_threads` threads) on a local Ray
        of `ray_cpus` CPUs, or on the cluster at `address`, with the same files as a result, plus OUT/shards/
        (see `distillad.scale.ray_predict`); `out` must then be visible to every node. Needs `distillad[ray]`."""
        paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
        if engine != "local" or address is not None or ray_cpus is not None or workers is not None \
                or worker_threads != 1:
            from distillad.scale.ray_predict import RaySettings, check_engine_options, predict_paths_ray

            settings = RaySettings(address=address, ray_cpus=ray_cpus, workers=workers,
                                   worker_threads=worker_threads)
            check_engine_options(engine, settings, self.device)
            return predict_paths_ray(self._loaded, paths, out, runtime=self.runtime, batch_size=batch_size,
                                     overwrite=overwrite, save_images=save_images, settings=settings,
                                     progress=progress)
        return predict_paths(self._inference, paths, out, batch_size=batch_size, device=self.device,
                             overwrite=overwrite, save_images=save_images, progress=progress)

    def evaluate(self, data: DataInput, *, batch_size: int = 16, progress: bool = False) -> dict[str, Any]:
        """`distillad test`: image AUROC, pixel AUROC, AUPRO@0.3, F1-max and the threshold's false-alarm and
        detection rates on the labelled test split of `data` (an MVTec-layout folder or a CategorySplit)."""
        split = data if isinstance(data, CategorySplit) else load_category(
            Path(data), val_fraction=self.config.val_fraction, seed=self.config.seed)
        result = evaluate_split(self._inference.scorer, split, self.image_size, batch_size=batch_size,
                                device=self.device, calibration=self.calibration, progress=progress,
                                resize=self.config.resize)
        result.update({"method": self.method, "backbone": self.config.backbone, "run": str(self.run_dir),
                       "options": self.config.options, "runtime": self.runtime})
        return result


def load(run_dir: str | os.PathLike, *, device: str | torch.device = "cpu",
         map_options: dict[str, Any] | None = None, runtime: str = "torch", threads: int = 2,
         log: Any = None) -> Run:
    """Load a trained run folder (model.pt with weights_only=True, meta.json). `map_options` evaluates the same
    model with another map rule (level_fusion, student_fusion, sigma); its saved threshold is then dropped.

    `runtime` runs predict and evaluate on "onnxruntime" or "openvino" (`threads` threads, no spinning): the
    scorer exported to ONNX once (cached, see `distillad.deploy.runtime_switch.cache_dir`) and checked against torch on
    the run's validation images; "auto" takes the fastest installed one (OpenVINO, then onnxruntime) that agrees
    with torch, else torch (said to `log`).
    """
    loaded = load_run(run_dir, device, map_options=map_options)
    if runtime == "torch" or (runtime == "auto" and torch.device(device).type != "cpu"):
        return Run(loaded, device)
    if torch.device(device).type != "cpu":
        raise ConfigError(f"runtime {runtime} runs on the CPU; use --device cpu or --runtime torch")
    from distillad.deploy.runtime_switch import with_runtime

    inference, chosen = with_runtime(loaded, runtime, threads=threads, log=log)
    return Run(loaded, device, inference=inference, runtime=chosen)


def train(data: DataInput, *, out: str | os.PathLike, method: str | None = None,
          config: str | os.PathLike | dict[str, Any] | None = None, options: dict[str, Any] | None = None,
          overwrite: bool = False, resume: bool = False, progress: bool = True, log: Any = print,
          **settings: Any) -> Run | None:
    """Train on the defect-free images of `data` and return the loaded run saved in `out`.

    `data` is an MVTec-layout category folder, a plain folder of defect-free images, or a CategorySplit.
    Settings are merged as the method's recipe < `config` (a YAML file or a dict) < keyword `settings`
    (any TrainConfig field: epochs, steps, image_size, batch_size, seed, device, val_fraction, threshold_rule,
    false_alarm_rate, ...)
    < `options` (method switches, e.g. {"student_fusion": "max"}).
    `resume` continues an interrupted training of `out` (same settings and data) from its last epoch checkpoint,
    to the weights an uninterrupted run would have; `overwrite` replaces a finished run in `out`.
    Under torchrun (`torchrun --nproc_per_node=N -m distillad train ...`, or this function in a script torchrun
    starts) the processes train data-parallel; process 0 returns the run, the others None.

    >>> run = distillad.train("data/bottle", out="runs/bottle", epochs=2)
    """
    file_values = load_yaml(config) if isinstance(config, (str, os.PathLike)) else dict(config or {})
    overrides = {"method": method, **settings}
    if options:
        overrides["options"] = dict(options)
    resolved = resolve_config(file_values=file_values, overrides=overrides)
    split = data if isinstance(data, CategorySplit) else load_category(
        Path(data), val_fraction=resolved.val_fraction, seed=resolved.seed)
    result = train_run(resolved, split, out, progress=progress, overwrite=overwrite, resume=resume, log=log)
    if result is None:   # a process other than 0 of a data-parallel training: process 0 holds the run
        return None
    return load(out, device=resolved.device)
