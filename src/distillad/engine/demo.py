"""`distillad demo`: the whole job on a built-in synthetic inspection set, no data or download needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distillad.data import discover_mvtec, make_synthetic_dataset
from distillad.engine.checkpoint import atomic_write_json, load_run
from distillad.engine.config import resolve_config
from distillad.engine.inference import evaluate_split
from distillad.engine.predict import predict_paths
from distillad.engine.train import check_run_dir_free, train_run

DEMO_IMAGE_SIZE = 128
DEMO_TRAIN_IMAGES = 150


def run_demo(out_dir: str | Path, *, epochs: int | None = None, device: str = "cpu", overwrite: bool = False,
             progress: bool = True, seed: int = 0) -> dict[str, Any]:
    out_dir = Path(out_dir)
    run_dir = out_dir / "run"
    check_run_dir_free(run_dir, overwrite)
    print(f"1/4 generating a synthetic inspection dataset in {out_dir / 'data'}")
    category = make_synthetic_dataset(out_dir / "data", seed=seed, image_size=DEMO_IMAGE_SIZE,
                                      n_train=DEMO_TRAIN_IMAGES)
    data = discover_mvtec(category, seed=seed)
    config = resolve_config("dskd", overrides={"image_size": DEMO_IMAGE_SIZE, "epochs": epochs,
                                                "device": device, "seed": seed})
    print("2/4 training DSKD")
    train_run(config, data, run_dir, progress=progress, overwrite=overwrite)
    print("3/4 testing")
    run = load_run(run_dir, device)
    result = evaluate_split(run.scorer, data, config.image_size, device=device, calibration=run.calibration)
    atomic_write_json(out_dir / "test.json", result)
    from distillad.cli import print_metrics

    print_metrics(result)
    print("4/4 predicting on the test images")
    predictions_dir = out_dir / "predictions"
    predictions = predict_paths(run, [category / "test"], predictions_dir, device=device, overwrite=overwrite,
                                progress=progress)
    defective = sum(p.label == "defective" for p in predictions)
    print(f"\ndone. {len(predictions)} test images, {defective} called defective by the calibrated threshold.\n"
          f"  model:       {run_dir}\n  metrics:     {out_dir / 'test.json'}\n"
          f"  predictions: {predictions_dir / 'predictions.csv'}\n"
          f"  heatmaps:    {predictions_dir / 'heatmaps'}\n  masks:       {predictions_dir / 'masks'}")
    return result
