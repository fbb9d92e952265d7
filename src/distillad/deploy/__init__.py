"""Deployment: one ONNX graph from images to (anomaly map, image score), runtimes to run it, and an HTTP service.

- `graph.py` (needs torch and onnx): the scorer `predict` uses as one ONNX graph, its contract (input size, value
  range, method, teacher, threshold, normalisation) and its parity with torch.
- `export.py`: `distillad export` (ONNX or OpenVINO IR, atomic writes); `int8.py`: static int8 with the threshold
  refitted on the quantized model; `runtime_switch.py`: `--runtime` for a run, from a cache of exported graphs.
- `runtimes.py` (no torch): onnxruntime and OpenVINO sessions with contention-safe thread settings, and
  `DeployedModel`, which scores decoded images exactly as `predict` does.
- `serve.py` (no torch): `distillad serve`, FastAPI + uvicorn over a `DeployedModel`.

This package imports nothing on its own, so `python -m distillad.deploy.serve` stays free of torch.
"""
