"""The engine under the API: run configuration, the training loop, evaluation, prediction and run folders.

config.py (settings and recipes), train.py (the loop and calibration), inference.py (scoring a dataset and the
evaluation protocol), predict.py (scoring files, writing CSV/heatmaps/masks), checkpoint.py (run folders),
device.py (device selection).
"""

from distillad.engine.checkpoint import LoadedRun, load_run, save_run
from distillad.engine.config import TrainConfig, load_yaml, resolve_config
from distillad.engine.inference import evaluate_split, score_dataset
from distillad.engine.predict import Prediction, predict_paths
from distillad.engine.train import TrainResult, train_run

__all__ = ["LoadedRun", "Prediction", "TrainConfig", "TrainResult", "evaluate_split", "load_run", "load_yaml",
           "predict_paths", "resolve_config", "save_run", "score_dataset", "train_run"]
