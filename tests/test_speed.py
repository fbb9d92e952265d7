"""`speed`: the figures are measured through AnomalyScorer, are sane, and the CLI writes the documented JSON keys."""

import json

import pytest
import torch

from distillad.benchmark import (SPEED_KEYS, SpeedError, build_scorer, count_gflops, format_report, measure_speed,
                                 peak_rss_mb, speed_report)
from distillad.cli import main
from distillad.data import discover_mvtec, make_synthetic_dataset
from distillad.engine import resolve_config, train_run
from distillad.errors import ConfigError, DistilladError
from distillad.methods import build_model
from distillad.scoring import AnomalyScorer


@pytest.fixture(scope="module")
def rd_scorer():
    model = build_model("rd", "efficientnet_lite0", pretrained=False).eval()
    return AnomalyScorer(model, channels_last=True).eval()


def test_measure_speed_reports_sane_figures(rd_scorer):
    threads_before = torch.get_num_threads()
    result = measure_speed(rd_scorer, image_size=64, threads=1, warmup=1, repeats=3, batch_size=4, batches=1)
    assert torch.get_num_threads() == threads_before            # the setting is restored
    for key in ("latency_ms_bs1", "peak_rss_mb", "params", "gflops", "throughput_ips_bs4"):
        assert key in result
    assert 0 < result["latency_ms_bs1_min"] <= result["latency_ms_bs1"] <= result["latency_ms_bs1_p90"]
    assert result["throughput_ips"] > 0 and result["throughput_batch_size"] == 4
    model = rd_scorer.model
    assert result["params"] == sum(p.numel() for p in model.parameters())
    assert result["teacher_params"] == sum(p.numel() for p in model.teacher.parameters())
    assert result["trainable_params"] == sum(p.numel() for p in model.trainable_parameters())
    assert result["params"] == result["teacher_params"] + result["trainable_params"]
    assert result["peak_rss_mb"] > 50 and result["threads"] == 1 and result["channels_last"] is True
    assert result["torch_version"] == torch.__version__ and result["cpu_model"]
    assert result["gflops"] > 0


def test_the_report_says_when_passive_openmp_threads_make_timings_incomparable(rd_scorer, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    figures = {"method": "rd", "backbone": "efficientnet_lite0", "source": "method rd", "notes": []}
    two = {**figures, **measure_speed(rd_scorer, image_size=64, threads=2, warmup=0, repeats=1, batch_size=2,
                                      batches=1)}
    assert two["omp_wait_policy"] == "passive"
    assert "OMP_WAIT_POLICY=PASSIVE is set" in format_report(two)
    one = {**two, "threads": 1}                    # one thread has no idle siblings to put to sleep
    assert "OMP_WAIT_POLICY" not in format_report(one)
    monkeypatch.delenv("OMP_WAIT_POLICY")
    spinning = {**figures, **measure_speed(rd_scorer, image_size=64, threads=2, warmup=0, repeats=1, batch_size=2,
                                           batches=1)}
    assert spinning["omp_wait_policy"] is None and "OMP_WAIT_POLICY" not in format_report(spinning)


def test_gflops_scale_with_pixels(rd_scorer):
    small, large = count_gflops(rd_scorer, 64), count_gflops(rd_scorer, 128)
    assert 3.6 < large / small < 4.4


def test_bad_measurement_settings_are_refused(rd_scorer):
    with pytest.raises(ConfigError, match="multiple of 32"):
        measure_speed(rd_scorer, image_size=100, threads=1, warmup=0, repeats=1)
    with pytest.raises(ConfigError, match="repeats"):
        measure_speed(rd_scorer, image_size=64, threads=1, warmup=0, repeats=0)
    assert issubclass(SpeedError, DistilladError) and SpeedError.kind == "run"   # the CLI reports it, exit 2


def test_a_user_error_in_the_measurement_process_comes_back_as_its_kind():
    with pytest.raises(ConfigError, match="threads"):      # passes the caller's checks, refused in the child
        speed_report(method="rd", image_size=64, threads=0, warmup=0, repeats=1)


def test_peak_rss_uses_the_address_space_high_water_mark():
    value, source = peak_rss_mb()
    assert value > 0 and source in ("VmHWM", "ru_maxrss")


def test_fresh_resnet_model_without_cached_weights_is_random_and_says_so(monkeypatch, tmp_path):
    import distillad.backbones.weights as weights

    monkeypatch.setattr(weights, "hub_checkpoint_dir", lambda: tmp_path)
    scorer, info = build_scorer(method="stfpm", backbone="resnet18", image_size=64)
    assert info["teacher_weights"] == "random"
    assert any("teacher weights random" in note for note in info["notes"])
    assert info["image_size"] == 64 and scorer.memory_format == torch.channels_last   # TrainConfig default


def test_fresh_efficientnet_model_uses_the_pretrained_teacher():
    scorer, info = build_scorer(method="dskd", options={"students": "encoder"}, image_size=64, fold=False)
    assert info["teacher_weights"] == "pretrained" and info["options"] == {"students": "encoder", "hard_share": 0.1}
    assert info["batchnorm_folded"] == 0
    reference = build_model("dskd", "efficientnet_lite0", {"students": "encoder"}, pretrained=True)
    first = next(iter(reference.teacher.state_dict().items()))
    assert torch.equal(scorer.model.teacher.state_dict()[first[0]], first[1])


def test_speed_measures_the_folded_model_predict_runs():
    images = torch.rand(1, 3, 64, 64)
    folded, info = build_scorer(method="dskd", image_size=64)
    plain, _ = build_scorer(method="dskd", image_size=64, fold=False)
    assert info["batchnorm_folded"] > 40
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.model.teacher.modules())
    with torch.no_grad():       # the same pretrained teacher, folded and not: the same features
        assert torch.allclose(folded.model.teacher(images)[0], plain.model.teacher(images)[0], rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    category = make_synthetic_dataset(root / "data", seed=3, n_train=8, n_test_good=2, n_test_defect=2, image_size=64)
    config = resolve_config("stfpm", overrides={"image_size": 64, "epochs": 1, "batch_size": 4})
    data = discover_mvtec(category, val_fraction=0.25, seed=0)
    train_run(config, data, root / "run", progress=False, log=lambda _: None)
    return root / "run"


def test_speed_of_a_run_uses_its_config(tiny_run):
    result = speed_report(run=tiny_run, threads=1, warmup=0, repeats=2, isolate=False)
    assert result["method"] == "stfpm" and result["image_size"] == 64 and result["teacher_weights"] == "from the run"
    resized = speed_report(run=tiny_run, image_size=128, threads=1, warmup=0, repeats=1, isolate=False)
    assert resized["image_size"] == 128 and any("trained at 64" in n for n in resized["notes"])


def test_cli_speed_runs_in_a_fresh_process_and_writes_the_keys(tmp_path, capsys):
    out = tmp_path / "speed.json"
    code = main(["speed", "--method", "rd", "--backbone", "efficientnet_lite0", "--image-size", "64", "--threads", "1",
                 "--warmup", "1", "--repeats", "3", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(out.read_text())
    for key in SPEED_KEYS:
        assert key in result and result[key] > 0
    assert result["threads"] == 1 and result["image_size"] == 64 and result["method"] == "rd"
    assert result["peak_rss_scope"].startswith("fresh process")
    assert 0 < result["runtime_rss_mb"] < result["peak_rss_mb"]
    assert "latency, batch 1" in captured.out and "GFLOPs" in captured.out


@pytest.mark.parametrize("argv,needle", [
    (["speed", "--run", "{tmp}/norun"], "norun"),
    (["speed", "--run", "{tmp}/norun", "--backbone", "resnet18"], "--method"),
    (["speed", "--method", "dskd", "--image-size", "100"], "multiple of 32"),
    (["speed", "--method", "dskd", "--option", "bogus=1"], "'bogus'"),
])
def test_cli_speed_errors_are_one_clear_line(tmp_path, capsys, argv, needle):
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
