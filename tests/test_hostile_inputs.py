"""Hostile files and faults (#13): special files, decompression bombs, unwritable outputs, and
whole-image work after the tiles that must not hold several float copies of the image."""

from __future__ import annotations

import errno
import io
import os
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import photo_like
from vpdsr import imageio
from vpdsr.cli import main
from vpdsr.color import _low_frequency, apply_color_fix, color_fix_, wavelet_color_fix
from vpdsr.errors import ImageError
from vpdsr.imageio import ImageParts, file_size_limit, join_image, load_image, save_image

MISSING_MODEL = "no-such-model.safetensors"  # a refusal must come before the model would load


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png(width: int, height: int, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


# --- special files --------------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero here")
def test_dev_zero_is_refused_unread(capsys):
    with pytest.raises(ImageError, match="not a regular file"):
        load_image("/dev/zero")
    assert main(["upscale", "/dev/zero", "-o", "unused-out", "--model", MISSING_MODEL, "-q"]) == 2
    err = capsys.readouterr().err
    assert "not a regular file" in err and "Traceback" not in err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_and_folder_are_refused_without_blocking(tmp_path: Path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # no writer: a plain open() would wait for one forever
    with pytest.raises(ImageError, match=r"pipe\.png: not a regular file \(a device, pipe or socket\)"):
        load_image(fifo)
    with pytest.raises(ImageError, match=r"not a regular file \(a folder\)"):
        load_image(tmp_path)


def test_reads_stop_at_the_file_size_limit(tmp_path: Path):
    path = tmp_path / "big.png"
    Image.new("RGB", (8, 8)).save(path)
    with open(path, "ab") as f:  # a valid image followed by more bytes than any image of the limit needs
        f.truncate(file_size_limit(100) + 1)
    with pytest.raises(ImageError, match="larger than .* MB, more than any image within the pixel limit"):
        load_image(path, max_pixels=100)

    class Endless:  # a stream that never ends, as /dev/zero opened by the caller would be
        def read(self, n: int) -> bytes:
            return b"\0" * n

    with pytest.raises(ImageError, match="larger than"):
        load_image(Endless(), max_pixels=100)


# --- decompression bombs -------------------------------------------------------------------------


def test_bomb_header_gets_the_megapixel_message():
    bomb = _png(100_000, 100_000, 8, 2, zlib.compress(b"\0" * 64))  # 10 gigapixels declared, 100 bytes of file
    with pytest.raises(ImageError, match=r"100000x100000 is 10000\.0 megapixels, above the limit of 40\.0") as err:
        load_image(bomb, name="bomb.png")
    assert "corrupt" not in str(err.value)


def test_real_big_but_cheap_image_gets_the_megapixel_message(tmp_path: Path, monkeypatch):
    width, height = 20_000, 10_000  # 200 megapixels, past Pillow's own error limit (179), all black
    row = b"\0" * (1 + width // 8)  # filter byte and a 1-bit row
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    path = tmp_path / "black.png"
    path.write_bytes(_png(width, height, 1, 0, idat))
    with monkeypatch.context() as patch:  # a valid PNG of a few kB, as Pillow sees it without its limit
        patch.setattr(Image, "MAX_IMAGE_PIXELS", None)
        assert Image.open(path).size == (width, height) and path.stat().st_size < 100_000
    with pytest.raises(ImageError, match=r"20000x10000 is 200\.0 megapixels, above the limit of 40\.0"):
        load_image(path)


def test_our_pixel_limit_replaces_pillows(tmp_path: Path, monkeypatch):
    path = tmp_path / "img.png"
    Image.fromarray(photo_like(40, 50)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # Pillow would call 2000 pixels a bomb
    assert load_image(path, max_pixels=2_000).size == (50, 40)  # a limit raised past Pillow's is honoured
    with pytest.raises(ImageError, match=r"50x40 is 0\.0 megapixels, above the limit of 0\.0"):
        load_image(path, max_pixels=1_999)


# --- unwritable outputs --------------------------------------------------------------------------


def test_unwritable_output_is_refused_before_the_model_loads(tmp_path: Path, monkeypatch, capsys):
    src = tmp_path / "a.png"
    Image.fromarray(photo_like(8, 8)).save(src)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: make the check see what a user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real_access(p, mode, **kw))
    assert main(["upscale", str(src), "-o", str(locked / "out"), "--model", MISSING_MODEL, "-q"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write to {locked / 'out'}: {locked} is not writable" in err
    assert MISSING_MODEL not in err and "Traceback" not in err


def test_a_write_failure_is_reported_per_file_and_the_others_go_on(tmp_path: Path, monkeypatch, capsys):
    for name in ("a.png", "b.png"):
        Image.fromarray(photo_like(8, 8)).save(tmp_path / name)
    real_save = imageio.save_image

    def read_only_for_a(image: Image.Image, path: Path, **options: bool) -> Path:
        if Path(path).name == "a.png":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_save(image, path, **options)

    monkeypatch.setattr(imageio, "save_image", read_only_for_a)
    out = tmp_path / "out"
    assert main(["upscale", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert f"failed: {out / 'a.png'}: cannot write the result ({os.strerror(errno.EROFS)})" in err
    assert "wrote 1 image" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["b.png"]


def test_a_failed_save_leaves_no_temporary_file(tmp_path: Path, monkeypatch):
    def disk_full(self: Path, target: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "replace", disk_full)
    with pytest.raises(OSError):
        save_image(Image.new("RGB", (4, 4)), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


# --- whole-image work after the tiles ------------------------------------------------------------


def _grouped_conv_low_frequency(image: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """The a-trous decomposition as it was first written: a grouped 3x3 convolution per level."""
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]).expand(image.shape[1], 1, 3, 3) / 16
    for i in range(levels):
        d = 2**i
        padded = F.pad(image, (d, d, d, d), mode="reflect" if min(image.shape[-2:]) > d else "replicate")
        image = F.conv2d(padded, kernel, groups=image.shape[1], dilation=d)
    return image


def _to_8bit(t: torch.Tensor) -> np.ndarray:
    return (t.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy().astype(int)


@pytest.mark.parametrize("shape", [(1, 3, 300, 90), (2, 3, 45, 70), (1, 3, 12, 9)])
@pytest.mark.parametrize("band", [1, 40, 1000])
def test_color_fix_in_bands_equals_the_whole_image_one(shape, band):
    generator = torch.Generator().manual_seed(sum(shape))
    image, reference = torch.rand(shape, generator=generator), torch.rand(shape, generator=generator)
    for method in ("wavelet", "adain"):
        whole = apply_color_fix(image, reference, method)
        banded = color_fix_(image.clone(), reference.clone(), method, band=band)
        assert torch.allclose(banded, whole, atol=1e-6), method
        assert np.abs(_to_8bit(banded) - _to_8bit(whole)).max() <= 1
    deeper = color_fix_(image.clone(), reference.clone(), "wavelet", levels=7, band=band)  # a 127-row halo
    assert torch.allclose(deeper, wavelet_color_fix(image, reference, levels=7), atol=1e-6)
    wider = color_fix_(image.clone(), reference.clone(), "wavelet", ring="input", band=band)  # a 2-row clamp edge
    assert torch.allclose(wider, wavelet_color_fix(image, reference, ring="input"), atol=1e-6)
    first = image - _grouped_conv_low_frequency(image) + _grouped_conv_low_frequency(reference)
    both = torch.stack([image, reference])  # the anti-ringing clamp: within both images' 3x3 range
    low = -F.max_pool2d(-both.amin(0), 3, 1, 1)
    first = torch.minimum(torch.maximum(first, low), F.max_pool2d(both.amax(0), 3, 1, 1))
    assert torch.allclose(_low_frequency(image, 5), _grouped_conv_low_frequency(image), atol=1e-6)
    assert np.abs(_to_8bit(apply_color_fix(image, reference, "wavelet")) - _to_8bit(first)).max() <= 1
    unclamped = image - _grouped_conv_low_frequency(image) + _grouped_conv_low_frequency(reference)
    low, high = -F.max_pool2d(-reference, 5, 1, 2), F.max_pool2d(reference, 5, 1, 2)  # the input's 5x5 range
    expected = torch.minimum(torch.maximum(unclamped, low), high)
    assert np.abs(_to_8bit(apply_color_fix(image, reference, "wavelet", ring="input")) - _to_8bit(expected)).max() <= 1


@pytest.mark.parametrize(("grayscale", "bits", "with_alpha"), [(False, 8, False), (True, 8, True), (False, 16, True)])
def test_banded_conversion_to_integers_equals_the_whole_image_one(monkeypatch, grayscale, bits, with_alpha):
    monkeypatch.setattr(imageio, "BAND_ROWS", 7)
    generator = torch.Generator().manual_seed(1)
    rgb = torch.rand(1, 3, 30, 11, generator=generator) * 1.2 - 0.1  # a little out of range, as results can be
    alpha = torch.rand(1, 1, 30, 11, generator=generator) if with_alpha else None
    image = join_image(rgb, ImageParts(rgb=rgb, alpha=None, grayscale=grayscale, bits=bits, icc=None), alpha)
    whole = rgb.clamp(0, 1)
    if grayscale:
        whole = (whole * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if alpha is not None:
        whole = torch.cat([whole, alpha], 1)
    peak = 65535 if bits == 16 else 255
    dtype = np.uint16 if bits == 16 else np.uint8
    expected = (whole[0].permute(1, 2, 0).numpy().clip(0, 1) * float(peak) + 0.5).astype(dtype)
    got = image.info["vpdsr_png16"] if bits == 16 else np.asarray(image)
    assert np.array_equal(got.reshape(expected.shape), expected)


def test_16bit_png_is_written_in_bands(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(imageio, "BAND_ROWS", 3)
    array = np.random.default_rng(0).integers(0, 65536, (10, 5, 3), dtype=np.uint16)
    path = tmp_path / "x.png"
    imageio._write_png16(path, array, None)
    data, pos, idat = path.read_bytes(), 8, b""
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        idat += data[pos + 8 : pos + 8 + length] if kind == b"IDAT" else b""
        pos += 12 + length
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(10, 1 + 5 * 3 * 2)
    assert not rows[:, 0].any()  # filter 0 on every row
    assert np.array_equal(rows[:, 1:].copy().view(">u2").reshape(10, 5, 3), array)


# --- tiny files (#24) ------------------------------------------------------------------------------


def _tiny_payloads() -> dict[str, list[bytes]]:
    """For every suffix this Pillow reads: zero-filled files of 0-15 bytes, and the first 0-15 bytes of
    a real image of that format (a header cut short), where Pillow can write one."""
    from vpdsr.outputs import readable_suffixes

    Image.init()
    payloads = {}
    for suffix in sorted(readable_suffixes()):
        fmt = Image.registered_extensions()[suffix]
        cut: list[bytes] = []
        for mode in ("RGB", "L", "1"):
            buffer = io.BytesIO()
            try:
                Image.new(mode, (4, 4)).save(buffer, fmt)
            except Exception:  # noqa: BLE001  (this format cannot write this mode, or writes nothing at all)
                continue
            cut = [buffer.getvalue()[:n] for n in range(16)]
            break
        payloads[suffix] = [b"\0" * n for n in range(16)] + cut
    return payloads


def test_files_of_0_to_15_bytes_are_refused_in_one_line_for_every_image_suffix():
    """Pillow 12.3's BMP check raised struct.error on fewer than 4 bytes, outside our opener's try."""
    unexpected = []
    for suffix, payloads in _tiny_payloads().items():
        for data in payloads:
            try:
                load_image(data, name=f"x{suffix}")
            except ImageError as err:
                zeros = not data.strip(b"\0")
                if "\n" in str(err) or (zeros and "not an image file" not in str(err)):
                    unexpected.append((suffix, data, str(err)))
            except Exception as err:  # noqa: BLE001  (what the test is looking for)
                unexpected.append((suffix, data, repr(err)))
            else:
                if data.strip(b"\0"):  # a tiny image that is whole (a 4x4 PBM) may well decode
                    continue
                unexpected.append((suffix, data, "decoded"))
    assert not unexpected, unexpected[:5]


def test_a_folder_run_names_empty_files_and_goes_on(tmp_path: Path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for suffix in (".png", ".bmp", ".jpg", ".webp", ".avif", ".gif", ".tif"):
        (folder / f"empty{suffix}").write_bytes(b"")
    Image.fromarray(photo_like(8, 8)).save(folder / "z.png")  # sorted last: reached only if the run goes on
    out = tmp_path / "out"
    assert main(["upscale", str(folder), "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "struct.error" not in err
    assert f"failed: {folder / 'empty.png'}: an empty file (0 bytes), not an image file" in err
    assert "wrote 1 image" in err and (out / "z.png").is_file()


# --- several writers into one folder (#24) --------------------------------------------------------


def _write_concurrently(path: Path, writers: int, replace: bool) -> list[BaseException]:
    """``writers`` threads saving different images to ``path`` at the same moment; what each raised."""
    barrier = threading.Barrier(writers)
    errors: list[BaseException] = []

    def write(seed: int) -> None:
        image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (96, 96, 3), dtype=np.uint8))
        barrier.wait()
        for _ in range(10):
            try:
                save_image(image, path, replace=replace)
            except Exception as err:  # noqa: BLE001  (collected for the assertion)
                errors.append(err)

    threads = [threading.Thread(target=write, args=(seed,)) for seed in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_concurrent_writers_of_one_output_never_take_each_others_file(tmp_path: Path):
    """One temporary name for all writers made a rename find its file gone (a false failure)."""
    path = tmp_path / "x.png"
    assert _write_concurrently(path, writers=4, replace=True) == []
    assert Image.open(path).size == (96, 96) and [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_without_replace_the_first_writer_wins_and_the_others_are_told(tmp_path: Path):
    path = tmp_path / "x.png"
    errors = _write_concurrently(path, writers=4, replace=False)
    assert len(errors) == 4 * 10 - 1 and all(isinstance(err, FileExistsError) for err in errors)
    first = np.asarray(Image.open(path))
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
    with pytest.raises(FileExistsError):
        save_image(Image.new("RGB", (96, 96)), path, replace=False)
    assert np.array_equal(np.asarray(Image.open(path)), first)  # never replaced


def test_an_output_another_run_wrote_first_counts_as_skipped(tmp_path: Path, monkeypatch, capsys):
    for name in ("a.png", "b.png"):
        Image.fromarray(photo_like(8, 8)).save(tmp_path / name)
    out = tmp_path / "out"
    real_load = imageio.load_image

    def other_run_writes_a_first(source: Path, **options: int) -> Image.Image:
        if Path(source).name == "a.png":  # the other run finishes a.png while this one upscales it
            out.mkdir(exist_ok=True)
            Image.new("RGB", (1, 1)).save(out / "a.png")
        return real_load(source, **options)

    monkeypatch.setattr(imageio, "load_image", other_run_writes_a_first)
    assert main(["upscale", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-o", str(out), "-q"]) == 0
    err = capsys.readouterr().err
    assert f"skipped 1 file, written meanwhile by another run (kept): {out / 'a.png'}" in err
    assert "wrote 1 image" in err and "(1 skipped)" in err and "failed" not in err
    assert Image.open(out / "a.png").size == (1, 1) and sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]


def test_an_output_folder_that_is_a_file_is_a_failure_not_a_skip(tmp_path: Path, capsys):
    """mkdir's FileExistsError (``out/sub`` is a plain file) was taken for another run's output."""
    (tmp_path / "in" / "sub").mkdir(parents=True)
    Image.fromarray(photo_like(8, 8)).save(tmp_path / "in" / "sub" / "x.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").write_bytes(b"")
    assert main(["upscale", str(tmp_path / "in"), "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert "skipped" not in err and "Traceback" not in err
    assert f"failed: {out / 'sub' / 'x.png'}: cannot write the result (File exists: {out / 'sub'})" in err


def test_a_decoder_error_without_words_is_named_by_its_type(monkeypatch):
    """``err or type(err).__name__`` never reached the name: an exception is always truthy."""

    def silent_failure(data: bytes, name: str, max_pixels: int) -> Image.Image:
        raise EOFError

    monkeypatch.setattr(imageio, "_open_within", silent_failure)
    with pytest.raises(ImageError, match=r"^x\.png: the image is corrupt or truncated \(EOFError\)$"):
        load_image(b"\x89PNG", name="x.png")


def test_two_processes_upscaling_into_one_folder_both_succeed(tmp_path: Path):
    """Two `vpdsr upscale` runs writing the same outputs (--overwrite: each writes every file), as sharded
    multi-process runs will: under one shared temporary name a rename found its file gone (rc 1)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(photo_like(16, 16, seed=i)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vpdsr", "upscale", str(folder), "-o", str(out), "--overwrite", "-q"]
    runs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errs
    assert all("failed" not in err and "Traceback" not in err for err in errs), errs
    assert sorted(p.name for p in out.iterdir()) == [f"{i}.png" for i in range(6)]  # no temporary file left
    assert all(Image.open(out / f"{i}.png").size == (64, 64) for i in range(6))
