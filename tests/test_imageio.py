import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from conftest import photo_like
from vpdsr import ImageError, load_image, load_pipeline, save_image
from vpdsr.imageio import numpy_to_tensor, pil_to_tensor, tensor_to_numpy, tensor_to_pil


@pytest.fixture(scope="module")
def pipe(random_student_file: Path):
    return load_pipeline(random_student_file, device="cpu")


def _roundtrip(pipe, image: Image.Image, tmp_path: Path, name: str = "in.png") -> Image.Image:
    src = tmp_path / name
    image.save(src)
    out = pipe.upscale_pil(load_image(src), scale=2)
    dst = save_image(out, tmp_path / ("out_" + Path(name).stem))
    return Image.open(dst)


def test_adapters_round_trip():
    array = photo_like(10, 12)
    t = pil_to_tensor(Image.fromarray(array))
    assert t.shape == (1, 3, 10, 12) and 0 <= t.min() and t.max() <= 1
    assert np.array_equal(np.asarray(tensor_to_pil(t)), array)
    assert np.allclose(tensor_to_numpy(numpy_to_tensor(array / 255.0)), array / 255.0, atol=1e-6)


def test_exif_orientation_is_applied(tmp_path: Path):
    image = Image.fromarray(photo_like(20, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


def test_rgb_keeps_icc_profile(pipe, tmp_path: Path):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    image = Image.fromarray(photo_like(16, 20))
    image.info["icc_profile"] = icc
    src = tmp_path / "icc.png"
    image.save(src, icc_profile=icc)
    out = pipe.upscale_pil(load_image(src), scale=2)
    written = Image.open(save_image(out, tmp_path / "icc_out.png"))
    assert written.size == (40, 32) and written.mode == "RGB"
    assert written.info.get("icc_profile") == icc


def test_grayscale_stays_grayscale(pipe, tmp_path: Path):
    out = _roundtrip(pipe, Image.fromarray(photo_like(16, 16)[:, :, 0]), tmp_path, "gray.png")
    assert out.mode == "L" and out.size == (32, 32)


def test_rgba_alpha_is_upscaled_and_kept(pipe, tmp_path: Path):
    rgba = np.dstack([photo_like(16, 16), np.zeros((16, 16), np.uint8)])
    rgba[:, 8:, 3] = 255
    out = _roundtrip(pipe, Image.fromarray(rgba, "RGBA"), tmp_path, "rgba.png")
    alpha = np.asarray(out)[:, :, 3]
    assert out.mode == "RGBA" and out.size == (32, 32)
    assert alpha[:, :12].max() < 30 and alpha[:, 20:].min() > 225


def test_16bit_grayscale_stays_16bit(pipe, tmp_path: Path):
    gray16 = (photo_like(16, 16)[:, :, 0].astype(np.uint16) * 257 + 7).astype(np.uint16)
    out = _roundtrip(pipe, Image.fromarray(gray16), tmp_path, "g16.png")
    assert out.mode in ("I;16", "I") and out.size == (32, 32)
    assert np.asarray(out).max() > 255  # real 16-bit values, not 8-bit ones


def test_16bit_rgb_is_written_as_16bit_png(pipe, tmp_path: Path):
    from vpdsr.imageio import _write_png16

    rgb16 = photo_like(16, 16).astype(np.uint16) * 257
    src = tmp_path / "rgb16.png"
    _write_png16(src, rgb16, None)
    out = pipe.upscale_pil(load_image(src), scale=2)
    dst = save_image(out, tmp_path / "rgb16_out.png")
    data = dst.read_bytes()
    assert data[24] == 16 and data[25] == 2  # bit depth 16, colour type RGB
    assert Image.open(dst).size == (32, 32)


@pytest.mark.parametrize(
    ("payload", "message"),
    [(b"not an image", "not an image"), (None, "corrupt or truncated")],
)
def test_corrupt_images_are_refused(tmp_path: Path, payload, message):
    if payload is None:
        buf = io.BytesIO()
        Image.fromarray(photo_like(64, 64)).save(buf, "PNG")
        payload = buf.getvalue()[:300]
    path = tmp_path / "bad.png"
    path.write_bytes(payload)
    with pytest.raises(ImageError, match=message):
        load_image(path)


def test_pixel_limit(tmp_path: Path):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    with pytest.raises(ImageError, match="above the limit"):
        load_image(path, max_pixels=50_000)
    assert load_image(path, max_pixels=60_000).size == (300, 200)


def test_missing_file(tmp_path: Path):
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "nope.png")


def test_save_is_atomic_and_lossless(tmp_path: Path):
    t = torch.rand(1, 3, 8, 8)
    path = save_image(tensor_to_pil(t), tmp_path / "x")
    assert path.suffix == ".png" and not list(tmp_path.glob(".*.tmp"))
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(tensor_to_pil(t)))
