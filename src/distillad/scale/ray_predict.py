"""`distillad predict --engine ray`: batch prediction as a Ray Data pipeline, for inputs one process cannot get
through in time (a production line's millions of images, on one machine's cores or a cluster).

Pipeline: the driver resolves the inputs exactly as the local `predict` (files, folders, @list files, globs; same
output names) and cuts them into the same batches of `batch_size` files. Each batch is one dataset row, so an
actor scores exactly the batches the local engine scores and a file gets the same score, bit for bit, when the
actors run as many threads as the local engine (torch splits its sums by thread count; at 1 against 2 threads a
score can differ in its 6th digit). Rows are
decoded (an unreadable file becomes an error record, never a failed task), then scored in an actor pool whose
actors each receive the run once (the torch model, or the exported graph for onnxruntime/OpenVINO: exported and
checked against torch once on the driver, shipped as bytes, so no node needs the driver's export cache). Every
map_batches call writes its heatmaps and masks and one CSV shard, OUT/shards/part-<first index>.csv, into the
staging folder; the driver keeps only one small record per image (no maps), merges the shards by input order into
predictions.csv (byte for byte what the local engine writes) and swaps the staging folder in like the local path.

The shards stay in OUT/shards: each is a valid CSV of its own rows, sorted; they show how the work was split and
let a reader start on part of the results. Shard names come from a batch's first input index, so a Ray retry of a
batch rewrites the same files instead of adding rows.

The output folder (and the inputs) must be visible to every node under the same path: actors write there directly.
"""

from __future__ import annotations

import csv
import dataclasses
import heapq
import logging
import math
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillad.engine.checkpoint import LoadedRun
from distillad.engine.predict import (CSV_COLUMNS, CSV_NAME, Prediction, _swap_in, csv_text, decode_files,
                                      make_staging, output_names, prepare_output, score_chunk)
from distillad.errors import ConfigError, RunError
from distillad.io import atomic_write_text, atomic_write_with
from distillad.scale.ray_session import ray_session

SHARDS = "shards"
# One shard per map_batches call. An actor holds a call's decoded images at once (about 300 MB for 128 of bottle's
# 900x900 RGB images), so a call, and a shard, is at most this many images.
SHARD_MAX_IMAGES = 128
# At least this many calls per actor when the input is small: an actor starts late or a call ends early, and small
# calls keep both busy to the end (292 bottle images, 2 actors on 2 cores: 92 s with 2 calls per actor, 66 s with 8,
# 71 s with 16).
CALLS_PER_WORKER = 8


@dataclasses.dataclass(frozen=True)
class RaySettings:
    """Where and how wide the pipeline runs. `workers` None: as many actors as the cluster's CPUs allow at
    `worker_threads` threads each."""

    address: str | None = None
    ray_cpus: int | None = None
    workers: int | None = None
    worker_threads: int = 1

    def check(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.worker_threads < 1:
            raise ConfigError(f"--worker-threads must be >= 1, got {self.worker_threads}")
        if self.ray_cpus is not None and self.ray_cpus < 1:
            raise ConfigError(f"--ray-cpus must be >= 1, got {self.ray_cpus}")
        if self.address and self.ray_cpus is not None:
            raise ConfigError("--ray-cpus sizes a local Ray; a cluster joined with --address has its own CPUs")


def shard_name(first_index: int) -> str:
    return f"part-{first_index:010d}.csv"


class BatchScorer:
    """A Ray Data actor: gets the run once, then scores whole batches (dataset rows) and writes their outputs."""

    def __init__(self, run: LoadedRun, runtime: str, model_bytes: bytes | None, threads: int, staging: str,
                 save_images: bool) -> None:
        torch.set_num_threads(threads)
        if runtime != "torch":
            from distillad.deploy.graph import RuntimeScorer
            from distillad.deploy.runtimes import open_session

            run = dataclasses.replace(run, scorer=RuntimeScorer(open_session(model_bytes, runtime, threads),
                                                                run.scorer))
        self.run = run
        self.staging = Path(staging)
        self.save_images = save_images

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"index": [], "score": [], "normalized": [], "label": [], "error": []}
        shard: list[Prediction] = []
        for start, paths, names, decoded in zip(rows["start"], rows["paths"], rows["names"], rows["decoded"]):
            paths = [Path(str(p)) for p in paths]
            predictions = score_chunk(self.run, paths, [str(n) for n in names], list(decoded), self.staging,
                                      save_images=self.save_images)
            for offset, p in enumerate(predictions):
                out["index"].append(int(start) + offset)
                out["score"].append(p.score)
                out["normalized"].append(float("nan") if p.normalized_score is None else p.normalized_score)
                out["label"].append(p.label)
                out["error"].append(p.error or "")
                shard.append(p)
        order = np.argsort(out["index"], kind="stable")
        first = min(out["index"])
        atomic_write_text(self.staging / SHARDS / shard_name(first), csv_text([shard[i] for i in order]))
        return out


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """Pipeline stage: read and decode one batch's files (unreadable ones become their error message)."""
    row["decoded"] = decode_files([Path(str(p)) for p in row["paths"]])
    return row


def merge_shards(shard_dir: Path, paths: list[Path], csv_path: Path) -> None:
    """predictions.csv from the shards, rows in input order, streamed (each shard is sorted): every input exactly
    once (a row a retried batch wrote twice is kept once), else RunError."""
    order = {str(p): i for i, p in enumerate(paths)}
    handles = [open(shard, newline="", encoding="utf-8") for shard in sorted(shard_dir.glob("part-*.csv"))]
    try:
        def rows(handle: Any) -> Iterator[tuple[int, list[str]]]:
            reader = csv.reader(handle)
            next(reader, None)   # header
            for fields in reader:
                yield order[fields[0]], fields

        def write(tmp: str) -> None:
            expected = 0
            with open(tmp, "w", newline="", encoding="utf-8") as out:
                writer = csv.writer(out)
                writer.writerow(CSV_COLUMNS)
                for index, fields in heapq.merge(*(rows(h) for h in handles), key=lambda item: item[0]):
                    if index < expected:
                        continue
                    if index != expected:
                        raise RunError(f"the Ray shards in {shard_dir} miss the row of {paths[expected]}")
                    writer.writerow(fields)
                    expected += 1
            if expected != len(paths):
                raise RunError(f"the Ray shards in {shard_dir} miss the row of {paths[expected]}")
        atomic_write_with(csv_path, write)
    finally:
        for handle in handles:
            handle.close()


def _model_bytes(loaded: LoadedRun, runtime: str) -> bytes | None:
    """The exported graph the actors run (from the export cache: `with_runtime` already exported and checked it)."""
    if runtime == "torch":
        return None
    from distillad.deploy.runtime_switch import cached_onnx

    return cached_onnx(loaded).read_bytes()


def _quiet_ray_data(ray: Any, progress: bool) -> None:
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    context.enable_fallback_to_arrow_object_ext_type = True   # decoded images travel pickled: said, not warned
    if not progress:
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def predict_paths_ray(run: LoadedRun, inputs: list[str | Path], out_dir: str | Path, *, runtime: str = "torch",
                      batch_size: int = 8, overwrite: bool = False, save_images: bool = True,
                      settings: RaySettings | None = None, progress: bool = True) -> list[Prediction]:
    """`predict_paths` on Ray: the same predictions.csv, heatmaps and masks, plus OUT/shards/part-*.csv.

    `run` is the torch run; `runtime` ("torch", "onnxruntime" or "openvino") what its actors score with, whose
    export `distillad.deploy.runtime_switch.with_runtime` has already made and checked. Returns one Prediction
    per input in order, without maps (those are written by the actors and never reach the driver)."""
    settings = settings or RaySettings()
    settings.check()
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    out_dir, paths = prepare_output(inputs, out_dir, overwrite)
    names = output_names(paths)
    model_bytes = _model_bytes(run, runtime)
    batches = [{"start": start, "paths": [str(p) for p in paths[start:start + batch_size]],
                "names": names[start:start + batch_size]} for start in range(0, len(paths), batch_size)]
    staging = make_staging(out_dir)
    try:
        with ray_session(settings.address, settings.ray_cpus, log_to_driver=progress) as ray, \
                warnings.catch_warnings():
            # Ray Data deep-copies its context, which warns about its own deprecated fields: not the user's business
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")
            _quiet_ray_data(ray, progress)
            workers = settings.workers or max(1, int(ray.cluster_resources().get("CPU", 1) // settings.worker_threads))
            per_call = max(1, min(SHARD_MAX_IMAGES // batch_size,
                                  math.ceil(len(batches) / (workers * CALLS_PER_WORKER))))
            dataset = (ray.data.from_items(batches, override_num_blocks=math.ceil(len(batches) / per_call))
                       .map(decode_row)
                       .map_batches(BatchScorer, batch_size=per_call, batch_format="numpy",
                                    compute=ray.data.ActorPoolStrategy(size=workers),
                                    num_cpus=settings.worker_threads,
                                    fn_constructor_kwargs={"run": run, "runtime": runtime, "model_bytes": model_bytes,
                                                           "threads": settings.worker_threads,
                                                           "staging": str(staging), "save_images": save_images}))
            predictions: list[Prediction | None] = [None] * len(paths)
            for row in dataset.iter_rows():
                index = int(row["index"])
                normalized = float(row["normalized"])
                predictions[index] = Prediction(paths[index], float(row["score"]),
                                                None if math.isnan(normalized) else normalized, str(row["label"]),
                                                error=str(row["error"]) or None)
        missing = [paths[i] for i, p in enumerate(predictions) if p is None]
        if missing:
            raise RunError(f"the Ray pipeline returned no result for {missing[0]} ({len(missing)} in all)")
        merge_shards(staging / SHARDS, paths, staging / CSV_NAME)
        _swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return predictions   # type: ignore[return-value]  (no None left: checked above)


def check_engine_options(engine: str, settings: RaySettings, device: str | torch.device) -> None:
    """Refuse Ray options with the local engine, and a GPU with the Ray engine (its actors score on CPUs)."""
    if engine not in ("local", "ray"):
        raise ConfigError(f"unknown engine {engine!r}; choose local or ray")
    if engine == "local":
        given = [flag for flag, value in (("--address", settings.address), ("--ray-cpus", settings.ray_cpus),
                                          ("--workers", settings.workers)) if value is not None]
        if settings.worker_threads != 1:
            given.append("--worker-threads")
        if given:
            raise ConfigError(f"{', '.join(given)}: only with --engine ray (the default engine is local)")
    elif torch.device(device).type != "cpu":
        raise ConfigError("--engine ray scores on CPU actors; use --engine local for --device "
                          f"{torch.device(device)}")


__all__ = ["RaySettings", "check_engine_options", "merge_shards", "predict_paths_ray"]
