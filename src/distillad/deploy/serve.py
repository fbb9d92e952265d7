"""`distillad serve`: an HTTP inspection service over an exported model (FastAPI + uvicorn + onnxruntime, no torch).

    POST /predict   multipart form, one or more files in `files` (or `file`); ?heatmap=true&mask=true add PNGs
    GET  /health    liveness and what is loaded
    GET  /metadata  the model's contract (input size, method, teacher, threshold, normalisation, version)
    GET  /          a page to upload an image and see the verdict and the heatmap overlay

Run as `python -m distillad.deploy.serve --model FILE`: the CLI replaces itself with this process (after exporting
a `--run` with torch), so the serving process never imports torch; /health reports it. Uploads are limited in
bytes per request (413 before the body is read when Content-Length says so) and pixels per image; bad input gets a 4xx naming the
problem. One inference at a time per worker (the session's threads already use the cores); decoding and encoding
run concurrently in the thread pool.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse

from distillad.data.images import decode_image_bytes
from distillad.deploy.runtimes import DEFAULT_THREADS, DeployedModel
from distillad.errors import DataError, DistilladError
from distillad.heatmaps import overlay, png_bytes, to_rgb_u8

DEFAULT_MAX_BYTES = 20 * 2**20
DEFAULT_MAX_PIXELS = 50_000_000
MAX_FILES = 32
ACCEPTED_TYPES = ("image/", "application/octet-stream")
ENV_SETTINGS = "DISTILLAD_SERVE_SETTINGS"


class Settings:
    """What a worker needs to build the app; travels to uvicorn's workers as JSON in the environment."""

    def __init__(self, model: str, runtime: str = "onnxruntime", threads: int = DEFAULT_THREADS,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.model, self.runtime, self.threads = model, runtime, int(threads)
        self.max_bytes, self.max_pixels = int(max_bytes), int(max_pixels)

    def to_json(self) -> str:
        return json.dumps(vars(self))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        return cls(**json.loads(text))


def _page() -> str:
    return resources.files("distillad.deploy").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(settings: Settings) -> FastAPI:
    """The FastAPI application over one loaded model."""
    model = DeployedModel(settings.model, runtime=settings.runtime, threads=settings.threads)
    inference_lock = threading.Lock()
    started = time.time()
    app = FastAPI(title="distillad inspection service", version=model.contract.get("distillad_version", ""))

    @app.exception_handler(HTTPException)
    async def _error(_request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": error.detail}, status_code=error.status_code)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return _page()

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": str(model.path), "runtime": model.runtime, "method": model.contract["method"],
                "precision": model.contract.get("precision"), "uptime_s": round(time.time() - started, 1),
                "torch_imported": "torch" in sys.modules, "pid": os.getpid()}

    @app.get("/metadata")
    def metadata() -> dict[str, Any]:
        return {**model.contract, "limits": {"max_bytes": settings.max_bytes, "max_pixels": settings.max_pixels,
                                             "max_files": MAX_FILES}}

    def score(uploads: list[tuple[str, bytes]], heatmap: bool, mask: bool) -> list[dict[str, Any]]:
        arrays = []
        for name, data in uploads:
            try:
                arrays.append(decode_image_bytes(data, name, max_pixels=settings.max_pixels))
            except DataError as error:
                status = 413 if "more than the limit" in str(error) else 400
                raise HTTPException(status, str(error)) from None
        with inference_lock:
            verdicts = model.predict(arrays, maps=heatmap or mask)
        results = []
        for (name, _), array, verdict in zip(uploads, arrays, verdicts):
            item: dict[str, Any] = {"filename": name, "width": int(array.shape[1]), "height": int(array.shape[0]),
                                    **verdict.to_json(), "threshold": model.threshold}
            if heatmap and verdict.anomaly_map is not None:
                threshold = model.threshold if model.threshold is not None else float("inf")
                scale = 2.0 * model.threshold if model.threshold is not None else float(verdict.anomaly_map.max())
                drawn = overlay(to_rgb_u8(array), verdict.anomaly_map, threshold, scale)
                item["heatmap_png"] = base64.b64encode(png_bytes(drawn)).decode("ascii")
            if mask and verdict.mask is not None:
                item["mask_png"] = base64.b64encode(png_bytes(verdict.mask.astype(np.uint8) * 255)).decode("ascii")
            results.append(item)
        return results

    @app.post("/predict")
    async def predict(request: Request, heatmap: bool = False, mask: bool = False) -> dict[str, Any]:
        start = time.perf_counter()
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise HTTPException(415, f"send images as multipart/form-data (field 'files'), not {content_type or 'no content type'}")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_bytes:
            raise HTTPException(413, f"request of {int(length)} bytes is over the limit of {settings.max_bytes} bytes")
        try:
            form = await request.form(max_files=MAX_FILES, max_fields=MAX_FILES)
        except HTTPException:
            raise
        except Exception as error:   # python-multipart's and starlette's parse errors
            raise HTTPException(400, f"unreadable multipart body: {error}") from None
        uploads: list[tuple[str, bytes]] = []
        received = 0
        try:
            for key, value in form.multi_items():
                if key not in ("file", "files") or isinstance(value, str):
                    continue
                name = value.filename or "upload"
                declared = (value.content_type or "").lower()
                if declared and not declared.startswith(ACCEPTED_TYPES):
                    raise HTTPException(415, f"{name}: content type {declared} is not an image")
                data = await value.read(settings.max_bytes + 1)
                received += len(data)
                if received > settings.max_bytes:      # a chunked request has no Content-Length to check first
                    raise HTTPException(413, f"{name}: the upload is over the limit of {settings.max_bytes} bytes")
                uploads.append((name, data))
        finally:
            await form.close()
        if not uploads:
            raise HTTPException(400, "no image in the request: send one or more files in the form field 'files'")
        results = await run_in_threadpool(score, uploads, heatmap, mask)
        return {"predictions": results, "runtime": model.runtime, "seconds": round(time.perf_counter() - start, 4)}

    return app


def app_from_environment() -> FastAPI:
    """uvicorn's factory in each worker process."""
    return create_app(Settings.from_json(os.environ[ENV_SETTINGS]))


def run_server(settings: Settings, *, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Check the model loads (a clear error now, not in every worker), then serve with uvicorn."""
    import uvicorn

    DeployedModel(settings.model, runtime=settings.runtime, threads=settings.threads)
    os.environ[ENV_SETTINGS] = settings.to_json()
    uvicorn.run("distillad.deploy.serve:app_from_environment", factory=True, host=host, port=port,
                workers=workers, log_level="info", access_log=False)


def main(argv: list[str] | None = None) -> int:
    """`python -m distillad.deploy.serve --model FILE ...`: the torch-free process `distillad serve` becomes."""
    parser = argparse.ArgumentParser(prog="distillad serve")
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--runtime", choices=("onnxruntime", "openvino"), default="onnxruntime")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    args = parser.parse_args(argv)
    try:
        for name in ("workers", "threads", "max_bytes", "max_pixels"):
            if getattr(args, name) < 1:
                raise DataError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0 <= args.port < 65536:
            raise DataError(f"--port must be in 0..65535, got {args.port}")
        run_server(Settings(str(args.model), args.runtime, args.threads, args.max_bytes, args.max_pixels),
                   host=args.host, port=args.port, workers=args.workers)
    except DistilladError as error:
        print(f"distillad serve: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
