"""The public Python API: the README's snippet runs as written, and every path scores a file the same way."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import distillad
from distillad.data import make_synthetic_dataset

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_snippet() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the README's 'From Python' section holds one python block"
    return blocks[0]


def test_readme_snippet_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_python_snippet(), "README.md", "exec"), namespace)
    run, metrics, predictions = namespace["run"], namespace["metrics"], namespace["predictions"]
    assert isinstance(run, distillad.Run) and run.run_dir == Path("runs/demo")
    assert set(metrics) >= {"image_auroc", "pixel_auroc", "aupro", "threshold", "images"}
    assert len(predictions) == len(metrics["images"])
    assert capsys.readouterr().out.strip()


def test_import_distillad_does_not_import_torch():
    code = "import sys, distillad; assert 'torch' not in sys.modules; distillad.DataError; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "ok\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    data = make_synthetic_dataset(root / "data", seed=4, n_train=12, n_test_good=3, n_test_defect=3, image_size=64)
    run = distillad.train(data, out=root / "run", image_size=64, epochs=1, batch_size=4, progress=False,
                          log=lambda _: None)
    return data, run


def test_test_and_predict_give_the_same_score_for_the_same_file(trained):
    """`test` scores through the cached Dataset, `predict` decodes each file itself: one input pipeline."""
    data, run = trained
    evaluated = {Path(entry["path"]): entry["score"] for entry in run.evaluate(data)["images"]}
    predicted = {p.path: p.score for p in run.predict(data / "test", batch_size=3)}
    assert predicted.keys() == evaluated.keys()
    for path, score in predicted.items():
        assert score == pytest.approx(evaluated[path], abs=1e-5, rel=1e-5)


def test_predict_accepts_paths_pil_images_and_arrays(trained):
    data, run = trained
    path = sorted((data / "test").rglob("*.png"))[0]
    rgb = np.asarray(Image.open(path).convert("RGB"))
    by_path, by_pil, by_uint8, by_float = run.predict([path, Image.open(path), rgb, rgb / 255.0])
    assert by_path.path == path and by_pil.path is None
    for other in (by_pil, by_uint8, by_float):
        assert other.score == pytest.approx(by_path.score, abs=1e-5)
        assert other.label == by_path.label
    # maps and masks at the image's own resolution; the mask is the map above the threshold
    assert by_path.anomaly_map.shape == rgb.shape[:2] and by_path.anomaly_map.dtype == np.float32
    assert np.array_equal(by_path.mask, by_path.anomaly_map > run.threshold)
    assert by_path.normalized_score == pytest.approx(run.calibration.normalize(by_path.score))


def test_load_gives_the_same_run(trained):
    data, run = trained
    again = distillad.load(run.run_dir)
    assert again.calibration == run.calibration and again.config == run.config
    path = sorted((data / "test").rglob("*.png"))[0]
    assert again.predict(path)[0].score == pytest.approx(run.predict(path)[0].score, abs=1e-6)
    assert "threshold" in repr(again)


def test_api_errors_are_distillad_errors(trained, tmp_path):
    _, run = trained
    with pytest.raises(distillad.DataError, match="does not exist"):
        run.predict(tmp_path / "missing.png")
    with pytest.raises(distillad.DataError, match="shape"):
        run.predict(np.zeros((4, 4, 5), dtype=np.uint8))
    with pytest.raises(distillad.ConfigError, match="batch_size"):
        run.predict([], batch_size=0)
    with pytest.raises(distillad.RunError, match="does not exist"):
        distillad.load(tmp_path / "norun")
    with pytest.raises(distillad.ConfigError, match="epochs must be an integer"):
        distillad.train(tmp_path, out=tmp_path / "r", epochs="two")


MAGNETIC_TILE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mt" / "magnetic_tile"


@pytest.fixture(scope="module")
def letterboxed(tmp_path_factory):
    """A tiny DSKD run with `resize=letterbox` on Magnetic Tile's tiles, which come in many aspect ratios."""
    if not MAGNETIC_TILE.is_dir():
        pytest.skip(f"needs the shared Magnetic Tile data in {MAGNETIC_TILE}")
    import torch

    from distillad.data import CategorySplit, load_category

    split = load_category(MAGNETIC_TILE)
    test = [s for s in split.test if s.label == 0][:2] + [s for s in split.test if s.label == 1][::80]
    small = CategorySplit(split.name, split.train[:16], split.val[:6], test)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = distillad.train(small, out=tmp_path_factory.mktemp("letterbox") / "run", image_size=64,
                              resize="letterbox", epochs=2, batch_size=8, progress=False, log=lambda _: None)
    finally:
        torch.set_num_threads(previous)
    return small, run


def test_a_letterboxed_run_maps_each_image_back_to_its_own_shape(letterboxed, tmp_path):
    """test, predict and the exported model agree on a letterboxed run's scores, and a map at an image's own
    resolution is the part of the model's map the image fills, not the mirrored rest."""
    import torch

    from distillad.data.images import content_box, decode_image, resize_image_array
    from distillad.heatmaps import content_map

    small, run = letterboxed
    assert run.config.resize == "letterbox" and distillad.load(run.run_dir).config.resize == "letterbox"
    evaluated = run.evaluate(small)
    assert 0.0 <= evaluated["pixel_auroc"] <= 1.0
    predictions = run.predict([s.path for s in small.test])
    shapes = set()
    for sample, entry, prediction in zip(small.test, evaluated["images"], predictions):
        image = decode_image(sample.path)
        height, width = image.shape[:2]
        shapes.add(round(width / height, 1))
        assert tuple(entry["box"]) == content_box(height, width, 64, "letterbox")
        assert prediction.score == pytest.approx(entry["score"], abs=1e-5)
        assert prediction.anomaly_map.shape == (height, width)
        with torch.inference_mode():
            model_map, _ = run.scorer(torch.from_numpy(resize_image_array(image, 64, "letterbox")).permute(2, 0, 1)
                                      [None].float() / 255)
        expected = content_map(model_map[0].numpy(), entry["box"], height, width)
        assert np.allclose(prediction.anomaly_map, expected, atol=1e-5)
    assert len(shapes) > 1, "the test images should come in several aspect ratios"

    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from distillad.deploy.export import export_run
    from distillad.deploy.runtimes import DeployedModel

    export_run(run.run_dir, tmp_path / "model.onnx", threads=1, log=lambda *_: None)
    deployed = DeployedModel(tmp_path / "model.onnx", threads=1)
    assert deployed.resize == "letterbox"
    verdicts = deployed.predict([decode_image(s.path) for s in small.test])
    for verdict, prediction in zip(verdicts, predictions):
        assert verdict.score == pytest.approx(prediction.score, abs=1e-4)
        assert verdict.anomaly_map.shape == prediction.anomaly_map.shape
        assert np.abs(verdict.anomaly_map - prediction.anomaly_map).max() < 1e-3
