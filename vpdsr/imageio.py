"""Images in and out: PIL/numpy/torch adapters, and the bookkeeping that keeps a photo intact.

The student sees only 3-channel float tensors in [0, 1]. Everything else a file carries is split
off before and restored after: EXIF orientation is applied, an alpha channel is upscaled on its
own (bicubic) and re-attached, grayscale comes back as grayscale, 16-bit stays 16-bit, and the
ICC profile is written into the output so colours are interpreted as in the input.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from .color import BAND_ROWS  # rows of whole-image work at a time, here on the way out
from .errors import ImageError
from .paths import private_temp_path

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageParts",
    "OutputTaken",
    "file_size_limit",
    "join_image",
    "load_image",
    "numpy_to_tensor",
    "pil_to_tensor",
    "save_image",
    "split_image",
    "tensor_to_numpy",
    "tensor_to_pil",
]

# Inputs above this are refused before decoding: a 40-megapixel input would become a
# 640-megapixel output at x4. Callers that really want more pass a larger limit.
DEFAULT_MAX_PIXELS = 40_000_000
# The file-size limit follows from the pixel limit: no image needs more than 8 bytes a pixel
# (16-bit RGBA stored raw) plus its metadata, so a larger "image" is refused unread.
_BYTES_PER_PIXEL, _METADATA_BYTES = 8, 64 * 2**20


@dataclass
class ImageParts:
    """What the student works on (``rgb``) and what is carried around it."""

    rgb: torch.Tensor  # 1x3xHxW float32 in [0, 1]
    alpha: torch.Tensor | None  # 1x1xHxW float32 in [0, 1]
    grayscale: bool
    bits: int  # 8 or 16
    icc: bytes | None


class OutputTaken(FileExistsError):
    """Another writer finished this output first (``save_image(..., replace=False)``).

    A type of its own, because ``save_image`` meets other FileExistsErrors that are real failures:
    an output subfolder that exists as a plain file fails ``mkdir`` with one.
    """


def _png_bit_depth(data: bytes) -> int:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return data[24]
    return 8


def file_size_limit(max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """The most bytes an image file within ``max_pixels`` can need; larger files are refused unread."""
    return max_pixels * _BYTES_PER_PIXEL + _METADATA_BYTES


def load_image(
    source: str | Path | bytes | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """Open and fully decode an image, with clear errors for corrupt, unsupported, special or huge files.

    ``name`` is what error messages call the image (an upload's original file name, say). Nothing is
    read without bound: a path must be a regular file (``/dev/zero`` or a FIFO would never end), and
    at most ``file_size_limit(max_pixels)`` bytes are read from any source. The size in the header
    is checked against ``max_pixels`` before a pixel is decoded.
    """
    name = name or (str(source) if isinstance(source, (str, Path)) else "uploaded image")
    if isinstance(source, (str, Path)):
        data = _read_regular_file(Path(source), name, max_pixels)
    else:
        data = source if isinstance(source, bytes) else source.read(file_size_limit(max_pixels) + 1)
        if len(data) > file_size_limit(max_pixels):
            raise _too_large(name, max_pixels)
    try:
        image = _open_within(data, name, max_pixels)
        image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as err:  # a part of the file (a GIF frame, a TIFF tile) past Pillow's limit
        raise ImageError(f"{name}: refused as a likely decompression bomb ({err})") from None
    except _CORRUPT as err:
        raise ImageError(f"{name}: the image is corrupt or truncated ({str(err) or type(err).__name__})") from None
    image.info["vpdsr_bits"] = 16 if _png_bit_depth(data) == 16 or image.mode in ("I;16", "I;16B", "I;16L", "I") else 8
    return ImageOps.exif_transpose(image)


def _too_large(name: str, max_pixels: int) -> ImageError:
    return ImageError(
        f"{name}: larger than {file_size_limit(max_pixels) / 1e6:.0f} MB, more than any image within the pixel "
        f"limit of {max_pixels / 1e6:.1f} megapixels needs; raise the pixel limit to process it"
    )


def _read_regular_file(path: Path, name: str, max_pixels: int) -> bytes:
    """The bytes of ``path``, refused unread when it is not a regular file or is over the size limit.

    The checks are made on the opened descriptor, so a file swapped for a FIFO after a folder scan
    is still caught, and the open itself does not wait for a FIFO's writer (``O_NONBLOCK``). The read
    stops one byte past the limit even if the file grows meanwhile.
    """
    limit = file_size_limit(max_pixels)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise ImageError(f"{name}: cannot read the file ({err.strerror or err})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a device, pipe or socket"
            raise ImageError(f"{name}: not a regular file ({kind}); vpdsr reads image files")
        if info.st_size > limit:
            raise _too_large(name, max_pixels)
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(limit + 1)
    except OSError as err:
        raise ImageError(f"{name}: cannot read the file ({err.strerror or err})") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise _too_large(name, max_pixels)
    return data


# What a format's check or opener raises on bytes of another format, or on too few of them.
_NOT_THIS_FORMAT = (SyntaxError, IndexError, TypeError, struct.error, EOFError)
# What decoding bytes that an opener took raises when they are damaged: Pillow's decoders report
# a cut or garbled stream in all of these ways, not only as OSError.
_CORRUPT = (OSError, SyntaxError, ValueError, IndexError, TypeError, struct.error, EOFError)


def _open_within(data: bytes, name: str, max_pixels: int) -> ImageFile.ImageFile:
    """``Image.open`` with our pixel limit in place of Pillow's decompression-bomb check.

    ``Image.open`` checks Pillow's own limit (a warning past 89 megapixels, an error past 179) before
    a caller sees the size, so a bomb would read as Pillow's error, not as "N megapixels, above the
    limit", and a limit raised past Pillow's could never be used. So each registered format's opener
    is tried as ``Image.open`` tries them, and the size it read from the header is held against
    ``max_pixels`` before any pixel data is touched.
    """
    if not data:
        raise ImageError(f"{name}: an empty file (0 bytes), not an image file")
    Image.init()
    fp = io.BytesIO(data)
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:  # a check can itself fail on a few bytes (Pillow 12.3's BMP one unpacks 4 of an empty file)
            accepted = not accept or accept(data[:16])
        except _NOT_THIS_FORMAT:
            continue
        if not accepted or isinstance(accepted, str):  # a str is Pillow's "almost, but not this format"
            continue
        fp.seek(0)
        try:
            image = factory(fp, "")
        except _NOT_THIS_FORMAT:
            continue
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(
                f"{name}: {width}x{height} is {width * height / 1e6:.1f} megapixels, "
                f"above the limit of {max_pixels / 1e6:.1f}; raise the pixel limit to process it"
            )
        return image
    raise ImageError(f"{name}: not an image file, or a format Pillow cannot read")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB/L PIL image -> 1xCxHxW float32 in [0, 1]."""
    array = np.asarray(image)
    scale = 65535.0 if array.dtype == np.uint16 or image.mode.startswith("I") else 255.0
    return numpy_to_tensor(array.astype(np.float32) / scale)


def numpy_to_tensor(array: np.ndarray) -> torch.Tensor:
    """HxW or HxWxC (or BxHxWxC) float array in [0, 1] -> BxCxHxW tensor."""
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if t.dim() == 2:
        t = t[:, :, None]
    if t.dim() == 3:
        t = t[None]
    return t.permute(0, 3, 1, 2).contiguous()


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """BxCxHxW (or CxHxW) tensor -> HxWxC float32 array of the first image, clamped to [0, 1]."""
    if tensor.dim() == 4:
        tensor = tensor[0]
    return tensor.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    """1/3/4-channel tensor in [0, 1] -> 8-bit PIL image (L, RGB or RGBA) of the first image."""
    first = tensor[0] if tensor.dim() == 4 else tensor
    return _from_array(_quantize(lambda rows: first[:, rows].detach().float().cpu(), first.shape[1], 255))


def _quantize(band: Callable[[slice], torch.Tensor], height: int, peak: int) -> np.ndarray:
    """HxWxC integers ``v * peak + 0.5`` (truncated) of the CxHxW floats ``band(rows)`` gives, clamped to [0, 1].

    Built ``BAND_ROWS`` rows at a time, so the integer array is the only whole-image one made here:
    at 8000x6000 RGB it is 144 MB, where each float copy of the image would be 576 MB.
    """
    out: np.ndarray | None = None
    for top in range(0, height, BAND_ROWS):
        rows = slice(top, min(height, top + BAND_ROWS))
        # clamp first, out of place: ``band`` may hand back a view of the caller's tensor
        values = band(rows).clamp(0, 1).mul_(peak).add_(0.5).permute(1, 2, 0).numpy()
        if out is None:
            out = np.empty((height, *values.shape[1:]), np.uint16 if peak > 255 else np.uint8)
        out[rows] = values  # numpy's float-to-integer cast truncates, as astype does
    assert out is not None, "an image has at least one row"
    return out


def _from_array(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def split_image(image: Image.Image) -> ImageParts:
    """Separate a decoded image into the RGB the student sees and everything to carry around it."""
    bits = int(image.info.get("vpdsr_bits", 8))
    icc = image.info.get("icc_profile")
    alpha = None
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        gray = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if image.mode != "F" else max(1.0, float(gray.max()))
        rgb = numpy_to_tensor(np.repeat((gray / scale)[:, :, None], 3, axis=2).clip(0, 1))
        return ImageParts(rgb=rgb, alpha=None, grayscale=True, bits=16 if image.mode != "F" else 8, icc=icc)
    grayscale = image.mode in ("1", "L", "LA")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        alpha = pil_to_tensor(image.getchannel("A"))
    if image.mode not in ("RGB",):
        image = image.convert("RGB")
    return ImageParts(rgb=pil_to_tensor(image), alpha=alpha, grayscale=grayscale, bits=bits, icc=icc)


def join_image(rgb: torch.Tensor, parts: ImageParts, alpha: torch.Tensor | None = None) -> Image.Image:
    """Rebuild an image of the input's kind from the upscaled RGB (and upscaled alpha) of the first image.

    Conversion runs in bands of rows (``_quantize``): no float copy of the whole image is made here.
    """
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)

    def band(rows: slice) -> torch.Tensor:
        out = rgb[0, :, rows].detach().float().cpu().clamp(0, 1)
        if parts.grayscale:
            out = (out * luma).sum(0, keepdim=True)
        if alpha is not None:
            out = torch.cat([out, alpha[0, :, rows].detach().float().cpu()])
        return out

    array = _quantize(band, rgb.shape[2], 65535 if parts.bits == 16 else 255)
    if parts.bits == 16 and array.shape[2] > 1:
        preview = np.empty(array.shape, np.uint8)
        np.right_shift(array, 8, out=preview, casting="unsafe")
        image = Image.fromarray(preview)
        image.info["vpdsr_png16"] = array  # Pillow has no 16-bit RGB mode; save_image writes it
    else:
        image = _from_array(array)
    if parts.icc:
        image.info["icc_profile"] = parts.icc
    return image


def _write_png16(path: Path, array: np.ndarray, icc: bytes | None) -> None:
    """A 16-bit RGB(A) PNG, which Pillow cannot write: filter 0 rows, one zlib stream.

    The stream is written in bands of rows, one IDAT chunk each, so the big-endian copy and the
    compressed bytes never exist for the whole image at once.
    """
    h, w, c = array.shape
    color_type = {3: 2, 4: 6}[c]

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    compressor = zlib.compressobj(6)
    with open(path, "wb") as file:
        file.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)))
        if icc:
            file.write(chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc)))
        for top in range(0, h, BAND_ROWS):
            rows = array[top : top + BAND_ROWS].astype(">u2").reshape(-1, w * c).view(np.uint8)
            body = compressor.compress(np.concatenate([np.zeros((len(rows), 1), np.uint8), rows], axis=1).tobytes())
            if body:
                file.write(chunk(b"IDAT", body))
        file.write(chunk(b"IDAT", compressor.flush()) + chunk(b"IEND", b""))


def save_image(image: Image.Image, path: str | Path, *, replace: bool = True) -> Path:
    """Write losslessly when the suffix allows (PNG by default), keeping the ICC profile.

    The file is written beside its destination under a name of this writer's own (process id and
    a random part), then moved into place, so a crash never leaves a half-written result over an
    existing file, and two processes writing into one folder never take each other's half-written
    file. With ``replace=False`` an existing destination is never replaced, not even one that
    another writer finished while this one worked: that raises OutputTaken and the other
    writer's file stays as it was.
    """
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_temp_path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ImageError(f"{path.name}: unknown image format {path.suffix!r}; use .png")
    icc = image.info.get("icc_profile")
    png16 = image.info.get("vpdsr_png16")
    try:
        if png16 is not None and fmt == "PNG":
            _write_png16(tmp, png16, icc)
        else:
            if fmt == "JPEG" and image.mode in ("RGBA", "LA", "I;16"):
                image = image.convert("RGB")
            options = {"icc_profile": icc} if icc else {}
            if fmt == "JPEG":
                options["quality"] = 95
            image.save(tmp, format=fmt, **options)
        if replace:
            tmp.replace(path)
        else:
            _publish_new(tmp, path)
    finally:  # a full disk, a lost mount, Ctrl-C, or published: leave no temporary file behind
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def _publish_new(tmp: Path, path: Path) -> None:
    """Give the finished ``tmp`` the name ``path`` unless that exists, in one atomic step.

    A hard link fails with FileExistsError when the name is taken, which a rename does not do on
    POSIX. Where a filesystem has no hard links (FAT, some network mounts), the existence check and
    the rename are two steps: a writer finishing between them is replaced, never corrupted. Either
    way a taken name raises OutputTaken.
    """
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputTaken(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
    except OSError:  # no hard links here
        if os.path.lexists(path):
            raise OutputTaken(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        tmp.replace(path)
