"""Tests for distillad.data: image/mask readers, discovery, the Dataset, and the synthetic demo set."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from distillad.data import (
    CategorySplit,
    DataError,
    ImageDataset,
    Sample,
    discover,
    discover_folder,
    discover_mvtec,
    list_images,
    load_category,
    load_image,
    load_mask,
    make_synthetic_dataset,
    preload,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ------------------------------------------------------------------------------------------------ helpers


def _save(arr_or_img, path: Path, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img, mode) if mode else Image.fromarray(arr_or_img)
    im.save(path)
    return path


def _rgb(path: Path, hw=(12, 10), value=(10, 20, 30)) -> Path:
    return _save(np.full((*hw, 3), value, np.uint8), path)


def _mask(path: Path, hw=(12, 10), on: bool = True) -> Path:
    m = np.zeros(hw, np.uint8)
    if on:
        m[2:5, 3:6] = 255
    return _save(m, path)


def _mvtec_tree(root: Path, n_train: int = 10, n_good: int = 2, defects=(("crack", 3), ("hole", 2)), masks: bool = True) -> Path:
    """A tiny MVTec AD category with 12x10 images."""
    for i in range(n_train):
        _rgb(root / "train" / "good" / f"{i:03d}.png", value=(i, i, i))
    for i in range(n_good):
        _rgb(root / "test" / "good" / f"{i:03d}.png")
    for dtype, n in defects:
        for i in range(n):
            _rgb(root / "test" / dtype / f"{i:03d}.png", value=(200, 0, 0))
            if masks:
                _mask(root / "ground_truth" / dtype / f"{i:03d}_mask.png")
    return root


# ------------------------------------------------------------------------------------------------ images


def test_load_image_rgb_l_and_resize(tmp_path: Path) -> None:
    p = _rgb(tmp_path / "a.png", hw=(30, 20), value=(255, 128, 0))
    t = load_image(p, 8)
    assert t.shape == (3, 8, 8) and t.dtype == torch.float32
    assert torch.allclose(t[:, 4, 4], torch.tensor([1.0, 128 / 255, 0.0]), atol=1e-6)
    assert load_image(p, (5, 7)).shape == (3, 5, 7)
    assert load_image(p, None).shape == (3, 30, 20)

    grey = _save(np.tile(np.linspace(0, 255, 16).astype(np.uint8), (16, 1)), tmp_path / "g.jpg")
    g = load_image(grey, 8)
    assert g.shape == (3, 8, 8)
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    # a horizontal ramp stays a ramp after bilinear downsizing, and stays within [0, 1]
    assert (g[0, 4, 1:] >= g[0, 4, :-1]).all() and g.min() >= 0 and g.max() <= 1


def test_load_image_downsize_is_antialiased(tmp_path: Path) -> None:
    # A 1-pixel checkerboard averages to ~0.5 with antialiasing; point sampling would give 0 or 1.
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    t = load_image(_save(board, tmp_path / "c.png"), 8)
    assert torch.allclose(t, torch.full_like(t, 0.5), atol=0.02)


def test_load_image_alpha_is_composited_on_black(tmp_path: Path) -> None:
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., :3] = (200, 100, 50)
    a[:2, :, 3] = 255  # opaque top half
    a[2:, :2, 3] = 0  # transparent
    a[2:, 2:, 3] = 128  # half transparent
    t = load_image(_save(a, tmp_path / "rgba.png"), None)
    assert torch.allclose(t[:, 0, 0], torch.tensor([200, 100, 50]) / 255.0)
    assert torch.equal(t[:, 3, 0], torch.zeros(3))
    assert torch.allclose(t[:, 3, 3], torch.tensor([200, 100, 50]) / 255.0 * 128 / 255, atol=1 / 255)

    la = np.stack([np.full((4, 4), 200, np.uint8), np.full((4, 4), 255, np.uint8)], -1)
    la[0, 0, 1] = 0
    t = load_image(_save(Image.fromarray(la, "LA"), tmp_path / "la.png"), 4)
    assert t.shape == (3, 4, 4)
    assert torch.allclose(t[:, 1, 1], torch.full((3,), 200 / 255))
    assert torch.equal(t[:, 0, 0], torch.zeros(3))


def test_load_image_palette_and_bilevel(tmp_path: Path) -> None:
    p = Image.new("P", (6, 6), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    t = load_image(_save(p, tmp_path / "p.png"), 3)
    assert torch.allclose(t[:, 1, 1], torch.tensor([10, 200, 30]) / 255.0)

    p2 = Image.new("P", (4, 4), 1)
    p2.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p2.info["transparency"] = 1
    t2 = load_image(_save(p2, tmp_path / "pt.png").__fspath__(), None)  # transparent palette entry -> black
    assert torch.equal(t2, torch.zeros(3, 4, 4))

    b = Image.new("1", (8, 8), 0)
    b.putpixel((0, 0), 1)
    t = load_image(_save(b, tmp_path / "b.png"), None)
    assert t[:, 0, 0].tolist() == [1.0, 1.0, 1.0] and t[:, 5, 5].tolist() == [0.0, 0.0, 0.0]


def test_load_image_16bit_32bit_and_float(tmp_path: Path) -> None:
    a = np.array([[0, 32768], [65535, 1000]], np.uint16)
    t = load_image(_save(a, tmp_path / "16.png"), None)  # PNG 16-bit grey opens as I;16
    assert t.shape == (3, 2, 2)
    assert t[0, 1, 0] == 1.0 and t[0, 0, 0] == 0.0
    assert abs(t[0, 0, 1].item() - 32768 / 65535) < 1e-6
    assert abs(t[0, 1, 1].item() - 1000 / 65535) < 1e-7  # no 8-bit quantisation
    # resizing a uniform 16-bit image keeps the exact value (float path)
    u = load_image(_save(np.full((9, 7), 1000, np.uint16), tmp_path / "u16.png"), (4, 3))
    assert torch.allclose(u, torch.full((3, 4, 3), 1000 / 65535), atol=1e-7)

    big = Image.frombytes("I;16B", (2, 2), a.astype(">u2").tobytes())
    tb = load_image(_save(big, tmp_path / "16b.tif"), None)
    assert torch.allclose(tb[0], torch.from_numpy(a / 65535.0).float(), atol=1e-6)

    i32 = np.array([[0, 65535], [70000, -5]], np.int32)  # out of range -> clipped
    ti = load_image(_save(i32, tmp_path / "i.tif"), 4)
    assert ti.shape == (3, 4, 4) and ti.min() >= 0 and ti.max() <= 1
    assert load_image(tmp_path / "i.tif", None)[0].tolist() == [[0.0, 1.0], [1.0, 0.0]]

    f = np.array([[0.25, 0.75], [1.5, np.nan]], np.float32)
    tf = load_image(_save(f, tmp_path / "f.tif"), None)
    assert tf[0].tolist() == [[0.25, 0.75], [1.0, 0.0]]


def test_load_mask_modes_and_nearest_resize(tmp_path: Path) -> None:
    m = np.zeros((8, 8), np.uint8)
    m[:4, :4] = 255
    mk = load_mask(_save(m, tmp_path / "m.png"), 4)
    assert mk.dtype == torch.bool and mk.shape == (4, 4)
    assert mk[:2, :2].all() and not mk[2:, :].any() and not mk[:, 2:].any()

    low = np.zeros((5, 5), np.uint8)
    low[2, 2] = 1  # anything > 0 is defect
    assert load_mask(_save(low, tmp_path / "low.png"), None).sum() == 1

    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[1, 1, 2] = 9  # only the blue channel
    assert load_mask(_save(rgb, tmp_path / "rgb.png"), None).nonzero().tolist() == [[1, 1]]

    pal = Image.new("P", (6, 6), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((4, 3), 1)
    assert load_mask(_save(pal, tmp_path / "pal.png"), None).nonzero().tolist() == [[3, 4]]

    m16 = np.zeros((6, 6), np.uint16)
    m16[0, 5] = 300
    assert load_mask(_save(m16, tmp_path / "m16.png"), (6, 6)).nonzero().tolist() == [[0, 5]]
    # resized masks stay strictly binary and non-square targets work
    r = load_mask(tmp_path / "m.png", (3, 5))
    assert r.shape == (3, 5) and r.dtype == torch.bool


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated", "missing", "folder"])
def test_unreadable_files_raise_dataerror_naming_file(tmp_path: Path, kind: str) -> None:
    p = tmp_path / f"bad_{kind}.png"
    if kind == "garbage":
        p.write_bytes(b"this is not a png at all" * 10)
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "truncated":
        _save(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8), p)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif kind == "folder":
        p.mkdir()
    for fn in (load_image, load_mask):
        with pytest.raises(DataError, match=p.name) as ei:
            fn(p, 8)
        assert str(p) in str(ei.value)
    if kind == "empty":
        assert "empty" in str(ei.value)


# ------------------------------------------------------------------------------------------------ discovery


def test_discover_mvtec_counts_labels_masks(tmp_path: Path) -> None:
    root = _mvtec_tree(tmp_path / "widget")
    (root / "train" / "good" / ".DS_Store").write_bytes(b"x")  # hidden: ignored silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split = discover_mvtec(root)
    assert isinstance(split, CategorySplit) and split.name == "widget"
    assert len(split.train) == 9 and len(split.val) == 1  # round(0.1 * 10)
    assert len(split.test) == 7
    assert [s.defect_type for s in split.test] == ["crack"] * 3 + ["good"] * 2 + ["hole"] * 2
    for s in split.test:
        assert s.label == (s.defect_type != "good")
        if s.label:
            assert s.mask_path == root / "ground_truth" / s.defect_type / f"{s.path.stem}_mask.png"
        else:
            assert s.mask_path is None
    assert all(s.label == 0 and s.defect_type == "good" and s.mask_path is None for s in split.train + split.val)
    assert split.defect_types == ["crack", "hole"]
    assert load_category(root).test == split.test
    assert discover is load_category  # the earlier name still works


def test_val_split_seeded_deterministic_disjoint(tmp_path: Path) -> None:
    root = _mvtec_tree(tmp_path / "w", n_train=20)
    all_paths = sorted((root / "train" / "good").iterdir())
    np.random.seed(1)
    random.seed(1)
    a = discover_mvtec(root, val_fraction=0.25, seed=3)
    np.random.seed(999)  # global state must not matter ...
    state = np.random.get_state()[1].copy()
    b = discover_mvtec(root, val_fraction=0.25, seed=3)
    assert np.array_equal(state, np.random.get_state()[1])  # ... nor change
    assert a.train == b.train and a.val == b.val
    assert len(a.val) == 5 and len(a.train) == 15
    tr, va = {s.path for s in a.train}, {s.path for s in a.val}
    assert not tr & va and tr | va == set(all_paths)
    assert [s.path for s in a.train] == sorted(tr)  # sorted order kept
    others = {tuple(s.path for s in discover_mvtec(root, val_fraction=0.25, seed=k).val) for k in range(4, 9)}
    assert len(others) > 1  # the seed matters
    assert discover_mvtec(root, val_fraction=0.0).val == []
    assert len(discover_mvtec(root, val_fraction=0.01).val) == 1  # at least one when n >= 2
    one = _mvtec_tree(tmp_path / "one", n_train=1)
    assert len(discover_mvtec(one).train) == 1  # never leaves training empty
    with pytest.raises(ValueError):
        discover_mvtec(root, val_fraction=1.0)


def test_validation_folder_used_when_present(tmp_path: Path) -> None:
    root = _mvtec_tree(tmp_path / "w", n_train=6)
    for i in range(3):
        _rgb(root / "validation" / "good" / f"v{i}.png")
    split = discover_mvtec(root, val_fraction=0.5)
    assert len(split.train) == 6 and [s.path.name for s in split.val] == ["v0.png", "v1.png", "v2.png"]


def test_mvtec3d_rgb_layout(tmp_path: Path) -> None:
    root = tmp_path / "cookie"
    for i in range(4):
        _rgb(root / "train" / "good" / "rgb" / f"{i:03d}.png")
        _save(np.zeros((12, 10), np.float32), root / "train" / "good" / "xyz" / f"{i:03d}.tiff")
    _rgb(root / "validation" / "good" / "rgb" / "000.png")
    _rgb(root / "test" / "good" / "rgb" / "000.png")
    _rgb(root / "test" / "crack" / "rgb" / "000.png")
    _mask(root / "test" / "crack" / "gt" / "000.png")
    split = load_category(root)
    assert len(split.train) == 4 and len(split.val) == 1
    assert all(s.path.parent.name == "rgb" for s in split.train + split.test)
    crack = [s for s in split.test if s.label == 1]
    assert len(crack) == 1 and crack[0].mask_path == root / "test" / "crack" / "gt" / "000.png"


def test_missing_mask_error_and_warning(tmp_path: Path) -> None:
    root = _mvtec_tree(tmp_path / "w")
    (root / "ground_truth" / "hole" / "001_mask.png").unlink()
    img = root / "test" / "hole" / "001.png"
    with pytest.raises(DataError) as ei:
        discover_mvtec(root)
    msg = str(ei.value)
    assert str(img) in msg and "001_mask.png" in msg
    # what to do, from the command line (no flag there) and from Python
    assert "ground_truth/<defect type>/<stem>_mask.png" in msg and "remove" in msg and "require_masks=False" in msg
    with pytest.warns(UserWarning, match="001.png"):
        split = discover_mvtec(root, require_masks=False)
    s = next(s for s in split.test if s.path == img)
    assert s.label == 1 and s.mask_path is None
    ds = ImageDataset([s], 8)
    item = ds[0]
    assert item["label"] == 1 and item["has_mask"] is False and not item["mask"].any()


def test_bad_layouts_raise_dataerror_naming_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="nope"):
        discover_mvtec(missing)
    with pytest.raises(DataError, match="nope"):
        load_category(missing)

    no_train = tmp_path / "no_train"
    _rgb(no_train / "test" / "good" / "a.png")
    with pytest.raises(DataError, match="train/good") as ei:
        discover_mvtec(no_train)
    assert str(no_train) in str(ei.value)
    with pytest.raises(DataError, match="MVTec") as ei:
        load_category(no_train)
    assert "plain folder" in str(ei.value) and str(no_train) in str(ei.value)  # both accepted layouts are explained

    empty = tmp_path / "empty"
    (empty / "train" / "good").mkdir(parents=True)
    (empty / "train" / "good" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="no images") as ei:
        discover_mvtec(empty)
    assert str(empty / "train" / "good") in str(ei.value)

    parent = tmp_path / "dataset"
    _mvtec_tree(parent / "bottle", n_train=2)
    with pytest.raises(DataError, match="bottle"):  # a dataset root: tell the user to pick a category
        load_category(parent)


def test_load_category_mvtec_layout(tmp_path: Path) -> None:
    root = _mvtec_tree(tmp_path / "widget", n_train=8)
    split = load_category(root, val_fraction=0.25, seed=2)
    assert split == discover_mvtec(root, val_fraction=0.25, seed=2)
    assert split.name == "widget" and len(split.train) == 6 and len(split.val) == 2 and len(split.test) == 7
    (root / "ground_truth" / "crack" / "000_mask.png").unlink()
    with pytest.raises(DataError, match="000_mask.png"):
        load_category(root)
    with pytest.warns(UserWarning, match="000.png"):
        assert len(load_category(root, require_masks=False).test) == 7
    # validation/ alone also means the MVTec layout: the missing train/good is then the error
    only_val = tmp_path / "only_val"
    _rgb(only_val / "validation" / "good" / "v.png")
    with pytest.raises(DataError, match="train/good"):
        load_category(only_val)


def test_load_category_plain_folder(tmp_path: Path) -> None:
    folder = tmp_path / "parts" / "good"
    for i in range(5):
        _rgb(folder / f"{i}.png", value=(i, 0, 0))
    _rgb(folder / "nested" / "deeper.png")  # plain folders are flat: sub-folders are not read
    split = load_category(folder, val_fraction=0.4, seed=1)
    assert split == discover_folder(folder, val_fraction=0.4, seed=1)
    assert split.name == "parts" and split.test == []
    assert len(split.train) == 3 and len(split.val) == 2
    assert sorted(s.path.name for s in split.train + split.val) == [f"{i}.png" for i in range(5)]
    assert all(s.label == 0 and s.mask_path is None for s in split.train + split.val)


def test_load_category_missing_path_or_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as ei:
        load_category(tmp_path / "ghost")
    assert str(tmp_path / "ghost") in str(ei.value)
    image = _rgb(tmp_path / "one.png")
    with pytest.raises(DataError, match="is not a folder") as ei:
        load_category(image)
    assert str(image) in str(ei.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images") as ei:
        load_category(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(ei.value)


def test_non_image_files_warned_once(tmp_path: Path) -> None:
    root = _mvtec_tree(tmp_path / "w")
    (root / "train" / "good" / "readme.txt").write_text("x")
    (root / "test" / "crack" / "Thumbs.db").write_bytes(b"x")
    with pytest.warns(UserWarning) as rec:
        split = discover_mvtec(root)
    msgs = [str(r.message) for r in rec if "non-image" in str(r.message)]
    assert len(msgs) == 1 and "readme.txt" in msgs[0] and "Thumbs.db" in msgs[0]
    assert len(split.train) + len(split.val) == 10


def test_discover_folder_generic(tmp_path: Path) -> None:
    for i in range(5):
        _rgb(tmp_path / "ok" / f"n{i}.jpg")
    for i in range(2):
        _rgb(tmp_path / "ok_test" / f"t{i}.png")
    _rgb(tmp_path / "bad" / "b0.png")  # flat -> defect type "bad"
    _rgb(tmp_path / "bad" / "dent" / "d0.png")
    _rgb(tmp_path / "bad" / "dent" / "d1.bmp")
    _mask(tmp_path / "masks" / "b0_mask.png")
    _mask(tmp_path / "masks" / "dent" / "d0.png")  # <stem>.png in a per-type folder
    with pytest.warns(UserWarning, match="d1.bmp"):
        split = discover_folder(
            tmp_path / "ok", abnormal_dir=tmp_path / "bad", mask_dir=tmp_path / "masks", test_normal_dir=tmp_path / "ok_test"
        )
    assert split.name == tmp_path.name  # "ok" says nothing, so the parent folder names the category
    assert discover_folder(tmp_path / "ok", name="tiles").name == "tiles"
    assert len(split.train) == 4 and len(split.val) == 1  # round(0.5) -> at least 1
    goods = [s for s in split.test if s.label == 0]
    bads = {s.path.name: s for s in split.test if s.label == 1}
    assert len(goods) == 2 and set(bads) == {"b0.png", "d0.png", "d1.bmp"}
    assert bads["b0.png"].defect_type == "bad" and bads["b0.png"].mask_path == tmp_path / "masks" / "b0_mask.png"
    assert bads["d0.png"].defect_type == "dent" and bads["d0.png"].mask_path == tmp_path / "masks" / "dent" / "d0.png"
    assert bads["d1.bmp"].mask_path is None
    with pytest.raises(DataError, match="d1.bmp"):
        discover_folder(tmp_path / "ok", abnormal_dir=tmp_path / "bad", mask_dir=tmp_path / "masks", require_masks=True)

    only = discover_folder(tmp_path / "ok", val_fraction=0.4, seed=1)
    assert only.test == [] and len(only.val) == 2
    with pytest.raises(DataError, match="also used"):
        discover_folder(tmp_path / "ok", abnormal_dir=tmp_path / "ok")
    with pytest.raises(DataError, match="missing_dir"):
        discover_folder(tmp_path / "missing_dir")


def test_list_images(tmp_path: Path) -> None:
    _rgb(tmp_path / "d" / "b.png")
    _rgb(tmp_path / "d" / "sub" / "a.JPG")
    _rgb(tmp_path / "d" / ".hidden" / "c.png")
    (tmp_path / "d" / "notes.txt").write_text("x")
    single = _rgb(tmp_path / "z.png")
    got = list_images([tmp_path / "d", single, str(single)])
    assert got == [tmp_path / "d" / "b.png", tmp_path / "d" / "sub" / "a.JPG", single]
    assert list_images(str(single)) == [single]
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match="no images"):
        list_images(tmp_path / "e")
    with pytest.raises(DataError, match="ghost"):
        list_images(tmp_path / "ghost.png")
    with pytest.raises(DataError, match="notes.txt"):
        list_images(tmp_path / "d" / "notes.txt")


# ------------------------------------------------------------------------------------------------ dataset


def test_image_dataset_items_cache_and_collate(tmp_path: Path) -> None:
    root = _mvtec_tree(tmp_path / "w", n_train=3)
    split = discover_mvtec(root, val_fraction=0.0)
    ds = ImageDataset(split.test, 6)
    assert len(ds) == 7
    crack = ds[0]
    assert set(crack) == {"image", "mask", "label", "index", "has_mask", "box"}
    assert crack["box"].tolist() == [0, 0, 6, 6]           # stretched: the image fills its input
    assert crack["image"].shape == (3, 6, 6) and crack["image"].dtype == torch.float32
    assert crack["mask"].shape == (6, 6) and crack["mask"].dtype == torch.bool and crack["mask"].any()
    assert crack["label"] == 1 and crack["index"] == 0 and crack["has_mask"] is True
    good = ds[3]
    assert good["label"] == 0 and good["has_mask"] is True and not good["mask"].any()
    assert ds[-1]["index"] == 6

    # cached: the files are no longer needed after the first load
    ds.samples[0].path.unlink()
    assert torch.equal(ds[0]["image"], crack["image"])
    with pytest.raises(DataError):
        ImageDataset(split.test, 6, cache=False)[0]

    train = preload(ImageDataset(split.train, 5), progress=False)
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=3)))
    assert batch["image"].shape == (3, 3, 5, 5) and batch["label"].tolist() == [0, 0, 0]
    assert torch.allclose(batch["image"][2, :, 0, 0], torch.full((3,), 2 / 255))
    assert train.samples[1].path.name == "001.png"


def test_image_dataset_mask_size_mismatch(tmp_path: Path) -> None:
    img = _rgb(tmp_path / "i.png", hw=(12, 10))
    msk = _mask(tmp_path / "i_mask.png", hw=(10, 12))
    s = Sample(img, 1, "crack", msk)
    with pytest.raises(DataError) as ei:
        ImageDataset([s], 8)
    msg = str(ei.value)
    assert str(img) in msg and str(msk) in msg and "10x12" in msg and "12x10" in msg
    assert ImageDataset([s], 8, check_masks=False)[0]["mask"].shape == (8, 8)


def test_image_dataset_warns_on_empty_defect_mask(tmp_path: Path) -> None:
    img = _rgb(tmp_path / "i.png")
    msk = _mask(tmp_path / "i_mask.png", on=False)
    ds = ImageDataset([Sample(img, 1, "uneven", msk)], 8)
    with pytest.warns(UserWarning, match="i_mask.png"):
        item = ds[0]
    assert item["label"] == 1 and item["has_mask"] is True and not item["mask"].any()


# ------------------------------------------------------------------------------------------------ synthetic


def test_synthetic_dataset_deterministic_and_discoverable(tmp_path: Path) -> None:
    kw = dict(seed=5, n_train=4, n_test_good=2, n_test_defect=5, image_size=64)
    a = make_synthetic_dataset(tmp_path / "a", **kw)
    b = make_synthetic_dataset(tmp_path / "b", **kw)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    c = make_synthetic_dataset(tmp_path / "c", **{**kw, "seed": 6})
    assert (a / "train/good/000.png").read_bytes() != (c / "train/good/000.png").read_bytes()

    split = discover_mvtec(a)
    assert len(split.train) + len(split.val) == 4
    assert sorted(split.defect_types) == ["contamination", "crack", "scratch", "spot"]
    bad = [s for s in split.test if s.label == 1]
    assert len(bad) == 5 and len(split.test) == 7
    for s in bad:
        m = load_mask(s.mask_path, None)
        assert m.shape == (64, 64) and 0 < m.float().mean() < 0.25
        assert set(np.unique(np.asarray(Image.open(s.mask_path)))) <= {0, 255}
    img = load_image(split.train[0].path, None)
    assert img.shape == (3, 64, 64) and 0.2 < img.mean() < 0.8 and img.std() > 0.01
    # regenerating into the same folder replaces it; a foreign folder is refused
    assert make_synthetic_dataset(tmp_path / "a", **kw) == a
    (tmp_path / "d" / "synthetic_surface").mkdir(parents=True)
    (tmp_path / "d" / "synthetic_surface" / "mine.txt").write_text("keep")
    with pytest.raises(DataError, match="refusing"):
        make_synthetic_dataset(tmp_path / "d", **kw)


def test_synthetic_defects_are_visible(tmp_path: Path) -> None:
    """Defect pixels must differ clearly from their surroundings, else no detector can find them."""
    root = make_synthetic_dataset(tmp_path, seed=0, n_train=1, n_test_good=0, n_test_defect=8, image_size=96)
    for s in [s for s in discover_mvtec(root).test if s.label == 1]:
        img = load_image(s.path, None)
        m = load_mask(s.mask_path, None)
        inside = img[:, m].mean(1)
        grown = Image.fromarray(m.numpy().astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(7))
        ring = torch.from_numpy(np.asarray(grown) > 0) & ~m
        outside = img[:, ring].mean(1)
        assert (inside - outside).abs().max() > 0.08, s.path


# ------------------------------------------------------------------------------------------------ real data


@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
def test_real_datasets_discover_and_load() -> None:
    bottle = discover_mvtec(SHARED_DATA / "mvtec_ad" / "bottle")
    assert len(bottle.train) + len(bottle.val) == 209 and len(bottle.val) == 21
    assert len(bottle.test) == 83
    assert sum(s.label == 0 for s in bottle.test) == 20 and sum(s.label for s in bottle.test) == 63
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in bottle.test if s.label)
    ds = ImageDataset([bottle.train[0], next(s for s in bottle.test if s.label)], 64)
    items = [ds[0], ds[1]]
    assert items[0]["image"].shape == (3, 64, 64) and items[0]["image"].std() > 0.05
    assert items[1]["mask"].any() and items[1]["has_mask"]

    mt = discover_mvtec(SHARED_DATA / "mt" / "magnetic_tile")
    assert len(mt.train) + len(mt.val) == 762
    assert sum(s.label == 0 for s in mt.test) == 190 and sum(s.label for s in mt.test) == 392
    defective = ImageDataset([s for s in mt.test if s.label], 16, cache=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small blowhole vanishes at 16x16, which is warned about
        g = defective[0]["image"]
    assert g.shape == (3, 16, 16)
    assert torch.equal(g[0], g[1])  # grey JPEG repeated to 3 channels
    uneven = ImageDataset([s for s in mt.test if s.defect_type == "uneven"], 16, cache=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        n_empty = sum(not uneven[i]["mask"].any() for i in range(len(uneven)))
    empty = [str(r.message) for r in rec if "is empty" in str(r.message)]
    assert len(empty) == 4 and n_empty >= 4 and all("uneven" in m for m in empty)


def test_letterbox_keeps_the_aspect_ratio_and_mirrors_the_rest() -> None:
    from distillad.data.images import content_box, resize_image_array

    assert content_box(100, 200, 64, "letterbox") == (16, 0, 32, 64)
    assert content_box(200, 100, 64, "letterbox") == (0, 16, 64, 32)
    assert content_box(90, 90, 64, "letterbox") == (0, 0, 64, 64)
    assert content_box(100, 200, 64) == (0, 0, 64, 64)                   # stretch: the whole input
    image = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)       # 2 rows x 4 columns: fits 4x4 unscaled
    boxed = resize_image_array(image, 4, "letterbox")
    assert boxed.shape == (4, 4, 3)
    assert np.array_equal(boxed[1:3], image)                             # centred, unchanged
    assert np.array_equal(boxed[0], image[0]) and np.array_equal(boxed[3], image[1])   # mirrored at the edges
    square = np.random.default_rng(0).integers(0, 256, (9, 9, 3), dtype=np.uint8)
    assert np.array_equal(resize_image_array(square, 6, "letterbox"), resize_image_array(square, 6))
    with pytest.raises(ValueError, match="resize must be one of"):
        resize_image_array(image, 4, "crop")


def test_a_letterboxed_dataset_keeps_masks_in_the_stretched_frame(tmp_path: Path) -> None:
    """Images are letterboxed for the model; masks, hence metrics, stay in the frame every run is evaluated in."""
    image = np.zeros((20, 40, 3), dtype=np.uint8)
    image[:, 20:] = 200                                    # the right half is bright, and is the defect
    Image.fromarray(image).save(tmp_path / "wide.png")
    mask = np.zeros((20, 40), dtype=np.uint8)
    mask[:, 20:] = 255
    Image.fromarray(mask).save(tmp_path / "wide_mask.png")
    sample = Sample(tmp_path / "wide.png", 1, "bright", tmp_path / "wide_mask.png")
    item = ImageDataset([sample], 8, resize="letterbox")[0]
    assert item["box"].tolist() == [2, 0, 4, 8]           # 20x40 scaled by 0.2 to 4x8, centred in 8x8
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:, 4:] = True
    assert torch.equal(item["mask"], expected)
    # the bright half: in the content rows 2-5 and mirrored above and below them (column 4 blends the edge)
    assert torch.allclose(item["image"][0, :, 5:], torch.full((8, 3), 200 / 255))
    assert torch.allclose(item["image"][0, :, :3], torch.zeros(8, 3))
    with pytest.raises(ValueError, match="resize must be one of"):
        ImageDataset([sample], 8, resize="crop")
