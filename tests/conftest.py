"""Shared fixtures for the deployment tests: one tiny DSKD run on real bottle images, exported once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BOTTLE = SHARED_DATA / "mvtec_ad" / "bottle"


@pytest.fixture(scope="session", autouse=True)
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`--runtime` caches exported graphs; tests keep theirs out of the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("distillad_cache")
    previous = os.environ.get("DISTILLAD_CACHE_DIR")
    os.environ["DISTILLAD_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("DISTILLAD_CACHE_DIR", None)
    else:
        os.environ["DISTILLAD_CACHE_DIR"] = previous


def bottle_images() -> list[Path]:
    """Two good and four defective bottle test images (three defect types)."""
    test = BOTTLE / "test"
    return [test / "good" / "000.png", test / "good" / "001.png", test / "broken_large" / "000.png",
            test / "broken_small" / "000.png", test / "contamination" / "000.png", test / "contamination" / "001.png"]


@pytest.fixture(scope="session")
def bottle_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DSKD run on 24 bottle training images at 64 px, 24 steps, one thread: seconds to train, and enough to
    tell the test images' good bottles from the broken ones."""
    if not BOTTLE.is_dir():
        pytest.skip(f"needs the shared bottle data in {BOTTLE}")
    import torch

    import distillad
    from distillad.data import CategorySplit, load_category

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        split = load_category(BOTTLE)
        small = CategorySplit(split.name, split.train[:24], split.val[:8], [])
        out = tmp_path_factory.mktemp("runs") / "bottle64"
        distillad.train(small, out=out, method="dskd", image_size=64, epochs=8, batch_size=8, progress=False,
                        log=lambda *_: None)
    finally:
        torch.set_num_threads(previous)
    return out


@pytest.fixture(scope="session")
def bottle_onnx(bottle_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run exported with `distillad export` (fp32 ONNX + contract)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from distillad.deploy.export import export_run

    out = tmp_path_factory.mktemp("export") / "bottle64.onnx"
    export_run(bottle_run, out, threads=1, log=lambda *_: None)
    return out
