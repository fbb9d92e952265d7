"""Config merging, run folders (atomic, weights_only, no overwrite) and a tiny end-to-end train/test/predict."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distillad.data import discover_mvtec, make_synthetic_dataset
from distillad.engine import evaluate_split, load_run, predict_paths, resolve_config, train_run
from distillad.engine.checkpoint import META_FILE, MODEL_FILE
from distillad.engine.config import config_from_dict
from distillad.errors import RunError
from distillad.io import atomic_write_json
from distillad.methods import STFPM


def test_config_precedence_defaults_file_flags():
    config = resolve_config("stfpm", {"epochs": 7, "optimizer": {"lr": 0.1}, "options": {"sigma": 2}},
                            {"epochs": 3, "seed": None})
    assert config.epochs == 3                       # flag beats file
    assert config.optimizer.lr == 0.1               # file beats recipe
    assert config.optimizer.name == "sgd"           # recipe default kept
    assert config.batch_size == STFPM.recipe["batch_size"] == 32
    assert config.options == {"sigma": 2}
    assert config_from_dict(config.to_dict()) == config


def test_default_length_is_a_step_budget_with_an_optional_epoch_floor():
    config = resolve_config("dskd")
    assert config.epochs is None and config.steps == 360 and config.min_epochs == 1
    assert config.epochs_for(12) == 30                    # bottle: 188 images, batch 16
    assert config.epochs_for(43) == 8                     # Magnetic Tile: 686 images
    assert config.epochs_for(10_000) == 1
    floored = resolve_config("dskd", overrides={"min_epochs": 30})
    assert floored.epochs_for(43) == 30 and floored.epochs_for(12) == 30 and floored.epochs_for(3) == 120
    assert resolve_config("dskd", overrides={"epochs": 5, "min_epochs": 30}).epochs_for(43) == 5   # explicit wins


@pytest.mark.parametrize("values,match", [
    ({"epoch": 3}, "unknown setting.*'epoch'"),
    ({"optimizer": {"lr_rate": 1}}, "optimizer: unknown setting.*'lr_rate'"),
    ({"epochs": "ten"}, "epochs must be an integer"),
    ({"options": {"sigma": "wide"}}, "sigma must be a number"),
    ({"options": {"levels": "2,3"}}, "levels must be a list"),
    ({"image_size": 100}, "multiple of 32"),
    ({"image_size": 288, "options": {"levels": [1, 2, 3, 4]}}, "multiple of 64"),
    ({"threshold_rule": "median"}, "threshold_rule"),
    ({"false_alarm_rate": 0.5}, "false_alarm_rate"),
    ({"min_epochs": 0}, "min_epochs must be a positive integer"),
    ({"backbone": "vgg16"}, "unknown backbone"),
    ({"options": {"students": "three"}}, "students"),
    ({"device": "tpu"}, "device"),
    ({"resize": "crop"}, "resize must be one of stretch, letterbox"),
])
def test_config_errors_name_the_setting(values, match):
    with pytest.raises(ValueError, match=match):
        resolve_config("dskd", values)


def test_atomic_json_leaves_no_temporary_files(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_json(tmp_path / "a.json", {"x": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


@pytest.fixture(scope="module")
def tiny_category(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_synthetic_dataset(root, seed=1, n_train=12, n_test_good=4, n_test_defect=4, image_size=64)


@pytest.fixture(scope="module")
def tiny_run(tiny_category, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "dskd"
    config = resolve_config("dskd", overrides={"image_size": 64, "epochs": 1, "batch_size": 4})
    data = discover_mvtec(tiny_category, val_fraction=0.25, seed=0)
    result = train_run(config, data, run_dir, progress=False, log=lambda _: None)
    return run_dir, result, data


def test_run_folder_round_trip(tiny_run):
    run_dir, result, data = tiny_run
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([MODEL_FILE, META_FILE])
    meta = json.loads((run_dir / META_FILE).read_text())
    assert meta["method"] == "dskd" and meta["teacher"]["backbone"] == "efficientnet_lite0"
    assert meta["calibration"]["n_images"] == len(data.val) == 3
    assert set(meta["versions"]) >= {"distillad", "torch"}
    # a plain state_dict of tensors, loadable with weights_only=True
    state = torch.load(run_dir / MODEL_FILE, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    run = load_run(run_dir)
    images = torch.rand(2, 3, 64, 64)
    result.model.eval()
    with torch.no_grad():
        from distillad.engine.calibrate import apply_map_statistics
        from distillad.scoring import AnomalyScorer

        scorer = AnomalyScorer(result.model)
        apply_map_statistics(scorer, meta["map_statistics"])    # DSKD's default position_norm=score reference
        assert scorer.position_reference.abs().sum() > 0
        expected_maps, expected_scores = scorer(images)
        maps, scores = run.scorer(images)
        assert torch.allclose(maps, expected_maps, atol=1e-6) and torch.allclose(scores, expected_scores, atol=1e-6)
    assert run.calibration == result.calibration


def test_every_epoch_records_the_held_out_loss_without_drawing_random_numbers(tiny_run):
    """The defect-free validation loss of each epoch is in the history (the label-free convergence curve), the last
    one is the run's validation loss, and measuring it leaves torch's global generator where it was: training's
    next random numbers, hence resume and DDP, do not depend on it (a DataLoader would draw a seed)."""
    from distillad.data.dataset import ImageDataset
    from distillad.engine.train import mean_loss

    run_dir, result, data = tiny_run
    training = json.loads((run_dir / META_FILE).read_text())["training"]
    assert [entry["epoch"] for entry in training["history"]] == [1]
    assert training["history"][-1]["val_loss"] == pytest.approx(training["val_loss"], rel=1e-4)
    assert training["val_loss"] > 0
    val_set = ImageDataset(data.val, 64)
    before = torch.get_rng_state()
    loss = mean_loss(result.model, val_set, 2, torch.device("cpu"))
    assert torch.equal(before, torch.get_rng_state())
    assert loss == pytest.approx(training["val_loss"], rel=1e-4)     # batch size does not change the mean


def test_map_options_change_at_test_time_and_recalibrate(tiny_run, tmp_path):
    run_dir, result, data = tiny_run
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        saved = load_run(run_dir)
        same = load_run(run_dir, map_options={"student_fusion": "mean", "sigma": 4.0})
        assert same.calibration == saved.calibration                  # nothing changed: the threshold still holds
        maximum = load_run(run_dir, map_options={"student_fusion": "max", "sigma": 0, "position_norm": "none"})
        assert maximum.config.options["student_fusion"] == "max"
        # by hand: the unblurred per-student maps, their pixel-wise maximum
        from distillad.scoring.maps import fuse, level_maps, upsample

        per_student = [fuse([upsample(m, (64, 64)) for m in maps], "sum")
                       for maps in level_maps(saved.model.feature_pairs(images))]
        assert len(per_student) == 2
        expected = torch.maximum(per_student[0], per_student[1])
        assert torch.allclose(maximum.scorer(images)[0], expected, atol=1e-6)
        # the new map rule gets its own threshold, fitted on the run's validation images (never on test images)
        from distillad.data import ImageDataset
        from distillad.engine.inference import score_dataset

        _, val_scores = score_dataset(maximum.scorer, ImageDataset(data.val, 64), keep_maps=False)
        assert maximum.calibration == saved.config.threshold().fit(val_scores)
        assert maximum.calibration != saved.calibration
    # without the validation images there is nothing to fit a threshold on
    moved = tmp_path / "moved"
    moved.mkdir()
    meta = json.loads((run_dir / META_FILE).read_text())
    meta["data"]["val_files"] = [str(tmp_path / "gone.png")]
    (moved / META_FILE).write_text(json.dumps(meta))
    (moved / MODEL_FILE).write_bytes((run_dir / MODEL_FILE).read_bytes())
    assert load_run(moved, map_options={"sigma": 0, "position_norm": "none"}).calibration is None
    with pytest.raises(RunError, match="validation images"):     # the position reference must be refitted too
        load_run(moved, map_options={"sigma": 0})
    with pytest.raises(RunError, match="need the run.s defect-free validation images"):
        load_run(moved, map_options={"map_norm": "quantile"})
    with pytest.raises(ValueError, match="new training run"):
        load_run(run_dir, map_options={"levels": [3]})
    with pytest.raises(ValueError, match="student_fusion"):
        load_run(run_dir, map_options={"student_fusion": "median"})


def test_quantile_map_normalisation_by_hand(tiny_run):
    """map_norm=quantile: each student's and level's map minus its validation 0.9 quantile, over the spread to
    its 0.995 quantile, then fused; score_topk averages the top share of the map instead of taking its max."""
    import numpy as np

    from distillad.data import ImageDataset
    from distillad.scoring.maps import fuse

    run_dir, _, data = tiny_run
    run = load_run(run_dir, map_options={"map_norm": "quantile", "sigma": 0, "score_topk": 0.01,
                                         "position_norm": "none"})
    val = torch.stack([ImageDataset(data.val, 64)[i]["image"] for i in range(len(data.val))])
    with torch.no_grad():
        raw_val = run.scorer.raw_maps(val)
        images = torch.rand(2, 3, 64, 64)
        raw = run.scorer.raw_maps(images)
        maps, scores = run.scorer(images)
    per_student = []
    for s, levels in enumerate(raw):
        normalised = []
        for l, m in enumerate(levels):
            values = raw_val[s][l].flatten().double().numpy()
            low, high = np.quantile(values, 0.9), np.quantile(values, 0.995)
            normalised.append((m - low) / (high - low))
        per_student.append(fuse(normalised, "sum"))
    expected = fuse(per_student, "mean")
    assert torch.allclose(maps, expected.float(), atol=1e-4)
    k = round(0.01 * 64 * 64)
    assert torch.allclose(scores, expected.flatten(1).float().topk(k, dim=1).values.mean(1), atol=1e-4)
    meta = json.loads((run_dir / META_FILE).read_text())
    # trained with DSKD's defaults: no quantiles, the position reference of position_norm=score
    assert set(meta["map_statistics"]) == {"position_reference"}
    assert len(meta["calibration_scores"]) == len(data.val)


def test_existing_run_is_never_overwritten(tiny_run, tiny_category):
    run_dir, _, data = tiny_run
    before = (run_dir / MODEL_FILE).read_bytes()
    config = resolve_config("dskd", overrides={"image_size": 64, "epochs": 1})
    with pytest.raises(RunError, match="already holds a trained run"):
        train_run(config, data, run_dir, progress=False, log=lambda _: None)
    assert (run_dir / MODEL_FILE).read_bytes() == before


def test_a_run_in_training_is_not_trained_by_a_second_process(tiny_category, tmp_path):
    """While one training holds a run folder, a second training of it (a second shell, a second benchmark process
    on the same cell) fails before it touches the work folder, even with --overwrite, and names the holder's pid.
    The lock goes with the first training: a process killed while holding it leaves nothing that blocks the
    next one, and a finished training leaves no lock file."""
    import os
    import subprocess
    import sys

    from distillad.engine.resume import lock_file, training_lock, work_dir

    run = tmp_path / "run"
    work_dir(run).mkdir(parents=True)
    (work_dir(run) / "checkpoint.pt").write_bytes(b"the first training's")
    config = resolve_config("dskd", overrides={"image_size": 64, "epochs": 1, "batch_size": 4})
    data = discover_mvtec(tiny_category, val_fraction=0.25, seed=0)
    with training_lock(run):
        with pytest.raises(RunError, match=rf"{run} is being trained by another process now \(pid {os.getpid()}\)"):
            train_run(config, data, run, progress=False, overwrite=True, log=lambda _: None)
        assert (work_dir(run) / "checkpoint.pt").read_bytes() == b"the first training's"
    assert not lock_file(run).exists()

    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from pathlib import Path; "
         "from distillad.engine.resume import training_lock\n"
         f"with training_lock(Path({str(run)!r})):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunError, match=rf"pid {holder.pid}\)"):
            train_run(config, data, run, progress=False, overwrite=True, log=lambda _: None)
    finally:
        holder.kill()
        holder.wait()
    assert lock_file(run).exists()          # killed: its file stays, its lock does not
    train_run(config, data, run, progress=False, overwrite=True, log=lambda _: None)
    assert (run / MODEL_FILE).is_file() and not work_dir(run).exists() and not lock_file(run).exists()


def test_corrupt_or_incomplete_runs_fail_clearly(tmp_path, tiny_run):
    with pytest.raises(RunError, match="does not exist"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    with pytest.raises(RunError, match="meta.json is missing"):
        load_run(tmp_path / "half")
    run_dir, _, _ = tiny_run
    broken = tmp_path / "broken"
    broken.mkdir()
    meta = json.loads((run_dir / META_FILE).read_text())
    (broken / META_FILE).write_text(json.dumps(meta))
    (broken / MODEL_FILE).write_bytes(b"not a checkpoint")
    # meta.json records model.pt's hash: another model.pt (a crash between the two writes of --overwrite, a
    # copied file) is refused instead of being paired silently with the wrong calibration
    with pytest.raises(RunError, match="sha256 differs"):
        load_run(broken)
    del meta["model_sha256"]
    (broken / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(RunError, match="model.pt is not a readable checkpoint"):
        load_run(broken)
    (broken / META_FILE).write_text("[1, 2]")
    with pytest.raises(RunError, match="not a JSON object"):
        load_run(broken)


def test_evaluate_and_predict(tiny_run, tiny_category, tmp_path):
    run_dir, _, data = tiny_run
    run = load_run(run_dir)
    result = evaluate_split(run.scorer, data, 64, calibration=run.calibration)
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1max", "pixel_f1max"):
        assert 0.0 <= result[key] <= 1.0
    assert result["n_images"] == 8 and result["n_defective"] == 4
    out = tmp_path / "pred"
    predictions = predict_paths(run, [tiny_category / "test"], out, progress=False)
    assert len(predictions) == 8
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["path"] for r in rows] == [str(p.path) for p in predictions]
    for row, p in zip(rows, predictions):
        assert float(row["score"]) == pytest.approx(p.score, rel=1e-5)
        assert row["label"] == ("defective" if p.score > run.calibration.threshold else "normal")
    heatmaps = sorted((out / "heatmaps").iterdir())
    masks = sorted((out / "masks").iterdir())
    assert len(heatmaps) == len(masks) == 8
    assert all("__" in p.name for p in heatmaps)  # defect type folded into the name: no collisions
    with pytest.raises(RunError, match="already exists"):
        predict_paths(run, [tiny_category / "test"], out, progress=False)


def test_multi_stage_training_resumes_after_the_last_finished_stage(tiny_category, tmp_path, monkeypatch):
    """An interrupted two-stage run resumes (only when asked) at stage 2 with stage 1's weights, and cleans up."""
    from distillad.engine.resume import CHECKPOINT_FILE, work_dir
    from distillad.methods import DSKD
    from distillad.methods.base import TrainingStage

    calls = {"first": 0, "second": 0}
    started_from: dict[str, torch.Tensor] = {}
    fail = {"second": True}

    def stages(self):
        def first(images, teacher):
            calls["first"] += 1
            return self.training_loss(images, teacher)

        def second(images, teacher):
            calls["second"] += 1
            if fail["second"]:
                raise KeyboardInterrupt
            if not started_from:   # the weights stage 2 begins with
                started_from.update({k: v.detach().clone() for k, v in self.state_dict().items()
                                     if not k.startswith("teacher.")})
            return self.training_loss(images, teacher)

        return [TrainingStage("first", self.trainable_parameters, first),
                TrainingStage("second", self.trainable_parameters, second)]

    monkeypatch.setattr(DSKD, "training_stages", stages)
    config = resolve_config("dskd", overrides={"image_size": 64, "epochs": 1, "batch_size": 4})
    data = discover_mvtec(tiny_category, val_fraction=0.25, seed=0)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_run(config, data, run_dir, progress=False, log=lambda _: None)
    first_calls = calls["first"]
    checkpoint = work_dir(run_dir) / CHECKPOINT_FILE
    assert first_calls > 0 and checkpoint.is_file() and not run_dir.exists()
    saved = torch.load(checkpoint, weights_only=True)["model"]
    fail["second"] = False
    with pytest.raises(RunError, match="pass --resume"):      # an interrupted training is never discarded silently
        train_run(config, data, run_dir, progress=False, log=lambda _: None)
    messages = []
    train_run(config, data, run_dir, progress=False, resume=True, log=messages.append)
    assert calls["first"] == first_calls            # not retrained
    assert any("resuming" in m for m in messages)
    assert not work_dir(run_dir).exists() and (run_dir / META_FILE).is_file()
    meta = json.loads((run_dir / META_FILE).read_text())
    assert [s["name"] for s in meta["training"]["stages"]] == ["first", "second"]
    # stage 2 started from stage 1's trained students, not from a fresh model (the frozen teacher proves nothing)
    assert started_from and all(started_from[k].equal(saved[k]) for k in started_from)
    fresh = DSKD("efficientnet_lite0", DSKD.options_class(), pretrained=False).state_dict()
    assert any(not fresh[k].equal(saved[k]) for k in started_from if fresh[k].is_floating_point())


def test_predict_never_loses_a_batch_and_never_reads_its_own_outputs(tiny_run, tiny_category, tmp_path, capsys):
    """A corrupt file is a row with its reason, the rest are scored; outputs inside the inputs are not inputs;
    --overwrite replaces the previous outputs as a whole."""
    import shutil

    from distillad.cli import main

    run_dir, _, _ = tiny_run
    images = tmp_path / "images"
    shutil.copytree(tiny_category / "test" / "good", images)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = images / "preds"                                   # the output folder inside the input folder
    for _ in range(3):
        code = main(["predict", "--run", str(run_dir), str(images), "--out", str(out), "--overwrite",
                     "--no-progress"])
        assert code == 1                                     # some files failed, the others were written
        rows = list(csv.DictReader((out / "predictions.csv").open()))
        assert len(rows) == 5                                # 4 good images + the broken one, every time
        broken = [r for r in rows if r["label"] == "error"]
        assert len(broken) == 1 and broken[0]["path"].endswith("broken.png") and "broken.png" in broken[0]["error"]
        assert sorted(p.stem for p in (out / "heatmaps").iterdir()) == sorted(
            Path(r["path"]).stem for r in rows if r["label"] != "error")
        assert not [p for p in out.iterdir() if p.name.startswith(".predict-")]
    err = capsys.readouterr().err
    assert "skipped" in err and "Traceback" not in err
    assert main(["predict", "--run", str(run_dir), str(images), "--out", str(tmp_path / "p"), "--batch-size",
                 "-1"]) == 2


def test_position_norm_subtracts_the_validation_maximum_and_calibrates_leave_one_out(tiny_run):
    from distillad.data import ImageDataset
    from distillad.scoring.maps import POSITION_GRID, upsample

    run_dir, _, data = tiny_run
    run = load_run(run_dir, map_options={"position_norm": "max"})
    val = torch.stack([ImageDataset(data.val, 64)[i]["image"] for i in range(len(data.val))])
    with torch.no_grad():
        normal = run.scorer.normal_map(val)
        pooled = torch.nn.functional.adaptive_avg_pool2d(normal[:, None], POSITION_GRID)[:, 0]
        assert torch.allclose(run.scorer.position_reference, pooled.amax(0))
        images = torch.rand(2, 3, 64, 64)
        maps, scores = run.scorer(images)
        expected = run.scorer.normal_map(images) - upsample(pooled.amax(0)[None], (64, 64))
        assert torch.allclose(maps, expected, atol=1e-6) and torch.allclose(scores, expected.flatten(1).amax(1))
        # each validation image against the maximum of the others
        loo = [(normal[i] - upsample(torch.cat([pooled[:i], pooled[i + 1:]]).amax(0)[None], (64, 64))[0]).max()
               for i in range(len(normal))]
    assert run.calibration == run.config.threshold().fit(torch.stack(loo).numpy())


def test_position_norm_score_keeps_the_map_and_scores_its_excess(tiny_run):
    from distillad.engine.predict import predict_batch

    run_dir, _, _ = tiny_run
    excess_run = load_run(run_dir, map_options={"position_norm": "max"})
    score_run = load_run(run_dir, map_options={"position_norm": "score"})
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        excess_maps, excess_scores = excess_run.scorer(images)
        maps, scores = score_run.scorer(images)
        assert torch.allclose(maps, score_run.scorer.normal_map(images))          # the map is left as it is
        assert torch.allclose(scores, excess_scores)                              # the score is the excess's max
        assert torch.allclose(score_run.scorer.decision_map(maps), excess_maps, atol=1e-6)
    assert score_run.calibration == excess_run.calibration                       # same leave-one-out scores
    arrays = [(image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for image in images]
    for prediction in predict_batch(score_run, arrays, [None] * 3):
        assert prediction.mask.any() == prediction.is_defective


def test_denoising_run_resumes_to_the_weights_of_an_uninterrupted_run(tiny_category, tmp_path, monkeypatch):
    """DSKD with `denoise` draws synthetic anomalies from its own generator: the epoch checkpoint saves that stream,
    so a run interrupted in epoch 2 and resumed ends with exactly the weights of a run never interrupted."""
    from distillad.methods import DSKD

    config = resolve_config("dskd", overrides={"image_size": 64, "epochs": 2, "batch_size": 4,
                                               "options": {"denoise": 1.0, "foreground": "whole"}})
    data = discover_mvtec(tiny_category, val_fraction=0.25, seed=0)
    train_run(config, data, tmp_path / "whole", progress=False, log=lambda _: None)

    original = DSKD.training_loss
    calls = {"n": 0}

    def interrupted(self, images, teacher=None):
        if self.training:
            calls["n"] += 1
            if calls["n"] == 4:          # 9 training images, batch 4: the first step of epoch 2
                raise KeyboardInterrupt
        return original(self, images, teacher)

    monkeypatch.setattr(DSKD, "training_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_run(config, data, tmp_path / "killed", progress=False, log=lambda _: None)
    train_run(config, data, tmp_path / "killed", progress=False, resume=True, log=lambda _: None)
    whole = torch.load(tmp_path / "whole" / MODEL_FILE, weights_only=True)
    resumed = torch.load(tmp_path / "killed" / MODEL_FILE, weights_only=True)
    assert calls["n"] > 4 and whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
