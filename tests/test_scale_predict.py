"""`predict --engine ray` gives the local engine's files, byte for byte; list files and globs resolve like folders;
and every wrong combination of options ends in one line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import BOTTLE
from distillad.cli import main
from distillad.data.listing import resolve_inputs
from distillad.errors import DataError, RunError

pytest.importorskip("ray")


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nested folders of real bottle test images and one corrupt '.png' (not an image at all)."""
    if not BOTTLE.is_dir():
        pytest.skip(f"needs the shared bottle data in {BOTTLE}")
    root = tmp_path_factory.mktemp("tree") / "images"
    test = BOTTLE / "test"
    layout = {"good/000.png": "good/000.png", "good/001.png": "good/001.png",
              "defects/broken/large_000.png": "broken_large/000.png",
              "defects/broken/small/000.png": "broken_small/000.png",
              "defects/contamination/000.png": "contamination/000.png"}
    for target, source in layout.items():
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(test / source, root / target)
    (root / "defects" / "corrupt.png").write_bytes(b"these bytes are not a PNG image")
    return root


def predict_cli(run: Path, inputs: list[str], out: Path, *extra: str) -> int:
    """`distillad predict`, torch on 1 thread (the Ray actors' default: equal thread counts give equal sums)."""
    return main(["predict", "--run", str(run), *inputs, "--out", str(out), "--no-progress", "--threads", "1",
                 "--batch-size", "2", *extra])


def decoded_pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def assert_same_outputs(local: Path, ray: Path, *, images: bool = True) -> None:
    assert (ray / "predictions.csv").read_bytes() == (local / "predictions.csv").read_bytes()
    for folder in ("heatmaps", "masks") if images else ():
        expected, got = decoded_pngs(local / folder), decoded_pngs(ray / folder)
        assert sorted(got) == sorted(expected) and expected
        for name, pixels in expected.items():
            np.testing.assert_array_equal(got[name], pixels, err_msg=f"{folder}/{name}")


@pytest.mark.slow
def test_ray_engine_writes_what_local_writes(bottle_run: Path, image_tree: Path, tmp_path: Path) -> None:
    local, ray = tmp_path / "local", tmp_path / "ray"
    assert predict_cli(bottle_run, [str(image_tree)], local, "--runtime", "torch") == 1   # the corrupt file
    assert predict_cli(bottle_run, [str(image_tree)], ray, "--runtime", "torch", "--engine", "ray",
                       "--workers", "2", "--ray-cpus", "2") == 1
    assert_same_outputs(local, ray)
    lines = (ray / "predictions.csv").read_text().splitlines()
    assert len(lines) == 1 + 6
    corrupt = [line for line in lines if "corrupt.png" in line]
    assert len(corrupt) == 1 and ",,,error," in corrupt[0]
    assert {"normal", "defective"} <= {line.split(",")[3] for line in lines[1:]}
    # 3 batches of 2 over 2 actors: several shards, each a CSV with its header, together the rows of the CSV
    shards = sorted((ray / "shards").glob("part-*.csv"))
    assert len(shards) >= 2
    shard_rows = [line for shard in shards for line in shard.read_text().splitlines()[1:]]
    assert sorted(shard_rows) == sorted(lines[1:])
    assert not list(ray.glob(".predict-*"))                       # staging swapped in and removed
    # the user's results are not replaced without --overwrite, and are with it
    assert predict_cli(bottle_run, [str(image_tree)], ray, "--engine", "ray", "--runtime", "torch") == 2
    assert predict_cli(bottle_run, [str(image_tree / "good")], ray, "--engine", "ray", "--runtime", "torch",
                       "--workers", "1", "--overwrite") == 0
    assert len((ray / "predictions.csv").read_text().splitlines()) == 1 + 2
    assert len(list((ray / "heatmaps").glob("*.png"))) == 2       # the previous run's images are gone


@pytest.mark.slow
def test_ray_engine_on_onnxruntime_matches_local(bottle_run: Path, image_tree: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    local, ray = tmp_path / "local", tmp_path / "ray"
    assert predict_cli(bottle_run, [str(image_tree)], local, "--runtime", "onnxruntime") == 1
    assert predict_cli(bottle_run, [str(image_tree)], ray, "--runtime", "onnxruntime", "--engine", "ray",
                       "--workers", "2", "--ray-cpus", "2") == 1
    assert_same_outputs(local, ray)


def test_list_file_and_glob_resolve_like_the_folder(image_tree: Path, tmp_path: Path) -> None:
    folder = resolve_inputs([image_tree])
    assert len(folder) == 6
    listing = image_tree.parent / "inputs.txt"
    lines = ["# the tree, file by file", ""] + [f"  {p.relative_to(image_tree.parent)}  " for p in folder]
    listing.write_text("\n".join(lines) + "\n")
    assert resolve_inputs([f"@{listing}"]) == folder
    assert resolve_inputs([str(image_tree / "**" / "*.png")]) == folder
    mixed = tmp_path / "mixed.txt"   # a folder, a pattern and an absolute file, each once
    mixed.write_text(f"{image_tree / 'defects'}\n{image_tree / 'good' / '*.png'}\n{folder[0]}\n")
    assert sorted(resolve_inputs([f"@{mixed}"])) == sorted(folder)


def test_list_file_input_gives_the_folder_csv(bottle_run: Path, image_tree: Path, tmp_path: Path) -> None:
    listing = image_tree.parent / "inputs.txt"
    listing.write_text("\n".join(str(p.relative_to(image_tree.parent)) for p in resolve_inputs([image_tree])))
    assert predict_cli(bottle_run, [str(image_tree)], tmp_path / "a", "--runtime", "torch", "--no-images") == 1
    assert predict_cli(bottle_run, [f"@{listing}"], tmp_path / "b", "--runtime", "torch", "--no-images") == 1
    assert predict_cli(bottle_run, [str(image_tree / "**" / "*.png")], tmp_path / "c", "--runtime", "torch",
                       "--no-images") == 1
    expected = (tmp_path / "a" / "predictions.csv").read_bytes()
    assert (tmp_path / "b" / "predictions.csv").read_bytes() == expected
    assert (tmp_path / "c" / "predictions.csv").read_bytes() == expected


def test_input_errors_name_the_file(image_tree: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"list file .*missing\.txt does not exist"):
        resolve_inputs(["@" + str(tmp_path / "missing.txt")])
    with pytest.raises(DataError, match=r"matches no images"):
        resolve_inputs([str(image_tree / "**" / "*.jpg")])
    listing = tmp_path / "list.txt"
    listing.write_text("# header\n\nnot_there.png\n")
    with pytest.raises(DataError, match=r"list\.txt:3: .*not_there\.png does not exist"):
        resolve_inputs([f"@{listing}"])
    listing.write_text("# only a comment\n")
    with pytest.raises(DataError, match=r"names no paths"):
        resolve_inputs([f"@{listing}"])


@pytest.mark.parametrize("extra, message", [
    (["--workers", "2"], "--workers: only with --engine ray"),
    (["--address", "localhost:1"], "--address: only with --engine ray"),
    (["--engine", "ray", "--workers", "0"], "--workers must be >= 1"),
    (["--engine", "ray", "--address", "localhost:6379", "--ray-cpus", "2"], "--ray-cpus sizes a local Ray"),
])
def test_engine_option_errors_are_one_line(bottle_run: Path, image_tree: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str], extra: list[str],
                                           message: str) -> None:
    assert predict_cli(bottle_run, [str(image_tree)], tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_missing_ray_names_the_extra(bottle_run: Path, image_tree: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` raises ImportError
    assert predict_cli(bottle_run, [str(image_tree)], tmp_path / "out", "--engine", "ray") == 2
    err = capsys.readouterr().err
    assert "pip install 'distillad[ray]'" in err and err.count("\n") == 1


def test_ray_engine_refuses_existing_results_before_starting_ray(bottle_run: Path, image_tree: Path,
                                                                 tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                                 ) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.csv").write_text("mine\n")
    assert predict_cli(bottle_run, [str(image_tree)], out, "--engine", "ray", "--runtime", "torch") == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "predictions.csv").read_text() == "mine\n"


def test_merge_keeps_input_order_and_each_row_once(tmp_path: Path) -> None:
    from distillad.scale.ray_predict import merge_shards

    paths = [Path(f"/data/{name}.png") for name in ("b", "a", "c", "d")]   # input order, not sorted
    shards = tmp_path / "shards"
    shards.mkdir()
    header = "path,score,normalized_score,label,error\r\n"
    row = {p: f"{p},0.5,0.4000,normal,\r\n" for p in paths}
    (shards / "part-0000000002.csv").write_text(header + row[paths[2]] + row[paths[3]], newline="")
    (shards / "part-0000000000.csv").write_text(header + row[paths[0]] + row[paths[1]], newline="")
    (shards / "part-0000000001.csv").write_text(header + row[paths[1]], newline="")   # a retried batch
    merge_shards(shards, paths, tmp_path / "predictions.csv")
    assert (tmp_path / "predictions.csv").read_bytes() == (header + "".join(row[p] for p in paths)).encode()
    (shards / "part-0000000002.csv").unlink()
    with pytest.raises(RunError, match=r"miss the row of /data/c\.png"):
        merge_shards(shards, paths, tmp_path / "predictions.csv")


def test_import_distillad_does_not_import_ray() -> None:
    code = ("import sys, distillad, distillad.api, distillad.cli, distillad.scale.ray_predict; "
            "sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
