"""Synthetic anomalies: foreground restriction, the blend formula, probability, determinism, textures, coverage."""

import numpy as np
import pytest
import torch
from PIL import Image

from distillad.cli import main
from distillad.data import DataError, make_synthetic_dataset
from distillad.data.anomalies import AnomalyGenerator, estimate_foreground, perlin_noise, save_anomaly_grid
from distillad.data.anomalies import generator as G
from distillad.data.anomalies import textures as T


def disk_images(n=4, size=64, *, dark_object=False, seed=0):
    """An object on a plain backdrop: a textured disk (radius 0.3 of the side) in the middle."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disk = (((yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2) < (0.3 * size) ** 2).float()
    background, obj = (0.85, 0.25) if dark_object else (0.05, 0.7)
    texture = obj + 0.1 * torch.rand(n, 3, size, size, generator=g)
    images = background * (1 - disk) + texture * disk
    return images.clamp(0, 1), disk


def test_auto_foreground_finds_the_object_either_polarity_and_whole_textures():
    for dark in (False, True):
        images, disk = disk_images(dark_object=dark)
        fg = estimate_foreground(images)
        assert fg.shape == (4, 1, 64, 64) and set(fg.unique().tolist()) <= {0.0, 1.0}
        iou = (fg[:, 0] * disk).sum() / ((fg[:, 0] + disk) > 0).sum()
        assert iou > 0.9
    noise = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert estimate_foreground(noise).eq(1).all()                     # a texture: everywhere
    assert estimate_foreground(torch.full((2, 3, 32, 32), 0.5)).eq(1).all()  # uniform: everywhere


def test_masks_stay_inside_the_foreground():
    images, disk = disk_images(n=8)
    gen = AnomalyGenerator(64, probability=1.0, seed=3)
    total = 0.0
    for _ in range(10):
        result = gen.generate(images)
        assert (result.masks * (1 - result.foreground)).sum() == 0
        assert (result.masks[:, 0] * (1 - disk)).sum() == 0
        total += result.masks.sum().item()
    assert total > 0
    # a caller's foreground and a fixed user mask win over the automatic one
    own = torch.zeros(8, 1, 64, 64)
    own[..., :32, :] = 1
    out, masks = gen(images, foreground=own)
    assert (masks * (1 - own)).sum() == 0 and masks.sum() > 0
    fixed = torch.zeros(64, 64)
    fixed[:, 40:] = 1
    out, masks = AnomalyGenerator(64, probability=1.0, foreground="mask", foreground_mask=fixed, seed=0)(images)
    assert masks[..., :40].sum() == 0 and masks.sum() > 0


def test_blend_bounds_and_formula():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 48, 48)
    result = AnomalyGenerator(48, probability=1.0, foreground="whole", seed=5).generate(images)
    out, m = result.images, result.masks
    assert out.shape == images.shape and m.shape == (8, 1, 48, 48)
    assert set(m.unique().tolist()) == {0.0, 1.0}
    assert out.min() >= 0 and out.max() <= 1
    outside = (m == 0).expand_as(images)
    assert torch.equal(out[outside], images[outside])                   # untouched, bit for bit
    beta = result.beta.view(-1, 1, 1, 1)
    assert ((result.beta >= 0) & (result.beta < 0.8)).all()
    expected = (1 - beta) * result.textures + beta * images
    inside = (m > 0).expand_as(images)
    assert torch.allclose(out[inside], expected.expand_as(images)[inside], atol=1e-6)
    assert (out[inside] - images[inside]).abs().mean() > 0.01            # visibly changed


def test_clean_image_probability():
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    gen = AnomalyGenerator(32, foreground="whole", seed=11)              # default probability 0.8
    applied, empty = [], []
    for _ in range(50):                                                  # 400 draws
        result = gen.generate(images)
        applied.append(result.applied)
        empty.append(result.masks.flatten(1).sum(1) == 0)
        clean = ~result.applied
        assert torch.equal(result.images[clean], images[clean])
    applied, empty = torch.cat(applied), torch.cat(empty)
    assert torch.equal(applied, ~empty)                                  # an applied anomaly is never empty
    share = applied.float().mean().item()
    assert abs(share - 0.8) < 0.06                                       # 3 binomial standard deviations
    assert not AnomalyGenerator(32, probability=0.0, seed=0).generate(images).applied.any()


def test_deterministic_under_seed_without_global_rng():
    images, _ = disk_images(n=6)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    a = AnomalyGenerator(64, probability=1.0, seed=7).generate(images)
    b = AnomalyGenerator(64, probability=1.0, seed=7).generate(images)
    c = AnomalyGenerator(64, probability=1.0, seed=8).generate(images)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.masks, c.masks)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()
    gen = AnomalyGenerator(64, probability=1.0, seed=7)
    first = gen.generate(images)
    second = gen.generate(images)
    assert not torch.equal(first.masks, second.masks)                    # the stream advances...
    gen.reseed(7)
    assert torch.equal(gen.generate(images).images, first.images)       # ...and restarts on reseed


def test_texture_folder_is_used(tmp_path, monkeypatch):
    folder = tmp_path / "textures"
    (folder / "sub").mkdir(parents=True)
    colour = np.array([200, 30, 90], dtype=np.uint8)
    Image.fromarray(np.tile(colour, (20, 30, 1))).save(folder / "sub" / "solid.png")
    monkeypatch.setattr(G, "augment_texture", lambda texture, rng, count=3: texture)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = AnomalyGenerator(32, texture_dir=folder, probability=1.0, foreground="whole", seed=0).generate(images)
    tex = torch.tensor(colour / 255.0, dtype=torch.float32).view(1, 3, 1, 1)
    assert torch.allclose(result.textures, tex.expand(4, 3, 32, 32), atol=1e-6)
    beta = result.beta.view(-1, 1, 1, 1)
    inside = (result.masks > 0).expand_as(images)
    assert inside.any()
    assert torch.allclose(result.images[inside], ((1 - beta) * tex + beta * images)[inside], atol=1e-6)


def test_bad_texture_folder_is_a_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match="textures_missing.*does not exist"):
        AnomalyGenerator(32, texture_dir=tmp_path / "textures_missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match="empty.*contains no images"):
        AnomalyGenerator(32, texture_dir=tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="bad.png"):
        AnomalyGenerator(32, texture_dir=tmp_path / "broken")


def test_perlin_noise_range_and_mask_coverage():
    rng = np.random.default_rng(0)
    noise = perlin_noise((64, 96), (4, 8), rng, angle=30.0)
    assert noise.shape == (64, 96) and noise.abs().max() <= 1.0 + 1e-5
    assert noise.std() > 0.1
    gen = AnomalyGenerator(128, seed=0)
    coverage = np.array([gen.perlin_mask((128, 128), torch.device("cpu")).float().mean().item() for _ in range(150)])
    assert 0.02 < coverage.mean() < 0.3          # DRAEM-like: a few percent of the image on average
    assert (coverage == 0).mean() < 0.2          # seldom empty ...
    assert coverage.max() < 0.9                  # ... and never the whole image


def test_procedural_textures_and_augmentations_stay_in_range():
    rng = np.random.default_rng(1)
    source = torch.rand(3, 40, 40)
    textures = [T._noise_texture(rng, (40, 40), torch.device("cpu")) for _ in range(4)]
    textures += [T._gradient_texture(rng, (40, 40), torch.device("cpu")) for _ in range(4)]
    textures += [T._patch_texture(rng, source) for _ in range(4)]
    for texture in textures:
        assert texture.shape == (3, 40, 40) and texture.min() >= 0 and texture.max() <= 1
        for _ in range(3):
            out = T.augment_texture(texture, rng)
            assert out.shape == (3, 40, 40) and out.min() >= 0 and out.max() <= 1


def test_grey_images_get_grey_anomalies():
    grey = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0)).expand(-1, 3, -1, -1)
    out, _ = AnomalyGenerator(32, probability=1.0, foreground="whole", seed=2)(grey)
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])


def test_anomaly_grid_and_cli(tmp_path, capsys):
    images, _ = disk_images(n=5, size=32)
    path = save_anomaly_grid(images, tmp_path / "grid.png", n=5, image_size=32, columns=2)
    width, height = Image.open(path).size
    assert width > 2 * 3 * 32 and height > 3 * 32
    category = make_synthetic_dataset(tmp_path / "data", n_train=4, n_test_good=1, n_test_defect=1, image_size=32)
    code = main(["anomalies", "--data", str(category), "--out", str(tmp_path / "cli.png"), "--n", "3",
                 "--image-size", "32", "--foreground", "whole"])
    assert code == 0 and (tmp_path / "cli.png").is_file()
    code = main(["anomalies", "--data", str(category), "--out", str(tmp_path / "x.png"),
                 "--texture-dir", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 2 and "nowhere" in err


def test_anomaly_grid_from_a_plain_folder_and_bad_paths(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    images, _ = disk_images(n=3, size=24)
    for i, image in enumerate(images):
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(folder / f"{i}.png")
    path = save_anomaly_grid(folder, tmp_path / "plain.png", n=5, image_size=24, foreground="whole", columns=3)
    assert Image.open(path).size[0] > 3 * 3 * 24                         # all three images, one row
    with pytest.raises(DataError, match="nowhere.*does not exist"):
        save_anomaly_grid(tmp_path / "nowhere", tmp_path / "x.png")
    with pytest.raises(DataError, match="0.png.*is not a folder"):
        save_anomaly_grid(folder / "0.png", tmp_path / "x.png")
