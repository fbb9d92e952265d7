"""`benchmark`: cells are trained once, results files match the cells, reruns resume, bad specs fail clearly."""

import csv
import json
import os

import pytest
import yaml

import distillad.benchmark.runner as runner
from distillad.benchmark import METRIC_KEYS, build_spec, load_spec, plan_cells, run_benchmark, write_results
from distillad.cli import main
from distillad.data import DataError, make_synthetic_dataset
from distillad.errors import ConfigError, RunError
from distillad.io import atomic_write_json

FAKE_SPEED = {"latency_ms_bs1": 12.5, "throughput_ips_bs16": 80.25, "params": 4_000_000, "trainable_params": 3_000_000,
              "gflops": 1.5, "peak_rss_mb": 400.0}


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("bench_data"), seed=4, n_train=10, n_test_good=3,
                                  n_test_defect=3, image_size=64)


def write_spec(path, category, **extra):
    values = {
        "out": str(path.parent / "out"),
        "categories": {"syn": str(category)},
        "seeds": [0],
        "defaults": {"image_size": 64, "epochs": 1, "batch_size": 4},
        "speed": {"threads": 1, "warmup": 0, "repeats": 1},
        "variants": {"dskd": {"method": "dskd"}, "stfpm": {}},
        **extra,
    }
    path.write_text(yaml.safe_dump(values))
    return path


class Counter:
    """Wraps a function and counts its calls (to prove the trainer / speed meter is not called again)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.fixture
def counted(monkeypatch):
    trainer = Counter(runner.train_run)
    speed = Counter(lambda **kwargs: dict(FAKE_SPEED))
    monkeypatch.setattr(runner, "train_run", trainer)
    monkeypatch.setattr(runner, "speed_report", speed)
    return trainer, speed


@pytest.fixture
def finished(tmp_path, category, counted):
    """A benchmark of 2 variants x 1 category x 1 seed, run once."""
    spec = load_spec(write_spec(tmp_path / "spec.yaml", category))
    logs: list[str] = []
    run_benchmark(spec, progress=False, log=logs.append)
    return spec, logs


def test_benchmark_writes_cells_and_matching_results(finished, counted):
    spec, logs = finished
    trainer, speed = counted
    assert trainer.calls == 2 and speed.calls == 2                  # one speed measurement per variant
    assert any(line.startswith("[1/2] dskd / syn / seed 0: training") for line in logs)
    assert any(line.startswith("[2/2] stfpm / syn / seed 0 done") and "left" in line for line in logs)
    rows = list(csv.DictReader((spec.out / "results.csv").open()))
    assert [(r["variant"], r["category"], r["seed"]) for r in rows] == [("dskd", "syn", "0"), ("stfpm", "syn", "0")]
    markdown = (spec.out / "results.md").read_text()
    for row in rows:
        cell = json.loads((spec.out / "cells" / row["variant"] / "syn" / "seed0" / "cell.json").read_text())
        assert cell["config"]["method"] == row["method"] and cell["config"]["seed"] == 0
        for key in METRIC_KEYS:
            assert float(row[key]) == cell["metrics"][key]
        assert float(row["train_seconds"]) == pytest.approx(cell["train_seconds"], abs=0.01)
        assert float(row["latency_ms_bs1"]) == 12.5 and int(row["params"]) == 4_000_000
        assert (spec.out / "cells" / row["variant"] / "syn" / "seed0" / "test.json").is_file()
        # the per-category line shows the five metrics as % with one decimal
        expected = " | ".join(f"{cell['metrics'][k] * 100:.1f}" for k in METRIC_KEYS)
        assert f"| syn | {row['variant']} | 1/1 | {expected} |" in markdown
        summary = [line for line in markdown.splitlines() if line.startswith(f"| {row['variant']} | {row['method']} |")]
        assert len(summary) == 1 and expected in summary[0] and "| 12.5 | 80.2 | 4.00 | 1.50 |" in summary[0]
    assert not [p for p in spec.out.iterdir() if p.name.endswith(".tmp")]


def test_rerun_skips_finished_cells(finished, counted):
    spec, _ = finished
    trainer, speed = counted
    cell_files = sorted(spec.out.glob("cells/*/*/*/cell.json"))
    mtimes = [p.stat().st_mtime_ns for p in cell_files]
    logs: list[str] = []
    result = run_benchmark(spec, progress=False, log=logs.append)
    assert trainer.calls == 2 and speed.calls == 2                  # nothing trained or measured again
    assert len(result.skipped) == 2 and not result.ran
    assert [p.stat().st_mtime_ns for p in cell_files] == mtimes
    assert "2 already finished, 0 to run" in logs[0]


def test_a_cell_another_process_is_training_is_left_to_it(tmp_path, category, counted):
    """Two benchmark processes on one spec: a cell whose run the other one is training (it holds the run's
    training lock) is neither trained a second time nor written into; this process goes on with the next cell,
    and a later run does the cell once it is free."""
    from distillad.engine.resume import training_lock

    spec = load_spec(write_spec(tmp_path / "spec.yaml", category))
    taken = next(c for c in plan_cells(spec) if c.variant == "dskd")
    logs: list[str] = []
    with training_lock(taken.run_dir):
        result = run_benchmark(spec, progress=False, log=logs.append)
    assert [c.variant for c in result.busy] == ["dskd"] and [c.variant for c in result.ran] == ["stfpm"]
    assert any("dskd / syn / seed 0: left to the other process" in line and "being trained by another process"
               in line for line in logs)
    assert "1 left to another process" in logs[-1]
    assert not taken.cell_file.exists() and not taken.run_dir.exists()
    with open(spec.out / "results.csv", newline="") as f:
        assert [row["variant"] for row in csv.DictReader(f)] == ["stfpm"]
    result = run_benchmark(spec, progress=False, log=logs.append)
    assert [c.variant for c in result.ran] == ["dskd"] and not result.busy and taken.cell_file.is_file()


def test_missing_cell_json_reruns_that_cell(finished, counted):
    spec, _ = finished
    trainer, _ = counted
    cell_file = spec.out / "cells" / "stfpm" / "syn" / "seed0" / "cell.json"
    before = json.loads(cell_file.read_text())
    cell_file.unlink()
    result = run_benchmark(spec, progress=False, log=lambda _: None)
    # the run folder is complete with the same config: only evaluated again, with the same numbers
    assert [c.variant for c in result.ran] == ["stfpm"] and trainer.calls == 2
    assert json.loads(cell_file.read_text())["metrics"] == before["metrics"]
    # a half-written cell (no finished run) is retrained with overwrite
    cell_file.unlink()
    (cell_file.parent / "run" / "meta.json").unlink()
    result = run_benchmark(spec, progress=False, log=lambda _: None)
    assert [c.variant for c in result.ran] == ["stfpm"] and trainer.calls == 3
    assert cell_file.is_file()
    assert len(list(csv.DictReader((spec.out / "results.csv").open()))) == 2


def test_changed_settings_are_not_mixed_with_finished_cells(finished, counted):
    spec, _ = finished
    trainer, _ = counted
    with pytest.raises(RunError, match="differs in: epochs"):
        run_benchmark(spec, overrides={"epochs": 2}, progress=False, log=lambda _: None)
    assert trainer.calls == 2
    # threshold settings change no trained model and no results.csv metric, and a cell saved before they existed
    # lacks them: neither retrains
    cell_file = spec.out / "cells/stfpm/syn/seed0/cell.json"
    record = json.loads(cell_file.read_text())
    for key in ("threshold_rule", "false_alarm_rate"):
        record["config"].pop(key)
    cell_file.write_text(json.dumps(record))
    run_benchmark(spec, overrides={"threshold_k": 2.0}, progress=False, log=lambda _: None)
    assert trainer.calls == 2
    only_stfpm = build_spec(yaml.safe_load((spec.out.parent / "spec.yaml").read_text()), variants=["stfpm"])
    run_benchmark(only_stfpm, overrides={"epochs": 2}, redo_changed=True, progress=False, log=lambda _: None)
    assert trainer.calls == 3
    assert json.loads((spec.out / "cells/stfpm/syn/seed0/cell.json").read_text())["config"]["epochs"] == 2


def test_a_cell_saved_before_an_option_existed_compares_with_the_value_it_was_built_with():
    """PatchCore's patch_padding arrived with a new default ("zeros"); its older cells were built with "inside"."""
    from distillad.benchmark.cells import config_difference
    from distillad.engine.config import TrainConfig

    old = TrainConfig(method="patchcore").to_dict()
    old["options"] = {}
    assert config_difference(old, TrainConfig(method="patchcore", options={"patch_padding": "inside"})) == []
    wanted_default = TrainConfig(method="patchcore")
    wanted_default.validate()                       # the default is written into the options, so saved explicitly
    assert wanted_default.options == {"patch_padding": "zeros"}
    assert config_difference(old, wanted_default) == ["options"]

    # a training setting added since (resize) compares as the value older runs were built with
    old = TrainConfig(method="stfpm").to_dict()
    del old["resize"]
    assert config_difference(old, TrainConfig(method="stfpm")) == []
    assert config_difference(old, TrainConfig(method="stfpm", resize="letterbox")) == ["resize"]
    # DSKD's hard_share: cells trained before it existed used the plain mean over all pixels (1.0)
    old = TrainConfig(method="dskd").to_dict()
    old["options"] = {}
    assert config_difference(old, TrainConfig(method="dskd", options={"hard_share": 1.0})) == []
    assert config_difference(old, TrainConfig(method="dskd", options={"hard_share": 0.1})) == ["options"]


def write_record(cell, value: float, train_seconds: float = 10.0) -> None:
    """A hand-written finished cell: every metric `value`."""
    atomic_write_json(cell.cell_file, {
        "metrics": {k: value for k in METRIC_KEYS}, "train_seconds": train_seconds, "epochs": 1,
        "inference_seconds": 1.0, "n_images": 6, "n_defective": 3, "config": cell.config.to_dict()})


def result_cells(out) -> list[tuple[str, str, str]]:
    return [(r["variant"], r["category"], r["seed"]) for r in csv.DictReader((out / "results.csv").open())]


def test_narrowed_runs_keep_the_other_cells_in_the_results(tmp_path):
    """A run narrowed by flags rewrites results.csv with every finished cell of its spec file, not only its own:
    two runs side by side (one per category, as the 256 px study was run) must not drop each other's rows."""
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({
        "out": str(tmp_path / "o"), "categories": {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")},
        "seeds": [0, 1], "speed": False, "variants": {"dskd": {}, "stfpm": {}}}))
    full = load_spec(spec_file)
    assert full.reported is None
    for cell in plan_cells(full):
        write_record(cell, 0.5)
    everything = [(v, c, s) for v in ("dskd", "stfpm") for c in "ab" for s in "01"]

    narrowed = load_spec(spec_file, variants=["stfpm"], categories=[tmp_path / "b"], seeds=[1])
    assert [(c.variant, c.category, c.seed) for c in plan_cells(narrowed)] == [("stfpm", "b", 1)]
    write_results(narrowed, plan_cells(narrowed))
    assert result_cells(full.out) == everything
    assert "8 of 8 cells finished" in (full.out / "results.md").read_text()

    # a category and a seed that only the flags name join the table once finished
    added = load_spec(spec_file, variants=["dskd"], categories=[tmp_path / "c"], seeds=[2])
    write_record(plan_cells(added)[0], 0.9)
    write_results(added, plan_cells(added))
    assert sorted(result_cells(full.out)) == sorted(everything + [("dskd", "c", "2")])

    # the same through the CLI's --results-only, narrowed; and a narrowed run with another image size lists only
    # the cells finished with that size
    (full.out / "results.csv").unlink()
    assert main(["benchmark", str(spec_file), "--results-only", "--seeds", "0"]) == 0
    assert result_cells(full.out) == everything
    assert main(["benchmark", str(spec_file), "--results-only", "--seeds", "0", "--image-size", "64"]) == 0
    assert result_cells(full.out) == []


def test_means_over_seeds_and_categories(tmp_path):
    """Aggregation on hand-written cell records: per category mean ± sample std over seeds; the summary is the mean
    over categories with the std over seeds of the per-seed category means."""
    spec = build_spec(out=tmp_path / "o", methods=["dskd"], categories=[tmp_path / "a", tmp_path / "b"],
                      seeds=[0, 1], speed=False)
    cells = plan_cells(spec)
    values = {("a", 0): 0.90, ("a", 1): 1.00, ("b", 0): 0.70, ("b", 1): 0.80}
    for cell in cells:
        write_record(cell, values[(cell.category, cell.seed)], train_seconds=10.0 * (cell.seed + 1))
    write_results(spec, cells)
    markdown = (spec.out / "results.md").read_text()
    assert "| a | dskd | 2/2 | 95.0 ± 7.1 | 95.0 ± 7.1 |" in markdown       # stdev([90, 100]) = 7.07
    assert "| b | dskd | 2/2 | 75.0 ± 7.1 |" in markdown
    # per seed: (90 + 70) / 2 = 80, (100 + 80) / 2 = 90 -> 85.0 ± 7.1; train s mean 15.0; no speed columns
    assert "| dskd | dskd | efficientnet_lite0 | 256 | 4/4 | 85.0 ± 7.1 |" in markdown
    assert markdown.splitlines()[-1].endswith("| 15.0 |")
    assert "| 15.0 |  |  |  |  |" in markdown
    assert len(list(csv.DictReader((spec.out / "results.csv").open()))) == 4


def test_spec_from_flags_and_seeds_make_cells(category, tmp_path):
    spec = build_spec(out=tmp_path / "o", methods=["rd", "stfpm"], categories=[category], seeds=[0, 1])
    cells = plan_cells(spec, {"image_size": 64})
    assert [(c.variant, c.category, c.seed) for c in cells] == [
        ("rd", category.name, 0), ("rd", category.name, 1), ("stfpm", category.name, 0), ("stfpm", category.name, 1)]
    assert all(c.config.image_size == 64 and c.config.seed == c.seed for c in cells)
    assert cells[2].config.optimizer.name == "sgd"                       # the method's recipe applies
    assert cells[0].folder == tmp_path / "o" / "cells" / "rd" / category.name / "seed0"


@pytest.mark.parametrize("text,match", [
    ("out: [unclosed", "spec.yaml is not valid YAML"),
    ("- a\n- b\n", "spec.yaml must hold a mapping"),
    ("out: o\ncategories: [c]\nvariants: {dskd: {}}\nseed: [0]\n", r"spec.yaml: unknown key\(s\) 'seed'"),
    ("out: o\ncategories: [c]\nvariants: {dskd: {epoch: 3}}\n", r"spec.yaml: variant 'dskd': .*unknown setting(\(s\))? 'epoch'"),
    ("out: o\ncategories: [c]\nvariants: {dskd: {options: {studs: 2}}}\n", "variant 'dskd': .*'studs'"),
    ("out: o\ncategories: [c]\nvariants: {mine: {epochs: 1}}\n", "variant 'mine' needs a method"),
    ("out: o\ncategories: [c]\nvariants: {dskd: {seed: 3}}\n", "variant 'dskd' sets 'seed'"),
    ("out: o\ncategories: [c]\nvariants: {a/b: {method: dskd}}\n", "variant name 'a/b'"),
    ("out: o\ncategories: [c]\nseeds: 3\nvariants: {dskd: {}}\n", "seeds must be a non-empty list"),
    ("out: o\ncategories: [x/c, y/c]\nvariants: {dskd: {}}\n", "two folders named c"),
    ("out: o\ncategories: [c]\nspeed: {thread: 2}\nvariants: {dskd: {}}\n", "speed: unknown setting"),
    ("categories: [c]\nvariants: {dskd: {}}\n", "no output folder"),
])
def test_bad_specs_name_the_file_and_the_key(tmp_path, text, match):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_spec(path)


def test_missing_category_folder_fails_before_training(tmp_path, counted):
    spec = build_spec(out=tmp_path / "o", methods=["dskd"], categories=[tmp_path / "nowhere"])
    with pytest.raises(DataError, match="nowhere"):
        run_benchmark(spec, progress=False, log=lambda _: None)
    assert counted[0].calls == 0


def test_cli_benchmark_dry_run_then_run(category, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                       # relative paths are taken from the current folder
    os.symlink(category, tmp_path / "cat")
    argv = ["benchmark", "--methods", "stfpm", "--categories", "cat", "--out", "o", "--seeds", "0",
            "--epochs", "1", "--image-size", "64", "--no-speed", "--no-progress"]
    assert main(argv + ["--dry-run"]) == 0
    assert "[pending] stfpm / cat / seed 0" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[1/1] stfpm / cat / seed 0 done" in out
    assert (tmp_path / "o" / "results.csv").is_file() and (tmp_path / "o" / "results.md").is_file()
    assert main(argv + ["--dry-run"]) == 0
    assert "[   done] stfpm / cat / seed 0" in capsys.readouterr().out
    # another process may have rewritten the results over a subset of the cells: --results-only restores them
    (tmp_path / "o" / "results.csv").write_text("stale\n")
    assert main(["benchmark", "--methods", "stfpm", "rd", "--categories", "cat", "--out", "o", "--seeds", "0",
                 "--epochs", "1", "--image-size", "64", "--results-only"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "o" / "results.csv")))
    assert [r["variant"] for r in rows] == ["stfpm"] and not (tmp_path / "o" / "cells" / "rd").exists()


def test_cli_benchmark_bad_spec_is_one_clear_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("out: o\ncategories: [c]\nvariants: {dskd: {epoch: 3}}\n")
    assert main(["benchmark", str(path)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "epoch" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["issue2_baselines.yaml", "dskd_ablations.yaml", "study.yaml"])
def test_shipped_specs_are_valid(name):
    from pathlib import Path

    spec = load_spec(Path(__file__).resolve().parents[1] / "benchmarks" / name)
    assert spec.seeds == [0, 1, 2] and len(plan_cells(spec)) > 0
    assert all(spec.variants[v]["method"] == spec.variants[o]["method"] for v, o in spec.evaluated_runs_of.items())


def test_evaluation_variants_reuse_the_runs_with_other_map_options(tmp_path, category, counted):
    from distillad.data import discover_mvtec
    from distillad.engine import evaluate_split, load_run

    variants = {"dskd": {"method": "dskd"},
                "dskd_max": {"evaluate_run_of": "dskd", "options": {"student_fusion": "max", "sigma": 0}}}
    spec = load_spec(write_spec(tmp_path / "spec.yaml", category, variants=variants, speed=False))
    cells = plan_cells(spec)
    assert cells[1].run_dir == cells[0].run_dir and cells[1].map_options == {"student_fusion": "max", "sigma": 0}
    run_benchmark(spec, progress=False, log=lambda _: None)
    assert counted[0].calls == 1                           # one training: the evaluation variant trains nothing
    record = json.loads((cells[1].folder / "cell.json").read_text())
    assert record["config"]["options"] == {"student_fusion": "max", "sigma": 0, "hard_share": 0.1}
    assert not (cells[1].folder / "run").exists()
    # the oracle: the same run evaluated by hand with the same map options
    data = discover_mvtec(category, val_fraction=0.1, seed=0)
    run = load_run(cells[0].run_dir, map_options={"student_fusion": "max", "sigma": 0})
    expected = evaluate_split(run.scorer, data, 64, batch_size=4)
    assert all(record["metrics"][k] == pytest.approx(expected[k]) for k in METRIC_KEYS)
    assert record["train_seconds"] == pytest.approx(json.loads((cells[0].folder / "cell.json").read_text())
                                                    ["train_seconds"])
    rows = list(csv.DictReader(open(spec.out / "results.csv")))
    assert [r["variant"] for r in rows] == ["dskd", "dskd_max"]
    # rerun: nothing to do
    run_benchmark(spec, progress=False, log=lambda _: None)
    assert counted[0].calls == 1


def test_evaluation_variant_without_its_runs_fails_before_training(tmp_path, category, counted):
    variants = {"dskd": {"method": "dskd"},
                "dskd_max": {"evaluate_run_of": "dskd", "options": {"student_fusion": "max"}}}
    path = write_spec(tmp_path / "spec.yaml", category, variants=variants, speed=False)
    with pytest.raises(RunError, match="include variant 'dskd'"):
        run_benchmark(load_spec(path, variants=["dskd_max"]), progress=False, log=lambda _: None)
    assert counted[0].calls == 0


@pytest.mark.parametrize("variants,match", [
    ({"a": {"evaluate_run_of": "dskd", "options": {"sigma": 1}}, "dskd": {}}, "earlier variant"),
    ({"dskd": {}, "z": {"evaluate_run_of": "dskd", "options": {"levels": [3]}}}, "only set map options"),
    ({"dskd": {}, "z": {"evaluate_run_of": "dskd", "epochs": 3, "options": {"sigma": 1}}}, "epochs"),
    ({"dskd": {}, "z": {"evaluate_run_of": "dskd"}}, "only set map options"),
])
def test_bad_evaluation_variants(tmp_path, category, variants, match):   # (safe_dump sorts the names)
    with pytest.raises(ConfigError, match=match):
        load_spec(write_spec(tmp_path / "spec.yaml", category, variants=variants))
