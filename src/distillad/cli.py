"""Command line: `distillad train | test | predict | demo | speed | benchmark | anomalies | export | serve`.

Each command is a thin layer over the Python API (`distillad.train`, `distillad.load`, `Run.evaluate`, ...).
Every user-facing failure (a DistilladError: bad data, missing weights, unfinished run, bad setting; or an OS error
on a path the user gave) ends in one line naming the file and the problem, exit code 2. Anything else is a bug and
keeps its traceback; DISTILLAD_DEBUG=1 shows the traceback for user errors too.

Why one module of this length: it is mostly the argument declarations of nine commands, whose help texts are the
CLI's documentation; every handler is a few lines over the API.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from distillad.errors import ConfigError, DistilladError

EXIT_USER_ERROR = 2
EXIT_SOME_FAILED = 1      # predict: some inputs could not be read; the others were scored and written


def _parse_option(text: str) -> tuple[str, Any]:
    """KEY=VALUE with the value parsed as YAML, so numbers, booleans and lists work: levels=[2,3]."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--option expects KEY=VALUE, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"--option {text!r}: the value is not valid YAML "
                                         "(quote strings, write lists as [2,3])") from None


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (exit 2) pointing at --help, like every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from distillad import __version__
    from distillad.backbones import BACKBONE_NAMES
    from distillad.data.images import RESIZE_MODES
    from distillad.methods import METHODS

    parser = OneLineParser(
        prog="distillad",
        description="Unsupervised visual anomaly detection by teacher-student knowledge distillation.")
    parser.add_argument("--version", action="version", version=f"distillad {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--device", default=None, help="cpu (default) or cuda[:N]")
        sub.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
        sub.add_argument("--no-progress", action="store_true", help="no progress bars")

    train = commands.add_parser("train", help="train a model on defect-free images",
                                description="Train on the defect-free images of a category; a seeded share is held "
                                            "out to calibrate the normal/defective threshold.")
    train.add_argument("--method", choices=sorted(METHODS), default=None, help="default: dskd")
    train.add_argument("--data", required=True, type=Path,
                       help="a category folder in the MVTec layout (train/good, test/<type>, ground_truth/<type>) "
                            "or a plain folder of defect-free images")
    train.add_argument("--out", required=True, type=Path, help="run folder to create")
    train.add_argument("--backbone", choices=BACKBONE_NAMES, default=None, help="teacher (default efficientnet_lite0)")
    train.add_argument("--weights", default=None, help="local teacher checkpoint file (ResNet family)")
    train.add_argument("--epochs", type=int, default=None,
                       help="default: as many as make about --steps optimizer steps (and at least min_epochs, "
                            "a --config setting)")
    train.add_argument("--steps", type=int, default=None,
                       help="training budget in optimizer steps (default: the method's recipe, 360 at batch 16)")
    train.add_argument("--image-size", type=int, default=None)
    train.add_argument("--resize", choices=RESIZE_MODES, default=None,
                       help="how images become the square input: stretch (default, the usual protocol) or letterbox "
                            "(aspect ratio kept, the rest filled by mirroring the image; for images of many shapes)")
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's recipe)")
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--val-fraction", type=float, default=None, help="share of train/good held out (default 0.1)")
    train.add_argument("--config", type=Path, default=None, help="YAML file of settings (flags override it)")
    train.add_argument("--option", type=_parse_option, action="append", default=[], metavar="KEY=VALUE",
                       help="a method switch, e.g. --option df_input=teacher --option levels=[2,3]")
    train.add_argument("--overwrite", action="store_true",
                       help="replace an existing run in --out (or start an interrupted training over)")
    train.add_argument("--resume", action="store_true",
                       help="continue an interrupted training of --out from its last epoch checkpoint (same "
                            "settings and data: ends with the weights of an uninterrupted run); starts when none")
    train.add_argument("--nproc", type=int, default=None, metavar="N",
                       help="train data-parallel in N processes on this machine (torchrun; same global batch, "
                            "which N must divide); several machines: torchrun --nnodes ... -m distillad train ...")
    common(train)

    test = commands.add_parser("test", help="evaluate a run on a labelled test split",
                               description="Image AUROC, pixel AUROC, AUPRO@0.3 and F1-max on the test images.")
    test.add_argument("--run", required=True, type=Path)
    test.add_argument("--data", required=True, type=Path, help="category folder in the MVTec layout")
    test.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    test.add_argument("--report", type=Path, default=None, metavar="DIR",
                      help="also write a report to read: DIR/index.html with the metrics, ROC, PRO and score plots "
                           "and the worst false alarms and missed defects (needs matplotlib; DIR must be new, "
                           "empty or an earlier report)")
    test.add_argument("--batch-size", type=int, default=16)
    test.add_argument("--allow-missing-masks", action="store_true",
                      help="keep defective test images without a ground-truth mask (image-level metrics only)")
    test.add_argument("--option", type=_parse_option, action="append", default=[], metavar="KEY=VALUE",
                      help="evaluate with another map option (level_fusion, student_fusion, sigma, map_norm, "
                           "position_norm, score_topk) without retraining; its threshold is then fitted again on "
                           "the run's defect-free validation images")
    test.add_argument("--runtime", choices=("auto", "torch", "onnxruntime", "openvino"), default="torch",
                      help="what runs the scorer: torch (default), or its ONNX export (checked against torch) on "
                           "onnxruntime or OpenVINO; auto: the fastest installed one (OpenVINO, then onnxruntime)")
    common(test)

    predict = commands.add_parser("predict", help="score images with a trained run",
                                  description="Writes OUT/predictions.csv, OUT/heatmaps/*.png and OUT/masks/*.png.")
    predict.add_argument("--run", required=True, type=Path)
    predict.add_argument("inputs", nargs="+", metavar="INPUT",
                         help="image files, folders (searched recursively), @LIST files (one path per line, '#' "
                              "comments, relative to the list's folder) or quoted glob patterns ('imgs/**/*.png')")
    predict.add_argument("--out", required=True, type=Path)
    predict.add_argument("--batch-size", type=int, default=8)
    predict.add_argument("--no-images", action="store_true", help="only the CSV, no heatmaps or masks")
    predict.add_argument("--overwrite", action="store_true", help="replace an existing predictions.csv in --out")
    predict.add_argument("--runtime", choices=("auto", "torch", "onnxruntime", "openvino"), default="auto",
                         help="what runs the scorer (default auto: the fastest installed runtime, OpenVINO then "
                              "onnxruntime, that agrees with torch on the run's validation images, else torch; the graph is exported once and "
                              "cached). Same labels on every runtime")
    predict.add_argument("--engine", choices=("local", "ray"), default="local",
                         help="local (default): this process; ray: a Ray Data pipeline whose actors each load the "
                              "model once, same outputs plus OUT/shards/part-*.csv (needs distillad[ray]). With "
                              "ray, --out, the inputs must be visible to every node under the same path")
    predict.add_argument("--address", default=None,
                         help="--engine ray: join the Ray cluster at HOST:PORT, ray://HOST:PORT or auto "
                              "(default: start a local Ray)")
    predict.add_argument("--ray-cpus", type=int, default=None,
                         help="--engine ray: CPUs of the local Ray (default: all of this machine's)")
    predict.add_argument("--workers", type=int, default=None,
                         help="--engine ray: scoring actors (default: the Ray CPUs / --worker-threads)")
    predict.add_argument("--worker-threads", type=int, default=1,
                         help="--engine ray: threads (and Ray CPUs) per actor (default 1). torch's sums depend on "
                              "its thread count: scores match --engine local to the last digit at equal --threads")
    common(predict)

    demo = commands.add_parser("demo", help="generate a synthetic inspection set, train DSKD, test and predict",
                               description="Runs the whole job on built-in synthetic data; no download needed.")
    demo.add_argument("--out", type=Path, default=Path("distillad_demo"))
    demo.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo's setting)")
    demo.add_argument("--overwrite", action="store_true")
    common(demo)

    speed = commands.add_parser(
        "speed", help="inference latency, throughput, memory, parameters and GFLOPs",
        description="Times scorer(images) - the path test and predict run, map fusion and blur included - in a fresh "
                    "process: latency per image at batch 1 (median after warm-up), throughput at batch 16, peak "
                    "resident memory (model + inference), parameters and GFLOPs per image (torch's count: 2 FLOPs "
                    "per multiply-add).")
    speed_source = speed.add_mutually_exclusive_group(required=True)
    speed_source.add_argument("--run", type=Path, help="a trained run folder")
    speed_source.add_argument("--method", choices=sorted(METHODS),
                              help="a fresh model (pretrained teacher when available offline, random students)")
    speed.add_argument("--backbone", choices=BACKBONE_NAMES, default=None, help="with --method (default efficientnet_lite0)")
    speed.add_argument("--weights", default=None, help="with --method: local teacher checkpoint (ResNet family)")
    speed.add_argument("--option", type=_parse_option, action="append", default=[], metavar="KEY=VALUE",
                       help="with --method: a method switch, e.g. --option students=encoder")
    speed.add_argument("--image-size", type=int, default=None, help="default: the run's, or 256 with --method")
    speed.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    speed.add_argument("--warmup", type=int, default=5, help="untimed calls before timing (default 5)")
    speed.add_argument("--repeats", type=int, default=30, help="timed single-image calls (default 30)")
    speed.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    speed.add_argument("--device", default=None, help="cpu (default) or cuda[:N]")
    speed.add_argument("--no-fold", action="store_true",
                       help="keep BatchNorm separate from the convolutions (predict folds them; this measures that)")
    speed.add_argument("--in-process", action="store_true",
                       help="measure in this process (peak memory then includes everything the process did)")
    speed.add_argument("--runtime", choices=("torch", "onnxruntime", "openvino"), default="torch",
                       help="time the scorer on torch (default) or its ONNX export on onnxruntime / OpenVINO "
                            "(--threads threads, no spinning)")

    bench = commands.add_parser(
        "benchmark", help="train and test variants x categories x seeds; write results.csv and results.md",
        description="Runs every (variant, category, seed) cell of a YAML spec (see benchmarks/*.yaml) or of the "
                    "flags, skipping finished cells, and rewrites OUT/results.csv and OUT/results.md after each. "
                    "Flags that narrow a spec (--variants, --categories, --seeds, --methods) narrow what runs, not "
                    "the results files: they list every finished cell of the spec and of the flags. Relative paths "
                    "are taken from the current folder. With --engine ray every cell is a Ray task "
                    "(a local Ray, or the cluster at --address); the output folder and the data must then be on a "
                    "filesystem every Ray node sees, under the same paths.")
    bench.add_argument("spec", nargs="?", type=Path, default=None, metavar="SPEC.yaml",
                       help="benchmark spec; the flags below replace its entries")
    bench.add_argument("--out", type=Path, default=None, help="output folder (spec: out)")
    bench.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=None,
                       help="one default variant per method (replaces the spec's variants)")
    bench.add_argument("--variants", nargs="+", default=None, metavar="NAME", help="run only these spec variants")
    bench.add_argument("--categories", nargs="+", type=Path, default=None, metavar="DIR",
                       help="MVTec-layout category folders (spec: categories)")
    bench.add_argument("--seeds", nargs="+", type=int, default=None, help="spec: seeds (default 0)")
    bench.add_argument("--backbone", choices=BACKBONE_NAMES, default=None, help="override every variant's teacher")
    bench.add_argument("--epochs", type=int, default=None, help="override every variant's training length")
    bench.add_argument("--image-size", type=int, default=None, help="override every variant's image size")
    bench.add_argument("--no-speed", action="store_true", help="skip the per-variant speed measurement")
    bench.add_argument("--dry-run", action="store_true", help="list the cells and which are finished; run nothing")
    bench.add_argument("--results-only", action="store_true",
                       help="rewrite results.csv and results.md from the finished cells; run nothing")
    bench.add_argument("--redo-changed", action="store_true",
                       help="retrain finished cells whose configuration differs from the spec's")
    bench.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="local: one cell after another in this process (default); ray: one Ray task per cell, "
                            "results written by this process only (needs pip install 'distillad[ray]')")
    bench.add_argument("--address", default=None, metavar="ADDR",
                       help="--engine ray: join the Ray cluster at HOST:PORT, ray://HOST:10001 or auto (default: "
                            "start a local Ray); data and output folder must be on a filesystem every node sees")
    bench.add_argument("--ray-cpus", type=int, default=None, metavar="N",
                       help="--engine ray without --address: CPUs of the local Ray (default: all cores)")
    bench.add_argument("--cell-threads", type=int, default=None, metavar="N",
                       help="--engine ray: torch threads of each cell and the Ray CPUs it reserves (default 1)")
    common(bench)
    anomalies = commands.add_parser(
        "anomalies", help="draw AAND's synthetic anomalies on some training images, as a PNG grid",
        description="Writes image | mask | anomalous triplets: in the mask tile the foreground is dark grey and the "
                    "synthetic anomaly white, so anomalies off the object are easy to spot.")
    anomalies.add_argument("--data", required=True, type=Path,
                           help="a category folder (its train/good images) or a folder of images")
    anomalies.add_argument("--out", required=True, type=Path, help="PNG file to write")
    anomalies.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    anomalies.add_argument("--seed", type=int, default=0)
    anomalies.add_argument("--image-size", type=int, default=256)
    anomalies.add_argument("--texture-dir", type=Path, default=None,
                           help="folder of texture images (default: built-in procedural textures)")
    anomalies.add_argument("--foreground", choices=("auto", "whole", "mask"), default="auto",
                           help="where anomalies may go: the object found per image (auto), the whole image, or "
                                "--foreground-mask")
    anomalies.add_argument("--foreground-mask", type=Path, default=None, help="mask image, white = object")
    anomalies.add_argument("--probability", type=float, default=1.0,
                           help="share of images given an anomaly (default 1: every triplet shows one; training "
                                "uses 0.8)")
    common(anomalies)

    export = commands.add_parser(
        "export", help="export a run to one ONNX (or OpenVINO) graph: images -> anomaly map and score",
        description="Writes the scorer predict uses (map options included) as one graph with a dynamic batch, "
                    "input (B,3,S,S) float in [0,1], outputs anomaly_map (B,S,S) and score (B); the contract "
                    "(input size, method, teacher, threshold, score normalisation, version) goes into the ONNX "
                    "metadata and a sidecar JSON (OUT.json). Checked against torch before it is written.")
    export.add_argument("--run", required=True, type=Path)
    export.add_argument("--out", required=True, type=Path, help="model file: .onnx, or .xml for --format openvino")
    export.add_argument("--format", choices=("onnx", "openvino"), default="onnx", dest="export_format")
    export.add_argument("--int8", action="store_true",
                        help="static int8 convolutions calibrated on --calibration-data; the threshold is refitted "
                             "on the quantized model and the accuracy change reported")
    export.add_argument("--calibration-data", type=Path, default=None, metavar="DIR",
                        help="defect-free images (a folder, or a category whose train/good is used; a category's "
                             "test split also reports the AUROC change)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    common(export)

    serve = commands.add_parser(
        "serve", help="serve a run or an exported model over HTTP (FastAPI + uvicorn, no torch in the server)",
        description="POST /predict (multipart images -> score, normalised score, label, optional heatmap and mask "
                    "PNGs), GET /health, GET /metadata, and an upload page at /. A --run is exported first (cached); "
                    "the server process itself never imports torch.")
    serve_source = serve.add_mutually_exclusive_group(required=True)
    serve_source.add_argument("--run", type=Path, help="a trained run folder (exported to ONNX, cached)")
    serve_source.add_argument("--model", type=Path, help="an exported model (.onnx, or .xml with --runtime openvino)")
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="worker processes (each loads the model)")
    serve.add_argument("--runtime", choices=("onnxruntime", "openvino"), default="onnxruntime")
    serve.add_argument("--threads", type=int, default=2, dest="runtime_threads",
                       help="inference threads per worker (default 2)")
    serve.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted request body (default 20 MB)")
    serve.add_argument("--max-pixels", type=int, default=50_000_000,
                       help="largest accepted image in pixels (default 50 million)")
    serve.set_defaults(threads=None)

    return parser


def cmd_train(args: argparse.Namespace) -> int:
    import distillad

    if args.nproc is not None:
        from distillad.scale import ddp

        ddp.check_nproc(args.nproc)
        if args.nproc > 1:   # relaunch this very command line in N processes under torchrun's engine
            argv = sys.argv[1:]
            if vars(build_parser().parse_args(argv)) != vars(args):
                raise ConfigError("--nproc launches from the command line only; from Python, run your script "
                                  "with torchrun")
            return ddp.launch_local(args.nproc, ddp.strip_nproc(argv), cpu=not (args.device or "").startswith("cuda"))
    settings: dict[str, Any] = {
        "backbone": args.backbone, "weights": args.weights, "epochs": args.epochs, "steps": args.steps,
        "image_size": args.image_size, "batch_size": args.batch_size, "seed": args.seed, "device": args.device,
        "val_fraction": args.val_fraction, "resize": args.resize,
    }
    if args.lr is not None:
        settings["optimizer"] = {"lr": args.lr}
    try:
        distillad.train(args.data, out=args.out, method=args.method, config=args.config, options=dict(args.option),
                        overwrite=args.overwrite, resume=args.resume, progress=not args.no_progress, **settings)
    except DistilladError:
        if os.environ.get("RANK", "0") != "0" and not os.environ.get("DISTILLAD_DEBUG"):
            return EXIT_USER_ERROR   # under torchrun every rank fails alike; process 0 says why, once
        raise
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    import distillad
    from distillad.engine.inference import format_metrics
    from distillad.io import atomic_write_json

    from distillad.engine.preflight import check_output_file

    report = None
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.json is not None:  # refuse before the evaluation, not after it
        check_output_file(args.json, "--json")
    if args.report is not None:
        from distillad import report

        report.require_matplotlib()
        report.check_report_dir(args.report)
    run = distillad.load(args.run, device=args.device or "cpu", map_options=dict(args.option), runtime=args.runtime,
                         threads=args.threads or 2, log=lambda text: print(text, file=sys.stderr))
    if args.allow_missing_masks:
        from distillad.data import load_category

        args.data = load_category(args.data, val_fraction=run.config.val_fraction, seed=run.config.seed,
                                  require_masks=False)
    maps = None
    if report is not None:  # the same evaluation, also keeping the maps for the report's pixel curves
        result, maps = report.evaluate_with_maps(run, args.data, batch_size=args.batch_size,
                                                 progress=not args.no_progress)
    else:
        result = run.evaluate(args.data, batch_size=args.batch_size, progress=not args.no_progress)
    print(format_metrics(result))
    if args.json:
        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
    if report is not None:
        index = report.write_report(run, result, args.report, data=args.data, maps=maps,
                                    batch_size=args.batch_size, progress=not args.no_progress)
        print(f"wrote {index}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import distillad

    if args.batch_size < 1:   # refuse before loading anything
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    from distillad.scale.ray_predict import RaySettings, check_engine_options   # imports no Ray

    settings = RaySettings(args.address, args.ray_cpus, args.workers, args.worker_threads)
    check_engine_options(args.engine, settings, args.device or "cpu")
    if args.engine == "ray":
        from distillad.scale.ray_session import import_ray

        settings.check()
        import_ray()   # without Ray: one line naming the extra, before the run is loaded
    engine_options = {"engine": args.engine, "address": args.address, "ray_cpus": args.ray_cpus,
                      "workers": args.workers, "worker_threads": args.worker_threads}
    run = distillad.load(args.run, device=args.device or "cpu", runtime=args.runtime,
                         threads=args.worker_threads if args.engine == "ray" else args.threads or 2,
                         log=lambda text: print(text, file=sys.stderr))
    predictions = run.predict_to_folder(args.inputs, args.out, batch_size=args.batch_size, overwrite=args.overwrite,
                                        save_images=not args.no_images, progress=not args.no_progress,
                                        **engine_options)
    defective = sum(p.label == "defective" for p in predictions)
    failed = [p for p in predictions if p.error]
    for p in failed:
        print(f"distillad predict: skipped {p.path}: {p.error}", file=sys.stderr)
    print(f"{len(predictions) - len(failed)} images scored, {defective} called defective"
          + (f", {len(failed)} unreadable (rows with label 'error')" if failed else "")
          + f"; wrote {args.out / 'predictions.csv'}"
          + ("" if args.no_images else f", {args.out / 'heatmaps'}, {args.out / 'masks'}"))
    return EXIT_SOME_FAILED if failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from distillad.demo import run_demo
    from distillad.engine.preflight import check_output_folder

    check_output_folder(args.out)
    if args.epochs is not None and args.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {args.epochs}")
    run_demo(args.out, epochs=args.epochs, device=args.device or "cpu", overwrite=args.overwrite,
             progress=not args.no_progress)
    return 0


def cmd_speed(args: argparse.Namespace) -> int:
    from distillad.io import atomic_write_json
    from distillad.benchmark import format_report, speed_report

    if args.run is not None and (args.backbone or args.weights or args.option):
        raise ConfigError("--backbone, --weights and --option describe a fresh model: use them with --method, not --run")
    if args.warmup < 0 or args.repeats < 1:
        raise ConfigError("--warmup must be >= 0 and --repeats >= 1")
    if args.json is not None:
        from distillad.engine.preflight import check_output_file

        check_output_file(args.json, "--json")
    result = speed_report(run=args.run, method=args.method, backbone=args.backbone, options=dict(args.option),
                          weights=args.weights, image_size=args.image_size, threads=args.threads,
                          warmup=args.warmup, repeats=args.repeats, device=args.device or "cpu",
                          isolate=not args.in_process, fold=not args.no_fold, runtime=args.runtime)
    print(format_report(result))
    if args.json:
        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from distillad.benchmark import build_spec, describe_plan, load_spec, plan_cells, run_benchmark, write_results

    ray_only = [flag for flag, value in (("--address", args.address), ("--ray-cpus", args.ray_cpus),
                                         ("--cell-threads", args.cell_threads)) if value is not None]
    if args.engine == "local" and ray_only:
        raise ConfigError(f"{', '.join(ray_only)} only apply to --engine ray (the local engine runs in this process)")
    if args.address and args.ray_cpus is not None:
        raise ConfigError("--ray-cpus sizes a local Ray; the cluster at --address has its own CPUs")
    flags: dict[str, Any] = {"out": args.out, "methods": args.methods, "categories": args.categories,
                             "seeds": args.seeds, "variants": args.variants, "speed": False if args.no_speed else None}
    from distillad.engine.preflight import check_output_folder

    spec = load_spec(args.spec, **flags) if args.spec else build_spec(None, **flags)
    check_output_folder(spec.out)
    overrides = {"backbone": args.backbone, "epochs": args.epochs, "image_size": args.image_size,
                 "device": args.device}
    if args.dry_run:
        print(describe_plan(spec, plan_cells(spec, overrides)))
        return 0
    if args.results_only:
        spec.out.mkdir(parents=True, exist_ok=True)
        csv_path, md_path = write_results(spec, plan_cells(spec, overrides), overrides)
        print(f"wrote {csv_path} and {md_path}")
        return 0
    if args.engine == "ray":
        from distillad.scale.ray_benchmark import DEFAULT_CELL_THREADS, run_benchmark_on_ray

        run_benchmark_on_ray(spec, overrides=overrides, redo_changed=args.redo_changed, address=args.address,
                             num_cpus=args.ray_cpus,
                             cell_threads=DEFAULT_CELL_THREADS if args.cell_threads is None else args.cell_threads,
                             log=lambda text: print(text, flush=True))
        return 0
    run_benchmark(spec, overrides=overrides, progress=not args.no_progress, redo_changed=args.redo_changed,
                  log=lambda text: print(text, flush=True))
    return 0


def cmd_anomalies(args: argparse.Namespace) -> int:
    from distillad.data.anomalies import save_anomaly_grid

    from distillad.engine.preflight import check_output_file

    if args.n < 1 or args.image_size < 8:
        raise ConfigError("--n must be >= 1 and --image-size >= 8")
    if not 0.0 <= args.probability <= 1.0:
        raise ConfigError(f"--probability must be in [0, 1], got {args.probability}")
    if args.out.suffix.lower() != ".png":
        raise ConfigError(f"--out {args.out} must be a .png file")
    check_output_file(args.out, "--out")
    foreground = "mask" if args.foreground_mask is not None and args.foreground == "auto" else args.foreground
    out = save_anomaly_grid(args.data, args.out, n=args.n, seed=args.seed, image_size=args.image_size,
                            texture_dir=args.texture_dir, foreground=foreground,
                            foreground_mask=args.foreground_mask, probability=args.probability)
    print(f"wrote {out} (image | mask | anomalous; foreground dark grey, anomaly white)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from distillad.deploy.export import export_run

    export_run(args.run, args.out, fmt=args.export_format, int8=args.int8, calibration_data=args.calibration_data,
               overwrite=args.overwrite, threads=args.threads or 2)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Check the arguments, export a --run (with torch, cached), then replace this process by the torch-free
    server (`python -m distillad.deploy.serve`), so torch's memory and threads are gone while serving."""
    if args.workers < 1 or args.runtime_threads < 1 or args.max_pixels < 1 or args.max_upload_mb <= 0:
        raise ConfigError("--workers, --threads and --max-pixels must be >= 1 and --max-upload-mb > 0")
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    from distillad.deploy.runtimes import require_runtime

    require_runtime(args.runtime)
    for package in ("fastapi", "uvicorn", "multipart"):
        import importlib.util

        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"serve needs {package}: pip install 'distillad[serve]'")
    model = args.model
    if args.run is not None:
        from distillad.deploy.runtime_switch import cached_onnx
        from distillad.engine.checkpoint import load_run

        model = cached_onnx(load_run(args.run))
        print(f"serving {args.run} from its export {model}", flush=True)
    elif not model.is_file():
        raise ConfigError(f"--model {model} does not exist (write one with `distillad export`)")
    command = [sys.executable, "-m", "distillad.deploy.serve", "--model", str(model), "--runtime", args.runtime,
               "--host", args.host, "--port", str(args.port), "--workers", str(args.workers),
               "--threads", str(args.runtime_threads), "--max-bytes", str(int(args.max_upload_mb * 2**20)),
               "--max-pixels", str(args.max_pixels)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)
    return 0   # not reached: execv replaces the process


COMMANDS = {"train": cmd_train, "test": cmd_test, "predict": cmd_predict, "demo": cmd_demo, "speed": cmd_speed,
            "benchmark": cmd_benchmark, "anomalies": cmd_anomalies, "export": cmd_export, "serve": cmd_serve}


def one_line(error: BaseException) -> str:
    """The error's message on one line (a message quoting a file or a library may span several)."""
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
    warnings.formatwarning = lambda message, *_, **__: f"distillad {args.command}: warning: {message}\n"
    try:
        return COMMANDS[args.command](args)
    except (DistilladError, OSError) as error:
        if os.environ.get("DISTILLAD_DEBUG"):
            raise
        print(f"distillad {args.command}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
