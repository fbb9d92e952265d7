"""Training, evaluation, prediction and run folders: the engine every command and the library share."""

from distillad.engine.checkpoint import LoadedRun, RunError, load_run, save_run
from distillad.engine.config import TrainConfig, load_yaml, resolve_config
from distillad.engine.inference import evaluate_split, score_dataset
from distillad.engine.predict import predict_paths
from distillad.engine.train import TrainResult, train_run
from distillad.engine.speed import measure_speed, speed_report
from distillad.engine.benchmark import load_spec, run_benchmark

__all__ = ["LoadedRun", "RunError", "TrainConfig", "TrainResult", "evaluate_split", "load_run", "load_spec",
           "load_yaml", "measure_speed", "predict_paths", "resolve_config", "run_benchmark", "save_run",
           "score_dataset", "speed_report", "train_run"]
