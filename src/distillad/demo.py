"""`distillad demo`: the whole job on a built-in synthetic inspection set, no data or download needed.

Written with the public API, so it is also the smallest complete example of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distillad.api import load, train
from distillad.data import make_synthetic_dataset
from distillad.engine.inference import format_metrics
from distillad.engine.train import check_run_dir_free
from distillad.io import atomic_write_json

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
    print("2/4 training DSKD")
    train(category, out=run_dir, method="dskd", image_size=DEMO_IMAGE_SIZE, epochs=epochs, device=device, seed=seed,
          overwrite=overwrite, progress=progress)
    print("3/4 testing")
    run = load(run_dir, device=device)
    result = run.evaluate(category)
    atomic_write_json(out_dir / "test.json", result)
    print(format_metrics(result))
    print("4/4 predicting on the test images")
    predictions_dir = out_dir / "predictions"
    predictions = run.predict_to_folder(category / "test", predictions_dir, overwrite=overwrite, progress=progress)
    defective = sum(p.label == "defective" for p in predictions)
    print(f"\ndone. {len(predictions)} test images, {defective} called defective by the calibrated threshold.\n"
          f"  model:       {run_dir}\n  metrics:     {out_dir / 'test.json'}\n"
          f"  predictions: {predictions_dir / 'predictions.csv'}\n"
          f"  heatmaps:    {predictions_dir / 'heatmaps'}\n  masks:       {predictions_dir / 'masks'}")
    return result
