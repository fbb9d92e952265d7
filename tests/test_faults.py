"""Bad inputs and faults, as a new user meets them (issue 9): real files, real processes, no mocks.

`PROBLEMS` has one row per problem of the issue, each of which failed before it was fixed. `BAD_INPUTS` lists a bad
value or path for every argument of every command: each must end in one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import distillad
from distillad.cli import main
from distillad.data import load_category, make_synthetic_dataset
from distillad.engine.resume import CHECKPOINT_FILE, work_dir

TINY = ["--image-size", "64", "--batch-size", "4", "--threads", "1", "--no-progress"]


@dataclass
class Context:
    category: Path            # a tiny MVTec-layout category (12 training images of 64 px)
    run: distillad.Run        # a finished run trained on it
    tmp: Path                 # a fresh folder per test


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    category = make_synthetic_dataset(root / "data", seed=5, n_train=12, n_test_good=3, n_test_defect=3,
                                      image_size=64)
    with pytest.warns(UserWarning, match="mostly noise"):      # problem 7: 1 validation image
        run = distillad.train(category, out=root / "run", method="stfpm", image_size=64, epochs=1, batch_size=4,
                              progress=False, log=lambda _: None)
    return category, run


@pytest.fixture
def ctx(trained, tmp_path):
    return Context(*trained, tmp_path)


def run_cli(*argv) -> tuple[int, str]:
    """The CLI in a real process: exit code and stderr."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "distillad.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=300)
    return done.returncode, done.stderr


def images_with_a_broken_one(ctx: Context) -> Path:
    folder = ctx.tmp / "images"
    shutil.copytree(ctx.category / "test" / "good", folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as handle:
        return list(csv.DictReader(handle))


# -- one row per problem of the issue ---------------------------------------------------------------------------------


def predicting_into_the_inputs_never_scores_its_own_outputs(ctx: Context) -> None:
    folder = images_with_a_broken_one(ctx)
    counts = []
    for _ in range(3):
        ctx.run.predict_to_folder(folder, folder / "preds", overwrite=True)
        counts.append(len(rows(folder / "preds")))
    assert counts == [4, 4, 4]                       # was 6, 18, 42: its own heatmaps scored as inputs


def a_bad_validation_image_stops_training_before_it_starts(ctx: Context) -> None:
    category = ctx.tmp / "category"
    shutil.copytree(ctx.category, category)
    victim = load_category(category).val[0].path   # the split the training makes (seed 0, 10 %)
    victim.write_bytes(victim.read_bytes()[:100])   # truncated
    started = time.perf_counter()
    with pytest.raises(distillad.DataError, match=f"validation image .*{victim.name}.*nothing was trained"):
        distillad.train(category, out=ctx.tmp / "run", method="stfpm", image_size=64, epochs=50, batch_size=4,
                        progress=False, log=lambda _: None)
    assert time.perf_counter() - started < 30 and not (ctx.tmp / "run").exists()
    # an output location that cannot be created is found before training too
    (ctx.tmp / "a_file").write_text("")
    with pytest.raises(distillad.RunError, match="is a file, not a folder"):
        distillad.train(ctx.category, out=ctx.tmp / "a_file" / "run", method="stfpm", image_size=64, epochs=50,
                        progress=False, log=lambda _: None)


def a_killed_training_resumes_to_the_same_weights(ctx: Context) -> None:
    """kill -9 a real `distillad train` mid-run, `--resume` it: the weights equal those of an uninterrupted run."""
    settings = ["--method", "dskd", "--data", ctx.category, "--epochs", "8", "--val-fraction", "0.2", *TINY]
    code, err = run_cli("train", *settings, "--out", ctx.tmp / "whole")
    assert code == 0, err
    killed = ctx.tmp / "killed"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "distillad.cli", "train", *map(str, settings), "--out",
                                str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    checkpoint = work_dir(killed) / CHECKPOINT_FILE
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)                                  # into the next epoch
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and not (killed / "meta.json").exists()
    epoch = torch.load(checkpoint, weights_only=True)["progress"]["epoch"]
    assert 1 <= epoch < 8
    code, err = run_cli("train", *settings, "--out", killed)
    assert code == 2 and "--resume" in err          # an interrupted run is not thrown away silently
    code, err = run_cli("train", *settings, "--out", killed, "--resume")
    assert code == 0, err
    whole = torch.load(ctx.tmp / "whole" / "model.pt", weights_only=True)
    resumed = torch.load(killed / "model.pt", weights_only=True)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert json.loads((killed / "meta.json").read_text())["training"]["resumed"] is True
    assert not work_dir(killed).exists()


def one_unreadable_image_never_loses_the_batch(ctx: Context) -> None:
    folder = images_with_a_broken_one(ctx)
    out = ctx.tmp / "out"
    predictions = ctx.run.predict_to_folder(folder, out, batch_size=8)
    table = rows(out)
    assert len(table) == len(predictions) == 4       # 3 images and the broken file
    assert [r["label"] for r in table].count("error") == 1 and "broken.png" in table[-1]["error"]
    (folder / "broken.png").unlink()
    for extra in sorted(folder.glob("*.png"))[2:]:
        extra.unlink()
    ctx.run.predict_to_folder(folder, out, overwrite=True)      # --overwrite replaces the outputs as a whole
    assert len(rows(out)) == 2 and len(list((out / "heatmaps").iterdir())) == 2


def a_negative_batch_size_is_refused(ctx: Context) -> None:
    code, err = run_cli("predict", "--run", ctx.run.run_dir, ctx.category / "test", "--out", ctx.tmp / "p",
                        "--batch-size", "-1")
    assert code == 2 and "--batch-size must be >= 1" in err and not (ctx.tmp / "p").exists()


def a_run_folder_is_consistent_or_absent(ctx: Context) -> None:
    run_dir = ctx.tmp / "run"
    shutil.copytree(ctx.run.run_dir, run_dir)
    (run_dir / "notes.txt").write_text("mine")
    distillad.train(ctx.category, out=run_dir, method="stfpm", image_size=64, epochs=1, batch_size=4, seed=1,
                    overwrite=True, progress=False, log=lambda _: None)
    assert sorted(p.name for p in run_dir.iterdir()) == ["meta.json", "model.pt", "notes.txt"]
    assert not work_dir(run_dir).exists()
    assert distillad.load(run_dir).config.seed == 1
    # the state a crash between the writes of a non-atomic overwrite left: a new model beside the old meta.json
    shutil.copy(ctx.run.run_dir / "meta.json", run_dir / "meta.json")
    with pytest.raises(distillad.RunError, match="sha256 differs"):
        distillad.load(run_dir)


def a_huge_image_is_predicted_in_bounded_memory(ctx: Context) -> None:
    folder = ctx.tmp / "huge"
    folder.mkdir()
    ramp = np.linspace(0, 255, 8000, dtype=np.float32)
    picture = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 128 + 0 * ramp[None, :]), -1)
    Image.fromarray(picture.astype(np.uint8)).save(folder / "huge.jpg", quality=80)
    del picture
    # VmHWM, the peak resident memory of this process image (ru_maxrss would include the forking parent's)
    code = ("import re, sys, torch, distillad; torch.set_num_threads(1); "
            "distillad.load(sys.argv[1]).predict_to_folder(sys.argv[2], sys.argv[3]); "
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    done = subprocess.run([sys.executable, "-c", code, str(ctx.run.run_dir), str(folder), str(ctx.tmp / "out")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert done.returncode == 0, done.stderr
    peak_kib = int(done.stdout.split()[-1])
    assert peak_kib < 1.5 * 2**20                    # was 7.2 GB
    assert max(Image.open(ctx.tmp / "out" / "heatmaps" / "huge.png").size) <= 2048


def a_tiny_validation_set_is_flagged(ctx: Context) -> None:
    meta = ctx.run.meta
    assert meta["data"]["n_val"] == 1
    assert meta["warnings"] and "mostly noise" in meta["warnings"][0]


def bad_values_get_one_line(ctx: Context) -> None:
    run_dir = ctx.tmp / "run"
    shutil.copytree(ctx.run.run_dir, run_dir)
    meta = json.loads((run_dir / "meta.json").read_text())
    for broken in ({**meta, "config": [1, 2]}, {**meta, "config": {**meta["config"], "epochs": "two"}}, [1]):
        (run_dir / "meta.json").write_text(json.dumps(broken))
        code, err = run_cli("test", "--run", run_dir, "--data", ctx.category)
        assert code == 2 and "meta.json" in err and len(err.strip().splitlines()) == 1, err


def outputs_follow_the_umask(ctx: Context) -> None:
    previous = os.umask(0o027)
    try:
        ctx.run.predict_to_folder(ctx.category / "test" / "good", ctx.tmp / "out")
    finally:
        os.umask(previous)
    written = [ctx.tmp / "out" / "predictions.csv", *(ctx.tmp / "out" / "heatmaps").iterdir()]
    assert {p.stat().st_mode & 0o777 for p in written} == {0o640}      # was 0o600 whatever the umask


PROBLEMS: list[tuple[int, Callable[[Context], None]]] = [
    (1, predicting_into_the_inputs_never_scores_its_own_outputs),
    (2, a_bad_validation_image_stops_training_before_it_starts),
    (2, a_killed_training_resumes_to_the_same_weights),
    (3, one_unreadable_image_never_loses_the_batch),
    (4, a_negative_batch_size_is_refused),
    (5, a_run_folder_is_consistent_or_absent),
    (6, a_huge_image_is_predicted_in_bounded_memory),
    (7, a_tiny_validation_set_is_flagged),
    (8, bad_values_get_one_line),
    (9, outputs_follow_the_umask),
]


@pytest.mark.parametrize("problem,check", PROBLEMS, ids=[f"{n}-{check.__name__}" for n, check in PROBLEMS])
def test_problem(problem, check, ctx):
    check(ctx)


# -- a bad value or path for every argument of every command ---------------------------------------------------------

BAD_INPUTS = [
    # train
    ("train --method bogus --data {data} --out {tmp}/r", "invalid choice: 'bogus'"),
    ("train --data {tmp}/missing --out {tmp}/r", "does not exist"),
    ("train --data {data} --out {file}", "is not a folder"),
    ("train --data {data} --out {file}/r", "is a file, not a folder"),
    ("train --data {data} --out {run}", "already holds a trained run"),
    ("train --data {data} --out {run} --resume", "already holds a trained run"),
    ("train --data {data} --out {tmp}/r --backbone vgg", "invalid choice: 'vgg'"),
    ("train --data {data} --out {tmp}/r --backbone resnet18 --weights {tmp}/none.pth", "none.pth"),
    ("train --data {data} --out {tmp}/r --epochs 0", "epochs must be a positive integer"),
    ("train --data {data} --out {tmp}/r --epochs two", "invalid int value: 'two'"),
    ("train --data {data} --out {tmp}/r --steps 0", "steps must be a positive integer"),
    ("train --data {data} --out {tmp}/r --image-size 100", "multiple of 32"),
    ("train --data {data} --out {tmp}/r --batch-size 0", "batch_size must be a positive integer"),
    ("train --data {data} --out {tmp}/r --lr -1", "learning rate"),
    ("train --data {data} --out {tmp}/r --seed -3", "seed must be >= 0"),
    ("train --data {data} --out {tmp}/r --val-fraction 1.5", "val_fraction"),
    ("train --data {data} --out {tmp}/r --config {tmp}/none.yaml", "none.yaml"),
    ("train --data {data} --out {tmp}/r --config {listyaml}", "must hold a mapping"),
    ("train --data {data} --out {tmp}/r --option bogus=1", "unknown option(s) 'bogus'"),
    ("train --data {data} --out {tmp}/r --option sigma", "KEY=VALUE"),
    ("train --data {data} --out {tmp}/r --option sigma=wide", "sigma must be a number"),
    ("train --data {data} --out {tmp}/r --device tpu", "device"),
    ("train --data {data} --out {tmp}/r --threads 0", "--threads must be >= 1"),
    # test
    ("test --run {tmp}/norun --data {data}", "norun"),
    ("test --run {run} --data {tmp}/missing", "does not exist"),
    ("test --run {run} --data {nomask}", "--allow-missing-masks"),
    ("test --run {run} --data {data} --json {tmp}", "is a folder"),
    ("test --run {run} --data {data} --report {file}", "is a file"),
    ("test --run {run} --data {data} --batch-size 0", "--batch-size must be >= 1"),
    ("test --run {run} --data {data} --option levels=[3]", "new training run"),
    ("test --run {run} --data {data} --device tpu", "device"),
    # predict
    ("predict --run {tmp}/norun {data} --out {tmp}/p", "norun"),
    ("predict --run {run} {tmp}/missing.png --out {tmp}/p", "does not exist"),
    ("predict --run {run} {file} --out {tmp}/p", "is not an image"),
    ("predict --run {run} {data} --out {file}", "is not a folder"),
    ("predict --run {run} {data} --out {tmp}/p --batch-size 0", "--batch-size must be >= 1"),
    # demo
    ("demo --out {file}", "is not a folder"),
    ("demo --out {tmp}/d --epochs 0", "--epochs must be >= 1"),
    # speed
    ("speed --run {tmp}/norun", "norun"),
    ("speed --method bogus", "invalid choice"),
    ("speed --run {run} --backbone resnet18", "with --method"),
    ("speed --method stfpm --image-size 100", "multiple of 32"),
    ("speed --method stfpm --warmup -1", "--warmup"),
    ("speed --method stfpm --repeats 0", "--repeats"),
    ("speed --method stfpm --json {tmp}", "is a folder"),
    ("speed --method stfpm --threads 0", "--threads must be >= 1"),
    # benchmark
    ("benchmark {tmp}/none.yaml", "none.yaml"),
    ("benchmark --methods stfpm --categories {data} --out {file}", "is not a folder"),
    ("benchmark --methods bogus --categories {data}", "invalid choice"),
    ("benchmark --methods stfpm --categories {tmp}/missing --out {tmp}/b", "missing"),
    ("benchmark --methods stfpm --categories {data} --seeds x", "invalid int value"),
    ("benchmark --methods stfpm --categories {data} --epochs 0 --out {tmp}/b --dry-run", "epochs"),
    # anomalies
    ("anomalies --data {tmp}/missing --out {tmp}/g.png", "does not exist"),
    ("anomalies --data {data} --out {tmp}", "must be a .png file"),
    ("anomalies --data {data} --out {tmp}/g.png --n 0", "--n must be >= 1"),
    ("anomalies --data {data} --out {tmp}/g.png --texture-dir {tmp}/none", "none"),
    ("anomalies --data {data} --out {tmp}/g.png --foreground-mask {tmp}/none.png", "none.png"),
    ("anomalies --data {data} --out {tmp}/g.png --probability 2", "--probability"),
]


@pytest.mark.parametrize("argv,needle", BAD_INPUTS, ids=[a.split(" --")[0] + "|" + n for a, n in BAD_INPUTS])
def test_bad_input_is_one_line(argv, needle, trained, tmp_path, capsys):
    category, run = trained
    nomask = tmp_path / "nomask"
    shutil.copytree(category, nomask)
    next((nomask / "ground_truth").rglob("*.png")).unlink()
    (tmp_path / "a_file").write_text("")
    (tmp_path / "list.yaml").write_text("[1, 2]\n")
    words = [w.format(data=category, tmp=tmp_path, run=run.run_dir, file=tmp_path / "a_file", nomask=nomask,
                      listyaml=tmp_path / "list.yaml") for w in argv.split()]
    try:
        code = main(words)
    except SystemExit as exit_:          # argparse's errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip() and ": warning: " not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0] and lines[0].startswith("distillad"), lines[0]
