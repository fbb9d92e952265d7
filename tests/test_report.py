"""`distillad test --report DIR`: the PNGs, the self-contained index.html, the worst cases, the folder guard; and the
public curves of metrics.py the report draws (their areas are the metrics)."""

import json
from html.parser import HTMLParser

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

import distillad  # noqa: E402
from distillad import metrics  # noqa: E402
from distillad.cli import main  # noqa: E402
from distillad.data import make_synthetic_dataset  # noqa: E402
from distillad.report import MARKER, evaluate_with_maps, worst_cases, write_report  # noqa: E402


def _trapezoid(x, y):
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) * 0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pro_curve_integrates_to_aupro(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 32, 32), dtype=bool)
    masks[0, 3:9, 4:12] = True
    masks[1, 20:30, 2:6] = True
    masks[1, 5:8, 25:31] = True
    maps = rng.random((4, 32, 32)).astype(np.float32) + 0.8 * masks
    maps[2] = np.round(maps[2], 1)  # ties
    for limit in (0.3, 0.05, 1.0):
        fpr, pro = metrics.pro_curve(maps, masks, limit)
        assert fpr[0] == 0 and pro[0] == 0 and fpr[-1] == pytest.approx(limit)
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
        assert _trapezoid(fpr, pro) / limit == pytest.approx(metrics.aupro(maps, masks, limit), abs=1e-12)
    fpr, tpr = metrics.roc_curve(maps, masks)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert _trapezoid(fpr, tpr) == pytest.approx(metrics.pixel_auroc(maps, masks), abs=1e-12)
    with pytest.raises(ValueError, match="one class"):
        metrics.roc_curve([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="no ground-truth anomaly"):
        metrics.pro_curve(maps, np.zeros_like(masks))


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.cases = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("href", "src"):
            if attrs.get(key):
                self.links.append(attrs[key])
        if tag == "figure" and attrs.get("class") == "case":
            self.cases.append((attrs["data-kind"], attrs["data-path"]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data = make_synthetic_dataset(root / "data", n_train=12, n_test_good=3, n_test_defect=3, image_size=64)
    distillad.train(data, out=root / "run", image_size=64, epochs=1, progress=False, log=lambda _: None)
    return data, root / "run"


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _check_png(path, min_w=300, min_h=200):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= min_w and im.height >= min_h, (path, im.size)
        assert np.asarray(im.convert("L")).std() > 5, f"{path} looks blank"


def test_report_through_the_cli(trained, tmp_path, capsys):
    data, run = trained
    out = tmp_path / "report"
    code, stdout, err = _cli(capsys, "test", "--run", run, "--data", data, "--json", tmp_path / "r.json",
                             "--report", out, "--no-progress")
    assert code == 0, err
    assert f"wrote {out / 'index.html'}" in stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert json.loads((out / "result.json").read_text())["images"] == result["images"]
    for name in ("roc.png", "pro.png", "scores.png"):
        _check_png(out / name)
    page = (out / "index.html").read_text()
    parser = _Links()
    parser.feed(page)
    assert {"roc.png", "pro.png", "scores.png", "result.json"} <= set(parser.links)
    for link in parser.links:  # relative, resolving, nothing external
        assert "://" not in link and not link.startswith("/"), link
        assert (out / link).is_file(), link
    for key in metrics.METRIC_KEYS:
        assert f"{result[key]:.4f}" in page
    assert "false alarms" in page and "detections" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained
    assert "plotted PRO curve" not in page and "undefined" not in page  # the curves' areas are the metrics
    # the worst cases: every good image by descending score, every defective one by ascending score (worst=6 > 3)
    images = result["images"]
    good = sorted((i for i in images if i["label"] == 0), key=lambda i: -i["score"])
    bad = sorted((i for i in images if i["label"] == 1), key=lambda i: i["score"])
    assert parser.cases == ([("false_alarm", i["path"]) for i in good] + [("missed_defect", i["path"]) for i in bad])
    for kind, n, panels in (("false_alarm", len(good), 2), ("missed_defect", len(bad), 3)):
        for rank in range(1, n + 1):
            _check_png(out / f"{kind}_{rank}.png", min_w=250 * panels)
            assert f"{kind}_{rank}.png" in parser.links
    assert not (out / f"false_alarm_{len(good) + 1}.png").exists()
    assert json.loads((out / MARKER).read_text())["files"]

    # a second report replaces the first, files the first wrote and the second does not are removed
    (out / "false_alarm_9.png").write_bytes(b"stale")
    marker = json.loads((out / MARKER).read_text())
    marker["files"].append("false_alarm_9.png")
    (out / MARKER).write_text(json.dumps(marker))
    (out / "notes.txt").write_text("mine")  # not the report's: kept
    code, _, err = _cli(capsys, "test", "--run", run, "--data", data, "--report", out, "--no-progress")
    assert code == 0, err
    assert not (out / "false_alarm_9.png").exists() and (out / "notes.txt").read_text() == "mine"
    _check_png(out / "roc.png")


def test_worst_cases_are_the_extremes(trained, tmp_path):
    data, run_dir = trained
    run = distillad.load(run_dir)
    result = run.evaluate(data)
    good, bad = worst_cases(result, 2)
    images = result["images"]
    top_good = sorted((i for i in images if i["label"] == 0), key=lambda i: -i["score"])[:2]
    low_bad = sorted((i for i in images if i["label"] == 1), key=lambda i: i["score"])[:2]
    assert good == top_good and bad == low_bad
    same, maps = evaluate_with_maps(run, data)  # one pass: the evaluation and its maps
    assert {k: same[k] for k in metrics.METRIC_KEYS} == {k: result[k] for k in metrics.METRIC_KEYS}
    assert same["images"] == images and maps.shape == (len(images), 64, 64)
    index = write_report(run, result, tmp_path / "r", worst=1)  # no data: no pixel curves, no masks, still a report
    parser = _Links()
    parser.feed(index.read_text())
    assert parser.cases == [("false_alarm", top_good[0]["path"]), ("missed_defect", low_bad[0]["path"])]
    assert "no data given" in index.read_text()
    for name in ("roc.png", "pro.png", "scores.png", "false_alarm_1.png", "missed_defect_1.png"):
        _check_png(tmp_path / "r" / name)
    with Image.open(tmp_path / "r" / "missed_defect_1.png") as im:  # image | heatmap only, no mask without data
        assert im.width < 1000
    # no calibrated threshold (an uncalibrated run): the report says so and still draws everything
    page = write_report(run, {**same, "threshold": None}, tmp_path / "u", data=data, maps=maps, worst=1).read_text()
    assert "No calibrated threshold" in page and "undefined" not in page
    for name in ("roc.png", "pro.png", "scores.png", "false_alarm_1.png", "missed_defect_1.png"):
        _check_png(tmp_path / "u" / name)


def test_report_refuses_a_foreign_folder(trained, tmp_path, capsys):
    data, run = trained
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    code, out, err = _cli(capsys, "test", "--run", run, "--data", data, "--report", foreign, "--no-progress")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "not empty" in err and str(foreign) in err
    assert out == ""  # refused before evaluating
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]
    (tmp_path / "file").write_text("x")
    code, _, err = _cli(capsys, "test", "--run", run, "--data", data, "--report", tmp_path / "file")
    assert code == 2 and "is a file" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _cli(capsys, "test", "--run", run, "--data", data, "--report", empty, "--no-progress")
    assert code == 0, err
    assert (empty / "index.html").is_file()


def test_missing_matplotlib_is_a_config_error(monkeypatch, trained, tmp_path, capsys):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    data, run = trained
    code, _, err = _cli(capsys, "test", "--run", run, "--data", data, "--report", tmp_path / "r")
    assert code == 2 and "matplotlib" in err and "distillad[report]" in err
    assert not (tmp_path / "r").exists()
