"""Images in and out: PIL/numpy/torch adapters, and the bookkeeping that keeps a photo intact.

The student sees only 3-channel float tensors in [0, 1]. Everything else a file carries is split
off before and restored after: EXIF orientation is applied, an alpha channel is upscaled on its
own (bicubic) and re-attached, grayscale comes back as grayscale, 16-bit stays 16-bit, and the
ICC profile is written into the output so colours are interpreted as in the input.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageParts",
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


@dataclass
class ImageParts:
    """What the student works on (``rgb``) and what is carried around it."""

    rgb: torch.Tensor  # 1x3xHxW float32 in [0, 1]
    alpha: torch.Tensor | None  # 1x1xHxW float32 in [0, 1]
    grayscale: bool
    bits: int  # 8 or 16
    icc: bytes | None


def _png_bit_depth(data: bytes) -> int:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return data[24]
    return 8


def load_image(
    source: str | Path | bytes | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """Open and fully decode an image, with clear errors for corrupt, unsupported or huge files.

    ``name`` is what error messages call the image (an upload's original file name, say).
    """
    name = name or (str(source) if isinstance(source, (str, Path)) else "uploaded image")
    try:
        data = Path(source).read_bytes() if isinstance(source, (str, Path)) else source if isinstance(source, bytes) else source.read()
    except OSError as err:
        raise ImageError(f"{name}: cannot read the file ({err.strerror or err})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise ImageError(
                    f"{name}: {image.width}x{image.height} is {image.width * image.height / 1e6:.1f} megapixels, "
                    f"above the limit of {max_pixels / 1e6:.1f}; raise the pixel limit to process it"
                )
            image.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file, or a format Pillow cannot read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ImageError(f"{name}: the image is corrupt or truncated ({err})") from None
    image.info["vpdsr_bits"] = 16 if _png_bit_depth(data) == 16 or image.mode in ("I;16", "I;16B", "I;16L", "I") else 8
    return ImageOps.exif_transpose(image)


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
    """1/3/4-channel tensor in [0, 1] -> 8-bit PIL image (L, RGB or RGBA)."""
    array = (tensor_to_numpy(tensor) * 255.0 + 0.5).astype(np.uint8)
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
    """Rebuild an image of the input's kind from the upscaled RGB (and upscaled alpha)."""
    rgb = rgb.detach().float().clamp(0, 1).cpu()
    if parts.grayscale:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        rgb = (rgb * weights).sum(1, keepdim=True)
    channels = [rgb] + ([alpha.detach().float().clamp(0, 1).cpu()] if alpha is not None else [])
    stacked = torch.cat(channels, dim=1)
    if parts.bits == 16:
        array = (tensor_to_numpy(stacked) * 65535.0 + 0.5).astype(np.uint16)
        if array.shape[2] == 1:
            image = Image.fromarray(array[:, :, 0])
        else:
            image = Image.fromarray((array >> 8).astype(np.uint8))
            image.info["vpdsr_png16"] = array  # Pillow has no 16-bit RGB mode; save_image writes it
    else:
        image = tensor_to_pil(stacked)
    if parts.icc:
        image.info["icc_profile"] = parts.icc
    return image


def _write_png16(path: Path, array: np.ndarray, icc: bytes | None) -> None:
    """A 16-bit RGB(A) PNG, which Pillow cannot write: filter 0 rows, one zlib stream."""
    h, w, c = array.shape
    color_type = {3: 2, 4: 6}[c]
    rows = array.astype(">u2").reshape(h, w * c).view(np.uint8)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    parts = [b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))]
    if icc:
        parts.append(chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc)))
    parts += [chunk(b"IDAT", zlib.compress(raw, 6)), chunk(b"IEND", b"")]
    path.write_bytes(b"".join(parts))


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Write losslessly when the suffix allows (PNG by default), keeping the ICC profile.

    The file is written beside its destination and renamed into place, so a crash never leaves
    a half-written result over an existing file.
    """
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ImageError(f"{path.name}: unknown image format {path.suffix!r}; use .png")
    icc = image.info.get("icc_profile")
    png16 = image.info.get("vpdsr_png16")
    if png16 is not None and fmt == "PNG":
        _write_png16(tmp, png16, icc)
    else:
        if fmt == "JPEG" and image.mode in ("RGBA", "LA", "I;16"):
            image = image.convert("RGB")
        options = {"icc_profile": icc} if icc else {}
        if fmt == "JPEG":
            options["quality"] = 95
        image.save(tmp, format=fmt, **options)
    tmp.replace(path)
    return path
