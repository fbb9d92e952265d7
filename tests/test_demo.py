"""The embedded default job: `distillad demo` must show real detection on its own synthetic set (~2 min)."""

import csv
import json

import pytest

from distillad.cli import main


@pytest.mark.slow
def test_demo_detects_synthetic_defects(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "test.json").read_text())
    assert result["image_auroc"] >= 0.9, result
    assert result["pixel_auroc"] >= 0.9, result
    rows = list(csv.DictReader((out / "predictions" / "predictions.csv").open()))
    assert len(rows) == result["n_images"]
    assert len(list((out / "predictions" / "heatmaps").glob("*.png"))) == len(rows)
    assert str(out / "run") in printed
    # a second demo into the same folder refuses to replace the trained run
    assert main(["demo", "--out", str(out), "--no-progress"]) == 2
