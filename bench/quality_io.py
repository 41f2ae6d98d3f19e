"""Finding LR/HR pairs and reading them the way the published SR tables did.

pyiqa (behind the OSEDiff/VPD-SR numbers) opens every file with PIL, converts it to 8-bit RGB
and divides by 255; we do the same, so that a PNG read here gives the same tensor as there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class BenchError(Exception):
    """Bad benchmark input (missing files, mismatched sizes, unavailable metric): shown as is."""


@dataclass(frozen=True)
class ImagePair:
    name: str  # the shared file name
    lr: Path
    hr: Path


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    if not folder.is_dir():
        raise BenchError(f"{folder} is not a folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def find_pairs(lr_dir: Path, hr_dir: Path, limit: int | None = None) -> list[ImagePair]:
    """Pair every HR image with the LR image of the same file name."""
    hr_files = list_images(hr_dir)
    if not hr_files:
        raise BenchError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the HR folder {hr_dir}")
    missing = [p.name for p in hr_files if not (lr_dir / p.name).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise BenchError(f"{len(missing)} HR images have no LR file of the same name in {lr_dir}: {shown}")
    pairs = [ImagePair(p.name, lr_dir / p.name, p) for p in hr_files]
    return pairs[:limit] if limit is not None else pairs


def load_rgb(path: Path) -> Image.Image:
    """An image file as 8-bit RGB, with a message naming the file if it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise BenchError(f"cannot read {path}: {err}") from None


def to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> 1x3xHxW float32 in [0, 1] (value / 255, as pyiqa reads files)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def to_image(tensor: torch.Tensor) -> Image.Image:
    """1x3xHxW float tensor in [0, 1] -> 8-bit RGB, rounded as a saved PNG would be."""
    array = tensor[0].detach().float().clamp(0.0, 1.0).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.round(array * 255.0).astype(np.uint8), mode="RGB")
