"""The command line: the contract's flags, and one clear line (exit 2) for each kind of user error."""

import json

import pytest

from distillad.cli import main
from distillad.data import make_synthetic_dataset


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("d"), seed=2, n_train=10, n_test_good=3, n_test_defect=3,
                                  image_size=64)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_test_predict_through_the_cli(category, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--method", "stfpm", "--data", category, "--out", run, "--epochs", 1,
                             "--image-size", 64, "--batch-size", 4, "--seed", 3, "--no-progress",
                             "--option", "sigma=2")
    assert code == 0, err
    meta = json.loads((run / "meta.json").read_text())
    assert meta["config"]["seed"] == 3 and meta["config"]["options"] == {"sigma": 2}
    code, out, err = run_cli(capsys, "test", "--run", run, "--data", category, "--json", tmp_path / "r.json",
                             "--no-progress")
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1max", "pixel_f1max", "n_images", "seconds"):
        assert key in result
    assert "image_auroc" in out
    assert result["threshold"] is not None
    # a map option changed at test time: other maps, no stale threshold
    code, out, err = run_cli(capsys, "test", "--run", run, "--data", category, "--json", tmp_path / "s.json",
                             "--no-progress", "--option", "sigma=0")
    assert code == 0, err
    unblurred = json.loads((tmp_path / "s.json").read_text())
    assert unblurred["options"]["sigma"] == 0 and unblurred["threshold"] is not None   # refitted on validation
    assert unblurred["threshold"]["value"] != result["threshold"]["value"]
    assert unblurred["pixel_auroc"] != result["pixel_auroc"]
    code, out, err = run_cli(capsys, "test", "--run", run, "--data", category, "--option", "levels=[3]")
    assert code == 2 and "new training run" in err and "Traceback" not in err
    code, out, err = run_cli(capsys, "predict", "--run", run, category / "test" / "good", "--out", tmp_path / "p",
                             "--no-progress")
    assert code == 0, err
    assert (tmp_path / "p" / "predictions.csv").is_file()


@pytest.mark.parametrize("argv,needle", [
    (["train", "--data", "{missing}", "--out", "{tmp}/r"], "does not exist"),
    (["train", "--data", "{category}", "--out", "{tmp}/r", "--image-size", "100"], "multiple of 32"),
    (["train", "--data", "{category}", "--out", "{tmp}/r", "--option", "bogus=1"], "unknown option(s) 'bogus'"),
    (["train", "--data", "{category}", "--out", "{tmp}/r", "--config", "{tmp}/none.yaml"], "none.yaml"),
    (["test", "--run", "{tmp}/norun", "--data", "{category}"], "norun"),
    (["predict", "--run", "{tmp}/norun", "{category}", "--out", "{tmp}/p"], "norun"),
])
def test_user_errors_are_one_clear_line(category, tmp_path, capsys, argv, needle):
    argv = [a.format(missing=tmp_path / "missing", tmp=tmp_path, category=category) for a in argv]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert "Traceback" not in err
    assert needle in err and err.startswith("distillad ")
    assert len(err.strip().splitlines()) == 1


def test_bad_yaml_config(category, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    code, _, err = run_cli(capsys, "train", "--data", category, "--out", tmp_path / "r", "--config", bad)
    assert code == 2 and "not valid YAML" in err and str(bad) in err


def test_unavailable_cuda_device_is_a_clear_error(category, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run_cli(capsys, "train", "--data", category, "--out", tmp_path / "r", "--device", "cuda")
    assert code == 2 and "no CUDA" in err and "--device cpu" in err
    assert not (tmp_path / "r").exists()
