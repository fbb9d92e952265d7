"""Export and runtimes on real bottle images: the ONNX graph, OpenVINO and int8 against the torch scorer."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import BOTTLE, bottle_images

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = [pytest.mark.shared_data, pytest.mark.slow]

MAP_TOL, SCORE_TOL = 1e-4, 1e-5


def _inputs(image_size: int) -> np.ndarray:
    from distillad.data.images import decode_image
    from distillad.deploy.runtimes import image_to_input

    return np.stack([image_to_input(decode_image(p), image_size) for p in bottle_images()])


def _torch(run_dir: Path, inputs: np.ndarray, map_options: dict | None = None):
    from distillad.deploy.graph import torch_outputs
    from distillad.engine.checkpoint import load_run

    loaded = load_run(run_dir, map_options=map_options)
    return loaded, *torch_outputs(loaded.scorer, inputs)


def _cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distillad.cli", *map(str, args)], capture_output=True, text=True,
                          env={**__import__("os").environ, "OMP_WAIT_POLICY": "PASSIVE"})


def test_onnxruntime_matches_torch_on_real_images_and_carries_the_contract(bottle_run, bottle_onnx):
    import distillad
    from distillad.deploy.runtimes import DeployedModel

    loaded, maps, scores = _torch(bottle_run, _inputs(64))
    model = DeployedModel(bottle_onnx, runtime="onnxruntime", threads=1)
    out_maps, out_scores, _ = model.score(_inputs(64))
    assert np.abs(out_maps - maps).max() <= MAP_TOL
    assert np.abs(out_scores - scores).max() <= SCORE_TOL
    contract = model.contract
    assert contract["image_size"] == 64 and contract["method"] == "dskd" and contract["precision"] == "fp32"
    assert contract["input"]["value_range"] == [0.0, 1.0] and contract["input"]["shape"] == ["batch", 3, 64, 64]
    assert contract["threshold"] == pytest.approx(loaded.calibration.threshold)
    assert contract["teacher"]["backbone"] == "efficientnet_lite0"
    assert contract["distillad_version"] == distillad.__version__
    assert json.loads(Path(f"{bottle_onnx}.json").read_text())["threshold"] == contract["threshold"]
    # The deployed path (numpy decode, resize, numpy map resize) gives predict's labels, scores and masks
    from distillad.data.images import decode_image

    torch_predictions = distillad.load(bottle_run).predict(bottle_images())
    verdicts = model.predict([decode_image(p) for p in bottle_images()])
    assert [v.label for v in verdicts] == [p.label for p in torch_predictions]
    assert {"normal", "defective"} == {v.label for v in verdicts}
    for verdict, prediction in zip(verdicts, torch_predictions):
        assert verdict.score == pytest.approx(prediction.score, abs=SCORE_TOL)
        assert verdict.anomaly_map.shape == prediction.anomaly_map.shape == (900, 900)
        assert np.abs(verdict.anomaly_map - prediction.anomaly_map).max() <= MAP_TOL
        assert (verdict.mask != prediction.mask).mean() < 1e-4


def test_openvino_f32_matches_torch(bottle_run, bottle_onnx, tmp_path):
    pytest.importorskip("openvino")
    from distillad.deploy.export import _write_openvino
    from distillad.deploy.runtimes import DeployedModel, OpenVinoSession

    _, maps, scores = _torch(bottle_run, _inputs(64))
    xml = tmp_path / "bottle64.xml"
    _write_openvino(bottle_onnx.read_bytes(), xml, tmp_path)
    Path(f"{xml}.json").write_text(Path(f"{bottle_onnx}.json").read_text())
    for model_file in (bottle_onnx, xml):     # OpenVINO reads the ONNX file and its own IR
        model = DeployedModel(model_file, session=OpenVinoSession(model_file, threads=1))
        out_maps, out_scores, _ = model.score(_inputs(64))
        assert np.abs(out_maps - maps).max() <= MAP_TOL, model_file
        assert np.abs(out_scores - scores).max() <= SCORE_TOL, model_file


def test_predict_gives_the_same_labels_on_every_runtime(bottle_run, tmp_path):
    """The CLI on onnxruntime, the API on torch and OpenVINO: one set of labels, scores within 1e-5."""
    import distillad

    done = _cli("predict", "--run", bottle_run, *bottle_images(), "--out", tmp_path / "ort", "--runtime",
                "onnxruntime", "--no-images", "--threads", "1")
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "ort" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    reference = distillad.load(bottle_run).predict(bottle_images())
    assert [r["label"] for r in rows] == [p.label for p in reference]
    assert [float(r["score"]) for r in rows] == pytest.approx([p.score for p in reference], abs=1e-5)
    if _installed("openvino"):
        run = distillad.load(bottle_run, runtime="openvino", threads=1)
        assert run.runtime == "openvino"
        predicted = run.predict(bottle_images())
        assert [p.label for p in predicted] == [p.label for p in reference]
        assert [p.score for p in predicted] == pytest.approx([p.score for p in reference], abs=1e-5)


def test_evaluate_on_onnxruntime_matches_torch(bottle_run):
    import distillad
    from distillad.data import CategorySplit, load_category

    split = load_category(BOTTLE)
    small = CategorySplit(split.name, [], [], split.test[::6])
    on_torch = distillad.load(bottle_run).evaluate(small)
    on_ort = distillad.load(bottle_run, runtime="onnxruntime", threads=1).evaluate(small)
    assert on_ort["runtime"] == "onnxruntime" and on_torch["runtime"] == "torch"
    for key in ("image_auroc", "pixel_auroc"):
        assert on_ort[key] == pytest.approx(on_torch[key], abs=1e-4)
    assert [i["score"] for i in on_ort["images"]] == pytest.approx([i["score"] for i in on_torch["images"]],
                                                                    abs=SCORE_TOL)


def test_map_options_are_in_the_graph(bottle_run):
    """map_norm, position_norm (with its decision map) and score_topk change the graph, not a post-step."""
    from distillad.deploy.graph import export_model_proto
    from distillad.deploy.runtimes import DECISION_OUTPUT, open_session

    options = {"map_norm": "quantile", "position_norm": "score", "score_topk": 0.01}
    loaded, maps, scores = _torch(bottle_run, _inputs(64), options)
    session = open_session(export_model_proto(loaded.scorer, 64).SerializeToString(), "onnxruntime", 1)
    out = session.run(_inputs(64))
    assert np.abs(out["anomaly_map"] - maps).max() <= MAP_TOL
    assert np.abs(out["score"] - scores).max() <= SCORE_TOL
    import torch

    decision = loaded.scorer.decision_map(torch.from_numpy(maps)).numpy()
    assert np.abs(out[DECISION_OUTPUT] - decision).max() <= MAP_TOL
    _, plain_maps, plain_scores = _torch(bottle_run, _inputs(64))
    assert np.abs(plain_scores - scores).max() > 1e-3     # the options do change the scores


def test_static_int8_recalibrates_the_threshold_on_the_quantized_model(bottle_run, tmp_path):
    from distillad.data.images import decode_image
    from distillad.deploy.runtimes import DeployedModel, image_to_input
    from distillad.scoring.calibration import ThresholdRule

    good = tmp_path / "good"
    good.mkdir()
    for path in sorted((BOTTLE / "train" / "good").glob("*.png"))[:12]:
        (good / path.name).symlink_to(path)
    out = tmp_path / "int8.onnx"
    done = _cli("export", "--run", bottle_run, "--out", out, "--int8", "--calibration-data", good, "--threads", "1")
    assert done.returncode == 0, done.stderr
    assert "threshold refitted" in done.stdout
    model = DeployedModel(out, threads=1)
    contract = model.contract
    assert contract["precision"] == "int8"
    report = contract["checks"]["int8"]
    assert report["calibration_images"] == 12 and "validation images" in report["threshold_fitted_on"]
    meta = json.loads((bottle_run / "meta.json").read_text())
    val_inputs = np.stack([image_to_input(decode_image(p), 64) for p in meta["data"]["val_files"]])
    import torch

    from distillad.scoring.maps import image_score, position_references, upsample

    maps, int8_scores, decision = model.score(val_inputs)
    assert contract["map"]["position_norm"] == "score"      # DSKD's default: the reference is refitted
    reference, leave_one_out = position_references(torch.from_numpy(maps))
    # the graph's reference is the per-position maximum of the int8 model's own validation maps, not the fp32 one's
    assert np.allclose(maps - decision, upsample(reference[None], (64, 64)).numpy(), atol=1e-5)
    expected = image_score(torch.from_numpy(maps) - upsample(leave_one_out, (64, 64))).numpy()
    saved = meta["config"]
    rule = ThresholdRule(saved["threshold_rule"], saved["threshold_k"], saved["false_alarm_rate"])
    assert model.threshold == pytest.approx(rule.fit(expected).threshold, rel=1e-5)
    assert model.threshold != pytest.approx(report["threshold_fp32"], rel=1e-6)


def test_export_refuses_bad_requests_in_one_line(bottle_run, bottle_onnx, tmp_path):
    cases = [
        (["--out", bottle_onnx], "already exists"),
        (["--out", tmp_path / "model.xml"], "must end in .onnx"),
        (["--out", tmp_path / "m.onnx", "--int8"], "--int8 needs --calibration-data"),
        (["--out", tmp_path / "m.onnx", "--calibration-data", tmp_path], "--calibration-data is for --int8"),
    ]
    for extra, message in cases:
        done = _cli("export", "--run", bottle_run, *extra)
        assert done.returncode == 2, done
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    done = _cli("export", "--run", tmp_path / "missing", "--out", tmp_path / "m.onnx")
    assert done.returncode == 2 and "does not exist" in done.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_speed_times_the_onnxruntime_graph(bottle_run):
    from distillad.benchmark import speed_report

    result = speed_report(run=bottle_run, runtime="onnxruntime", threads=1, warmup=1, repeats=2, isolate=False)
    assert result["runtime"] == "onnxruntime"
    assert result["runtime_parity"]["map_max_abs_diff"] <= MAP_TOL
    assert result["latency_ms_bs1"] > 0 and result["throughput_ips"] > 0 and result["gflops"] > 0


def test_patchcore_exports_with_its_bank(tmp_path):
    import torch

    import distillad
    from distillad.data import CategorySplit, load_category
    from distillad.deploy.graph import export_model_proto
    from distillad.deploy.runtimes import open_session
    from distillad.engine.checkpoint import load_run

    split = load_category(BOTTLE)
    torch.set_num_threads(1)
    distillad.train(CategorySplit(split.name, split.train[:6], split.val[:4], []), out=tmp_path / "pc",
                    method="patchcore", image_size=64, progress=False, log=lambda *_: None)
    loaded = load_run(tmp_path / "pc")
    inputs = _inputs(64)
    session = open_session(export_model_proto(loaded.scorer, 64).SerializeToString(), "onnxruntime", 1)
    from distillad.deploy.graph import parity

    result = parity(loaded.scorer, session, inputs)
    assert result["map_max_abs_diff"] <= MAP_TOL and result["score_max_abs_diff"] <= SCORE_TOL


def test_the_deployed_path_does_not_import_torch(bottle_onnx):
    code = ("import sys; from distillad.deploy.runtimes import DeployedModel; "
            "from distillad.data.images import decode_image_bytes; import distillad.deploy.serve; "
            f"m = DeployedModel({str(bottle_onnx)!r}, threads=1); "
            f"v = m.predict([decode_image_bytes(open({str(bottle_images()[2])!r}, 'rb').read())]); "
            "assert v[0].mask is not None; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_auto_takes_the_fastest_installed_runtime_that_agrees_with_torch(bottle_run):
    import distillad
    from distillad.deploy.runtime_switch import AUTO_ORDER, auto_candidates
    from distillad.deploy.runtimes import runtime_installed

    installed = [name for name in AUTO_ORDER if runtime_installed(name)]
    assert auto_candidates() == installed
    run = distillad.load(bottle_run, runtime="auto", threads=1)
    assert run.runtime == (installed[0] if installed else "torch")
    if installed:
        torch_run = distillad.load(bottle_run, runtime="torch")
        paths = sorted((BOTTLE / "test" / "broken_large").glob("*.png"))[:3]
        fast, reference = run.predict(paths), torch_run.predict(paths)
        assert [p.label for p in fast] == [p.label for p in reference]
        assert max(abs(a.score - b.score) for a, b in zip(fast, reference)) <= 1e-5
