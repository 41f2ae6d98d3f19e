"""Tests of trainer.data: scanning, crops, pairs, validation and the loaders."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data import (
    DataConfig,
    DatasetError,
    HRCropDataset,
    build_train_loader,
    build_val_loader,
    crop_patch,
    read_image,
    scan_images,
    scan_pairs,
)


def write_image(path, h, w, seed=0, fmt=None, **save_args):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format=fmt, **save_args)
    return path


@pytest.fixture
def hr_folder(tmp_path):
    root = tmp_path / "hr"
    write_image(root / "a.png", 40, 48, 1)
    write_image(root / "sub" / "b.jpg", 48, 40, 2)
    write_image(root / "sub" / "deeper" / "c.webp", 64, 64, 3, lossless=True)
    write_image(root / "d.bmp", 32, 32, 4)
    (root / "notes.txt").write_text("not an image")
    return root


def test_scan_finds_images_recursively(hr_folder):
    names = [p.name for p in scan_images(hr_folder)]
    assert names == ["a.png", "d.bmp", "b.jpg", "c.webp"]


def test_scan_skips_corrupt_file_with_warning_naming_it(hr_folder):
    (hr_folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.warns(UserWarning, match=r"skipping 1 unreadable images: .*broken\.png"):
        paths = scan_images(hr_folder)
    assert all(p.name != "broken.png" for p in paths) and len(paths) == 4


def test_loader_skips_corrupt_file_and_yields_batches(hr_folder):
    (hr_folder / "broken.jpg").write_bytes(b"garbage")
    cfg = DataConfig(hr_dirs=(str(hr_folder),), crop_size=32, batch_size=2, num_workers=0)
    with pytest.warns(UserWarning, match="broken.jpg"):
        loader = build_train_loader(cfg, scale=4, generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert len(batches) == 2  # 4 readable images, batches of 2
    assert batches[0]["hr"].shape == (2, 3, 32, 32) and batches[0]["hr"].dtype == torch.float32
    assert 0 <= batches[0]["hr"].min() and batches[0]["hr"].max() <= 1


def test_loader_with_workers_is_reproducible(hr_folder):
    cfg = DataConfig(hr_dirs=[str(hr_folder)], crop_size=16, batch_size=2, num_workers=1)

    def first_batch(seed):
        return next(iter(build_train_loader(cfg, 4, torch.Generator().manual_seed(seed))))["hr"]

    assert torch.equal(first_batch(3), first_batch(3))
    assert not torch.equal(first_batch(3), first_batch(4))


def test_too_few_images_is_a_clear_error(hr_folder, tmp_path):
    cfg = DataConfig(hr_dirs=(str(hr_folder),), crop_size=32, batch_size=8, num_workers=0)
    with pytest.raises(DatasetError, match=rf"{hr_folder}: found 4 readable images, need at least 8"):
        build_train_loader(cfg, 4)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=rf"{empty}: found 0 readable images"):
        build_train_loader(DataConfig(hr_dirs=(str(empty),), crop_size=32, batch_size=1), 4)
    with pytest.raises(DatasetError, match="image folder not found"):
        scan_images(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no training folders"):
        build_train_loader(DataConfig(), 4)


def test_config_errors():
    with pytest.raises(ValueError, match="one LR folder per HR folder"):
        DataConfig(hr_dirs=("a", "b"), lr_dirs=("c",))
    with pytest.raises(ValueError, match="not a single string"):
        DataConfig(hr_dirs="a")
    with pytest.raises(ValueError, match=r"crop_size \(30\) must be a multiple of the scale \(4\)"):
        build_train_loader(DataConfig(hr_dirs=("x",), crop_size=30), 4)


def test_small_images_are_upscaled_not_padded():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :, 0] = 200
    patch = crop_patch(arr, 32, random=True)
    assert patch.shape == (3, 32, 32)
    torch.testing.assert_close(patch[0], torch.full((32, 32), 200 / 255))  # no padded border anywhere


def test_flips_and_crops_come_from_the_image(tmp_path):
    arr = np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)
    path = tmp_path / "grad.png"
    Image.fromarray(arr).save(path)
    ds = HRCropDataset([path], crop_size=16, hflip=True)
    torch.manual_seed(0)
    full = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    for _ in range(5):
        crop = ds[0]["hr"]
        found = any(
            torch.equal(c, full[:, t : t + 16, left : left + 16])
            for t in range(49)
            for left in range(49)
            for c in (crop, crop.flip(-1))
        )
        assert found


def test_read_image_handles_exif_and_16_bit(tmp_path):
    path = write_image(tmp_path / "rot.jpg", 20, 30)
    with Image.open(path) as img:
        exif = img.getexif()
        exif[0x0112] = 6  # rotate 90 degrees on display
        img.save(tmp_path / "rot6.jpg", exif=exif)
    assert read_image(tmp_path / "rot6.jpg").shape == (30, 20, 3)
    gray16 = np.full((8, 8), 65535 // 2, np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    arr = read_image(tmp_path / "g16.png")
    assert arr.dtype == np.uint16 and arr.shape == (8, 8, 3)
    assert crop_patch(arr, 8, random=False).mean().item() == pytest.approx(0.5, abs=1e-4)


@pytest.fixture
def paired(tmp_path):
    """HR images and LR twins made by 4x area-averaging, so aligned crops must agree."""
    hr_dir, lr_dir = tmp_path / "pairs" / "hr", tmp_path / "pairs" / "lr"
    for i, (h, w) in enumerate([(64, 64), (80, 96), (65, 66)]):  # the last one: HR not a multiple of 4
        hr = write_image(hr_dir / "s" / f"img{i}.png", h, w, seed=i)
        small = torch.nn.functional.avg_pool2d(
            torch.from_numpy(np.array(Image.open(hr))).permute(2, 0, 1)[None].float(), 4
        )
        (lr_dir / "s").mkdir(parents=True, exist_ok=True)
        Image.fromarray(small[0].permute(1, 2, 0).round().byte().numpy()).save(lr_dir / "s" / f"img{i}.png")
    write_image(hr_dir / "orphan.png", 64, 64)  # no LR twin
    write_image(hr_dir / "wrong.png", 64, 64)
    write_image(lr_dir / "wrong.jpg", 10, 10)  # twin with another extension and the wrong size
    return hr_dir, lr_dir


def test_paired_scan_warns_about_unusable_pairs(paired):
    hr_dir, lr_dir = paired
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs = scan_pairs(hr_dir, lr_dir, scale=4)
    text = " ".join(str(w.message) for w in caught)
    assert "orphan.png" in text and "without an LR twin" in text
    assert "wrong.png" in text and "not 4x their LR" in text
    assert sorted(p[0].name for p in pairs) == ["img0.png", "img1.png", "img2.png"]


def test_paired_crops_are_aligned(paired):
    hr_dir, lr_dir = paired
    cfg = DataConfig(hr_dirs=(str(hr_dir),), lr_dirs=(str(lr_dir),), crop_size=32, batch_size=3, num_workers=0)
    with pytest.warns(UserWarning):
        loader = build_train_loader(cfg, 4)
    batch = next(iter(loader))
    assert batch["hr"].shape == (3, 3, 32, 32) and batch["lr"].shape == (3, 3, 8, 8)
    pooled = torch.nn.functional.avg_pool2d(batch["hr"], 4)
    assert (pooled - batch["lr"]).abs().max() < 1 / 255 + 1e-6


def test_validation_full_images_and_centre_crops(hr_folder, paired):
    full = build_val_loader(DataConfig(val_hr_dir=str(hr_folder), val_crop_size=None, num_workers=0), 4)
    shapes = sorted(tuple(b["hr"].shape[-2:]) for b in full)
    assert shapes == [(32, 32), (40, 48), (48, 40), (64, 64)]  # trimmed to multiples of 4
    crops = build_val_loader(DataConfig(val_hr_dir=str(hr_folder), val_crop_size=32, batch_size=4, num_workers=0), 4)
    (batch,) = list(crops)
    assert batch["hr"].shape == (4, 3, 32, 32)
    hr_dir, lr_dir = paired
    with pytest.warns(UserWarning):
        pairs = build_val_loader(DataConfig(val_hr_dir=str(hr_dir), val_lr_dir=str(lr_dir), val_crop_size=None), 4)
    for b in pairs:
        assert b["hr"].shape[-2] == 4 * b["lr"].shape[-2] and b["hr"].shape[-1] == 4 * b["lr"].shape[-1]
    assert build_val_loader(DataConfig(), 4) is None


def test_truncated_image_is_replaced_at_load_time(tmp_path):
    good = write_image(tmp_path / "good.png", 32, 32)
    bad = write_image(tmp_path / "bad.jpg", 64, 64, fmt="JPEG")
    bad.write_bytes(bad.read_bytes()[:-1500])  # header intact, so the start-up check passes
    paths = scan_images(tmp_path)
    assert bad in paths
    ds = HRCropDataset(sorted(paths), crop_size=16)
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*bad\.jpg"):
        item = ds[0]
    assert item["path"] == str(good)
