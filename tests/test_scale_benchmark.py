"""`benchmark --engine ray`: the same results.csv as the local engine (fresh, resumed, with an evaluation-only
cell), results written by the driver only, failed cells reported while the others finish, one-line flag errors.

Determinism: the local engine runs here with 1 torch thread and every Ray task with --cell-threads 1. The thread
count decides how convolutions and reductions split their sums, so with different counts the weights and metrics
could differ in the last digits; with the same count, training and evaluation are the same computation in another
process, and the metrics must agree to 1e-6.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from distillad.benchmark import METRIC_KEYS, build_spec, cell_status, plan_cells, run_benchmark
from distillad.cli import main
from distillad.data import make_synthetic_dataset
from distillad.errors import RunError

VARIANTS = {"dskd": {"method": "dskd"},
            "dskd_max": {"evaluate_run_of": "dskd", "options": {"student_fusion": "max", "sigma": 0}},
            "stfpm": {}}
FAST_SPEED = {"threads": 1, "warmup": 0, "repeats": 1}


def spec_values(out: Path, categories: dict[str, Path], speed: object = False) -> dict:
    return {"out": str(out), "categories": {name: str(path) for name, path in categories.items()}, "seeds": [0],
            "defaults": {"image_size": 64, "epochs": 1, "batch_size": 4}, "speed": speed, "variants": VARIANTS}


def metric_rows(out: Path) -> dict[tuple[str, str, str], dict[str, float]]:
    with open(out / "results.csv", newline="") as handle:
        return {(r["variant"], r["category"], r["seed"]): {k: float(r[k]) for k in METRIC_KEYS}
                for r in csv.DictReader(handle)}


def assert_same_metrics(expected_out: Path, out: Path) -> None:
    expected, got = metric_rows(expected_out), metric_rows(out)
    assert sorted(got) == sorted(expected) and len(got) == 3
    for key, metrics in expected.items():
        for name, value in metrics.items():
            assert got[key][name] == pytest.approx(value, abs=1e-6, rel=0), (key, name)


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("scale_data"), seed=4, n_train=10, n_test_good=3,
                                  n_test_defect=3, image_size=64)


@pytest.fixture(scope="module")
def local_out(tmp_path_factory, category):
    """The local engine's benchmark of the three variants, with 1 torch thread (as each Ray cell gets)."""
    out = tmp_path_factory.mktemp("local") / "out"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_benchmark(build_spec(spec_values(out, {"syn": category})), progress=False, log=lambda _: None)
    finally:
        torch.set_num_threads(previous)
    return out


@pytest.fixture
def ray_engine():
    pytest.importorskip("ray")
    from distillad.scale import ray_benchmark

    return ray_benchmark


@pytest.mark.slow
def test_ray_engine_gives_the_local_results(ray_engine, local_out, category, tmp_path, monkeypatch):
    spec = build_spec(spec_values(tmp_path / "ray", {"syn": category}, speed=FAST_SPEED))
    written_by_driver: list[str] = []
    real_write_cell = ray_engine.write_cell

    def driver_writes(cell, record, evaluation):
        assert not cell.cell_file.exists() and not (cell.folder / "test.json").exists()   # no worker wrote them
        written_by_driver.append(cell.variant)
        real_write_cell(cell, record, evaluation)

    monkeypatch.setattr(ray_engine, "write_cell", driver_writes)
    logs: list[str] = []
    result = ray_engine.run_benchmark_on_ray(spec, num_cpus=2, cell_threads=1, log=logs.append)
    assert sorted(c.variant for c in result.ran) == ["dskd", "dskd_max", "stfpm"] and not result.skipped
    assert sorted(written_by_driver) == ["dskd", "dskd_max", "stfpm"]
    assert_same_metrics(local_out, spec.out)
    records = {c.variant: json.loads(c.cell_file.read_text()) for c in plan_cells(spec)}
    assert all(record["torch_threads"] == 1 for record in records.values())
    # the evaluation-only cell ran after the training of the run it evaluates, and trained nothing itself
    done = [line.split(" done:")[0].split("] ", 1)[1] for line in logs if " done:" in line]
    assert done.index("dskd / syn / seed 0") < done.index("dskd_max / syn / seed 0")
    assert records["dskd_max"]["run_dir"] == records["dskd"]["run_dir"]
    assert not (spec.out / "cells" / "dskd_max" / "syn" / "seed0" / "run").exists()
    # speed: measured after the grid, once per trained variant, in a task holding both CPUs
    assert sorted(p.name for p in (spec.out / "speed").iterdir()) == ["dskd.json", "stfpm.json"]
    assert any("holding all its 2 CPUs" in line for line in logs)
    rows = list(csv.DictReader(open(spec.out / "results.csv", newline="")))
    assert all(float(r["latency_ms_bs1"]) > 0 for r in rows if r["variant"] != "dskd_max")
    assert not list(spec.out.rglob("*.tmp"))


@pytest.mark.slow
def test_resumed_ray_run_only_does_what_is_left(ray_engine, local_out, category, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(local_out, out)
    cells_dir = out / "cells"
    shutil.rmtree(cells_dir / "stfpm")                                   # never started: trained on Ray
    shutil.rmtree(cells_dir / "dskd_max")                                # its run (dskd's) is there: evaluated only
    (out / "results.csv").unlink()
    spec = build_spec(spec_values(out, {"syn": category}))
    assert [cell_status(c) for c in plan_cells(spec)] == ["done", "trained", "pending"]
    untouched = [p for p in (cells_dir / "dskd").rglob("*") if p.is_file()]    # dskd's cell and its run
    mtimes = {p: p.stat().st_mtime_ns for p in untouched}
    with pytest.raises(RunError, match="differs in: epochs"):          # changed cells: refused before Ray starts
        ray_engine.run_benchmark_on_ray(spec, overrides={"epochs": 2}, num_cpus=2, log=lambda _: None)
    logs: list[str] = []
    result = ray_engine.run_benchmark_on_ray(spec, num_cpus=2, cell_threads=1, log=logs.append)
    assert [c.variant for c in result.skipped] == ["dskd"]
    assert sorted(c.variant for c in result.ran) == ["dskd_max", "stfpm"]
    trainings = [line for line in logs if "epochs x" in line]                      # "1 epochs x 2 steps, batch 4"
    assert len(trainings) == 1 and trainings[0].startswith("    [stfpm / syn / seed 0]")
    assert {p: p.stat().st_mtime_ns for p in untouched} == mtimes
    assert_same_metrics(local_out, out)


@pytest.mark.slow
def test_failed_cells_are_listed_after_the_others_finish(ray_engine, local_out, category, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(category, broken)
    bad_image = sorted((broken / "train" / "good").iterdir())[0]
    bad_image.write_bytes(b"not an image")
    out = tmp_path / "out"
    shutil.copytree(local_out, out)
    (out / "cells" / "stfpm" / "syn" / "seed0" / "cell.json").unlink()     # still to do: evaluation only
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec_values(out, {"syn": category, "broken": broken})))
    assert main(["benchmark", str(spec_file), "--engine", "ray", "--ray-cpus", "2", "--cell-threads", "1"]) == 2
    captured = capsys.readouterr()
    error = captured.err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("distillad benchmark: error: 3 task(s) failed")
    assert "dskd / broken / seed 0 (" in error and bad_image.name in error and "stfpm / broken / seed 0 (" in error
    assert "dskd_max / broken / seed 0 (not evaluated: dskd / broken / seed 0 failed)" in error
    assert "[stfpm / syn / seed 0] reusing the finished run" in captured.out       # a trained run: evaluated only
    assert "stfpm / syn / seed 0 done" in captured.out
    assert sorted(metric_rows(out)) == sorted(metric_rows(local_out))    # the finished cells' results are written
    assert_same_metrics(local_out, out)


def test_cli_ray_flag_errors_are_one_fast_line(category, tmp_path, capsys, monkeypatch):
    base = ["benchmark", "--methods", "stfpm", "--categories", str(category), "--out", str(tmp_path / "o"),
            "--epochs", "1", "--image-size", "64", "--no-speed"]

    def one_error_line() -> str:
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1
        return lines[0]

    assert main(base + ["--address", "127.0.0.1:1"]) == 2
    assert "--address only apply to --engine ray" in one_error_line()
    assert main(base + ["--cell-threads", "2"]) == 2
    assert "--cell-threads only apply to --engine ray" in one_error_line()
    assert main(base + ["--engine", "ray", "--address", "127.0.0.1:1", "--ray-cpus", "2"]) == 2
    assert "--ray-cpus sizes a local Ray" in one_error_line()
    assert main(base + ["--engine", "ray", "--cell-threads", "0"]) == 2
    assert "--cell-threads must be >= 1" in one_error_line()
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "ray", None)                        # Ray not installed
        assert main(base + ["--engine", "ray"]) == 2
        assert "pip install 'distillad[ray]'" in one_error_line()
    pytest.importorskip("ray")
    start = time.perf_counter()
    assert main(base + ["--engine", "ray", "--address", "127.0.0.1:1"]) == 2     # nobody listens at port 1
    assert time.perf_counter() - start < 10                              # Ray itself would retry for minutes
    assert "--address 127.0.0.1:1: no Ray cluster answers there" in one_error_line()
    assert not (tmp_path / "o").exists()
