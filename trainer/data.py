"""Training and validation images: folder scanning, crops, flips and the DataLoaders.

Two kinds of training data:

* HR folders only (the usual case): random HR crops; the LR is made on the training device by
  ``trainer.degradations``, so the loader workers only decode and crop.
* Paired LR/HR folders: the LR image of ``hr_dir/a/b.png`` is ``lr_dir/a/b.<any extension>``,
  and crops are aligned: an LR crop at (top, left) matches the HR crop at scale x (top, left).

Images smaller than the crop are **upscaled** (bicubic, short side to the crop size), not padded:
padding puts mirrored seams or flat borders into the HR target, which the model would learn to
draw; a mild upscale only softens the few images concerned. Paired images smaller than the crop
are skipped instead, since upscaling an LR would change the degradation being learned.

Randomness (crop offsets, flips) uses torch's RNG, which the DataLoader seeds per worker from the
``generator`` given to :func:`build_train_loader`; with ``num_workers=0`` it is the global one.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_LISTED_IN_WARNING = 20
_RETRIES = 10


class DatasetError(ValueError):
    """A dataset folder cannot feed training: missing, empty, or fewer images than a batch."""


@dataclass
class DataConfig:
    """Where the images are and how they are cut; ``scale`` comes from the training config."""

    hr_dirs: tuple[str, ...] = ()
    """Folders of HR images, searched recursively."""
    lr_dirs: tuple[str, ...] = ()
    """Empty: LR made by the degradation pipeline. Else one LR folder per HR folder (paired data)."""
    crop_size: int = 512
    """HR crop side in pixels; a multiple of the scale."""
    batch_size: int = 4
    num_workers: int = 2
    hflip: bool = True
    vflip: bool = False
    val_hr_dir: str | None = None
    val_lr_dir: str | None = None
    """Optional LR twins of the validation images; without them the trainer degrades the HR."""
    val_crop_size: int | None = 512
    """Centre crops of this HR size, or None for full images (then one image per batch)."""
    fixed_batches: int = 0
    """0: every step draws new crops and a new degradation. N > 0: step s repeats the crops and
    the degradation seed of step s mod N, a fixed set of N batches; with a slow teacher
    (``student.sr_teacher``) each crop's target is then computed once and cached."""

    def __post_init__(self) -> None:
        for f in fields(self):
            if isinstance(getattr(self, f.name), list):
                setattr(self, f.name, tuple(getattr(self, f.name)))
        if isinstance(self.hr_dirs, str) or isinstance(self.lr_dirs, str):
            raise ValueError("hr_dirs and lr_dirs must be lists of folders, not a single string")
        if self.lr_dirs and len(self.lr_dirs) != len(self.hr_dirs):
            raise ValueError(
                f"lr_dirs must be empty or name one LR folder per HR folder: "
                f"{len(self.hr_dirs)} hr_dirs, {len(self.lr_dirs)} lr_dirs"
            )
        for name in ("crop_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.fixed_batches < 0:
            raise ValueError(f"fixed_batches must be >= 0, got {self.fixed_batches}")
        if self.val_crop_size is not None and self.val_crop_size < 1:
            raise ValueError(f"val_crop_size must be >= 1 or null, got {self.val_crop_size}")


# ----------------------------------------------------------------------------- reading images


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image as an (H, W, 3) uint8 or uint16 array, EXIF orientation applied.

    Alpha is dropped (training targets are opaque); 16-bit grayscale keeps its 16 bits.
    """
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.clip(np.asarray(img, dtype=np.int64), 0, 65535).astype(np.uint16)
            return np.repeat(arr[..., None], 3, axis=2)
        return np.asarray(img.convert("RGB"))


def to_tensor(arr: np.ndarray) -> Tensor:
    """(H, W, 3) uint8/uint16/float array -> (3, H, W) float32 in [0, 1]."""
    if arr.dtype == np.uint8:
        scale = 255.0
    elif arr.dtype == np.uint16:
        scale = 65535.0
    else:
        scale = 1.0
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1)
    return (t / scale).clamp(0.0, 1.0)


def load_image_tensor(path: str | Path) -> Tensor:
    """Read an image file as a (3, H, W) float32 tensor in [0, 1]."""
    return to_tensor(read_image(path))


def _upscale_short_side(img: Tensor, size: int) -> Tensor:
    h, w = img.shape[-2:]
    factor = size / min(h, w)
    new = (max(size, round(h * factor)), max(size, round(w * factor)))
    return F.interpolate(img[None], size=new, mode="bicubic", align_corners=False)[0].clamp(0.0, 1.0)


def _offset(length: int, size: int, random: bool) -> int:
    if not random:
        return (length - size) // 2
    return int(torch.randint(0, length - size + 1, (1,)))


def crop_patch(arr: np.ndarray, size: int, random: bool) -> Tensor:
    """A size x size crop (random or centred) as (3, size, size) float32; a short side below
    ``size`` is upscaled first (see the module docstring for why not padding)."""
    h, w = arr.shape[:2]
    if min(h, w) >= size:
        top, left = _offset(h, size, random), _offset(w, size, random)
        return to_tensor(arr[top : top + size, left : left + size])
    img = _upscale_short_side(to_tensor(arr), size)
    top, left = _offset(img.shape[1], size, random), _offset(img.shape[2], size, random)
    return img[:, top : top + size, left : left + size]


# ----------------------------------------------------------------------------- scanning folders


def _is_readable(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # PIL raises many types for broken files; any of them means "skip it"
        return False


def _warn_skipped(paths: list[Path], why: str) -> None:
    if not paths:
        return
    names = ", ".join(str(p) for p in paths[:_LISTED_IN_WARNING])
    more = f" and {len(paths) - _LISTED_IN_WARNING} more" if len(paths) > _LISTED_IN_WARNING else ""
    warnings.warn(f"skipping {len(paths)} {why}: {names}{more}", stacklevel=3)


def scan_images(folder: str | Path) -> list[Path]:
    """Sorted image files under ``folder`` (recursive) that PIL can open and verify.

    The unreadable ones are left out with one warning naming them, so a broken file costs a
    line in the log at start-up instead of a crash hours into training.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    candidates = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    with ThreadPoolExecutor(max_workers=8) as pool:
        readable = list(pool.map(_is_readable, candidates))
    _warn_skipped([p for p, ok in zip(candidates, readable, strict=True) if not ok], "unreadable images")
    return [p for p, ok in zip(candidates, readable, strict=True) if ok]


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) after EXIF orientation, without decoding the pixels."""
    with Image.open(path) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def scan_pairs(hr_dir: str | Path, lr_dir: str | Path, scale: int, min_lr_size: int = 1) -> list[tuple[Path, Path]]:
    """(hr, lr) pairs with the same relative path (any extension) whose sizes match at ``scale``.

    An HR side may exceed scale x LR by less than ``scale`` pixels (HR sizes that were not a
    multiple of the scale); the extra rows and columns are never used. Pairs that cannot be
    used are skipped with a warning naming them.
    """
    hr_paths = scan_images(hr_dir)
    lr_by_stem = {p.relative_to(lr_dir).with_suffix(""): p for p in scan_images(lr_dir)}
    pairs, missing, mismatched, small = [], [], [], []
    for hr in hr_paths:
        lr = lr_by_stem.get(hr.relative_to(hr_dir).with_suffix(""))
        if lr is None:
            missing.append(hr)
            continue
        (hh, hw), (lh, lw) = _image_size(hr), _image_size(lr)
        if not (0 <= hh - lh * scale < scale and 0 <= hw - lw * scale < scale):
            mismatched.append(hr)
        elif min(lh, lw) < min_lr_size:
            small.append(hr)
        else:
            pairs.append((hr, lr))
    _warn_skipped(missing, f"HR images without an LR twin in {lr_dir}")
    _warn_skipped(mismatched, f"HR images whose size is not {scale}x their LR's")
    _warn_skipped(small, f"pairs whose LR is smaller than the {min_lr_size}px LR crop")
    return pairs


def _require(count: int, needed: int, folder: object, what: str, why: str) -> None:
    if count < needed:
        raise DatasetError(f"{folder}: found {count} {what}, need at least {needed} ({why})")


# ----------------------------------------------------------------------------- datasets


def _flip(tensors: list[Tensor], hflip: bool, vflip: bool) -> list[Tensor]:
    if hflip and torch.rand(()) < 0.5:
        tensors = [t.flip(-1) for t in tensors]
    if vflip and torch.rand(()) < 0.5:
        tensors = [t.flip(-2) for t in tensors]
    return tensors


class _RetryingDataset(Dataset):
    """A file that passed the start-up check can still fail to decode (truncated data): warn,
    naming it, and use the next item instead of stopping the run."""

    def __init__(self, n: int) -> None:
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> dict:
        for attempt in range(_RETRIES):
            i = (index + attempt) % self._n
            try:
                return self._load(i)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                warnings.warn(f"skipping unreadable image {self._name(i)}: {exc}", stacklevel=2)
        raise DatasetError(f"{_RETRIES} images in a row failed to decode, starting at {self._name(index)}")

    def _load(self, i: int) -> dict:
        raise NotImplementedError

    def _name(self, i: int) -> str:
        raise NotImplementedError


class HRCropDataset(_RetryingDataset):
    """Random HR crops with flips: {"hr": (3, S, S), "path": str}."""

    def __init__(self, paths: list[Path], crop_size: int, hflip: bool = True, vflip: bool = False) -> None:
        super().__init__(len(paths))
        self.paths, self.crop_size, self.hflip, self.vflip = paths, crop_size, hflip, vflip

    def _name(self, i: int) -> str:
        return str(self.paths[i])

    def _load(self, i: int) -> dict:
        hr = crop_patch(read_image(self.paths[i]), self.crop_size, random=True)
        (hr,) = _flip([hr], self.hflip, self.vflip)
        return {"hr": hr, "path": str(self.paths[i])}


def _aligned_crop(
    hr: np.ndarray, lr: np.ndarray, lr_size: int | None, scale: int, random: bool
) -> tuple[Tensor, Tensor]:
    """Crop LR at (top, left) and HR at scale x (top, left); ``lr_size`` None keeps the whole LR."""
    lh, lw = lr.shape[:2]
    ch, cw = (lh, lw) if lr_size is None else (lr_size, lr_size)
    top, left = _offset(lh, ch, random), _offset(lw, cw, random)
    lr_t = to_tensor(lr[top : top + ch, left : left + cw])
    hr_t = to_tensor(hr[top * scale : (top + ch) * scale, left * scale : (left + cw) * scale])
    return hr_t, lr_t


class PairedCropDataset(_RetryingDataset):
    """Aligned random crops of LR/HR pairs: {"hr": (3, S, S), "lr": (3, S/scale, S/scale), "path"}."""

    def __init__(
        self, pairs: list[tuple[Path, Path]], crop_size: int, scale: int, hflip: bool = True, vflip: bool = False
    ) -> None:
        super().__init__(len(pairs))
        self.pairs, self.crop_size, self.scale, self.hflip, self.vflip = pairs, crop_size, scale, hflip, vflip

    def _name(self, i: int) -> str:
        return f"{self.pairs[i][0]} / {self.pairs[i][1]}"

    def _load(self, i: int) -> dict:
        hr_path, lr_path = self.pairs[i]
        hr, lr = _aligned_crop(read_image(hr_path), read_image(lr_path), self.crop_size // self.scale, self.scale, True)
        hr, lr = _flip([hr, lr], self.hflip, self.vflip)
        return {"hr": hr, "lr": lr, "path": str(hr_path)}


class ValidationDataset(_RetryingDataset):
    """Fixed validation images: centre crops of ``crop_size``, or full images (``crop_size`` None)
    trimmed to a multiple of ``scale``. With ``lr_paths`` each item has its "lr" too."""

    def __init__(
        self, hr_paths: list[Path], scale: int, crop_size: int | None = None, lr_paths: list[Path] | None = None
    ) -> None:
        super().__init__(len(hr_paths))
        if lr_paths is not None and len(lr_paths) != len(hr_paths):
            raise ValueError(f"lr_paths must match hr_paths: {len(hr_paths)} HR, {len(lr_paths)} LR")
        self.hr_paths, self.lr_paths, self.scale, self.crop_size = hr_paths, lr_paths, scale, crop_size

    def _name(self, i: int) -> str:
        return str(self.hr_paths[i])

    def _load(self, i: int) -> dict:
        hr = read_image(self.hr_paths[i])
        item: dict = {"path": str(self.hr_paths[i])}
        if self.lr_paths is not None:
            lr_size = None if self.crop_size is None else self.crop_size // self.scale
            item["hr"], item["lr"] = _aligned_crop(hr, read_image(self.lr_paths[i]), lr_size, self.scale, False)
        elif self.crop_size is not None:
            item["hr"] = crop_patch(hr, self.crop_size, random=False)
        else:
            h, w = hr.shape[:2]
            item["hr"] = to_tensor(hr[: h - h % self.scale, : w - w % self.scale])
        return item


# ----------------------------------------------------------------------------- loaders


def _check_crop(size: int, scale: int, name: str) -> None:
    if size % scale:
        raise ValueError(f"{name} ({size}) must be a multiple of the scale ({scale})")


def build_train_dataset(cfg: DataConfig, scale: int) -> Dataset:
    """Scan the folders (warning about unusable files) and build the training dataset."""
    if not cfg.hr_dirs:
        raise DatasetError("no training folders: set data.hr_dirs to one or more folders of HR images")
    _check_crop(cfg.crop_size, scale, "crop_size")
    if cfg.lr_dirs:
        pairs = []
        for hr_dir, lr_dir in zip(cfg.hr_dirs, cfg.lr_dirs, strict=True):
            pairs += scan_pairs(hr_dir, lr_dir, scale, min_lr_size=cfg.crop_size // scale)
        _require(len(pairs), cfg.batch_size, ", ".join(cfg.hr_dirs), "usable LR/HR pairs", "batch_size")
        return PairedCropDataset(pairs, cfg.crop_size, scale, cfg.hflip, cfg.vflip)
    paths = [p for folder in cfg.hr_dirs for p in scan_images(folder)]
    _require(len(paths), cfg.batch_size, ", ".join(cfg.hr_dirs), "readable images", "batch_size")
    return HRCropDataset(paths, cfg.crop_size, cfg.hflip, cfg.vflip)


def build_train_loader(cfg: DataConfig, scale: int, generator: torch.Generator | None = None) -> DataLoader:
    """Shuffled, endless-epoch-friendly loader of full batches (the last partial batch is dropped
    so that every step sees ``batch_size`` images). ``generator`` makes shuffling and the
    workers' crops reproducible."""
    dataset = build_train_dataset(cfg, scale)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        generator=generator,
    )


def build_val_loader(cfg: DataConfig, scale: int) -> DataLoader | None:
    """Loader of the fixed validation images, or None when ``cfg.val_hr_dir`` is not set."""
    if cfg.val_hr_dir is None:
        return None
    if cfg.val_crop_size is not None:
        _check_crop(cfg.val_crop_size, scale, "val_crop_size")
    lr_paths = None
    if cfg.val_lr_dir is not None:
        min_lr = 1 if cfg.val_crop_size is None else cfg.val_crop_size // scale
        pairs = scan_pairs(cfg.val_hr_dir, cfg.val_lr_dir, scale, min_lr_size=min_lr)
        hr_paths, lr_paths = [p[0] for p in pairs], [p[1] for p in pairs]
    else:
        hr_paths = scan_images(cfg.val_hr_dir)
    _require(len(hr_paths), 1, cfg.val_hr_dir, "usable validation images", "or unset val_hr_dir")
    dataset = ValidationDataset(hr_paths, scale, cfg.val_crop_size, lr_paths)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size if cfg.val_crop_size is not None else 1,
        shuffle=False,
        num_workers=cfg.num_workers,
    )
