"""A validation split of our own: held-out photos, degraded by the trainer's pipeline with fixed seeds.

    python -m bench.val_split --photos PHOTOS -o runs/val [--train runs/train-photos]
        [--every 8] [--crops 4] [--crop 256] [--seed 0]

Settings (the colour fix, checkpoints, loss weights) are chosen here and never on DRealSR,
which stays a test set that is reported once. A photo is held out when a hash of its path
relative to ``--photos`` falls in one of ``--every`` buckets, so the split does not depend on
the order of the files or on which other photos exist, and adding photos never moves one from
validation into training. Each held-out photo gives ``--crops`` HR crops of ``--crop`` pixels
at seeded positions; each crop is degraded on its own by ``trainer.degradations`` (the default
Real-ESRGAN second-order ranges, x4) under a seed of its own. Writes ``OUT/HR`` and ``OUT/LR``
(PNG, same names), the layout ``bench.quality --lr --hr`` reads, and ``OUT/photos.txt``.
``--train`` makes a folder of links to the photos that are not held out, for ``data.hr_dirs``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import torch

from bench.quality_io import to_image
from trainer.batches import derive_seed
from trainer.data import crop_patch, read_image, scan_images
from trainer.degradations import DegradationConfig, degrade

_SCALE = 4


def held_out(relative: str, every: int) -> bool:
    """Whether the photo at this relative path is a validation photo (one in ``every``)."""
    digest = hashlib.sha256(relative.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % every == 0


def make_split(photos: Path, out: Path, every: int, crops: int, crop: int, seed: int, train: Path | None) -> int:
    """Write the split (see the module docstring); returns the number of crops."""
    paths = scan_images(photos)
    rel = [p.relative_to(photos).as_posix() for p in paths]
    val = [(p, r) for p, r in zip(paths, rel, strict=True) if held_out(r, every)]
    if not val:
        raise SystemExit(f"no photo of {photos} falls into the validation split (every={every})")
    (out / "HR").mkdir(parents=True, exist_ok=True)
    (out / "LR").mkdir(parents=True, exist_ok=True)
    cfg, count = DegradationConfig(), 0
    for i, (path, r) in enumerate(val):
        arr = read_image(path)
        stem = r.replace("/", "__").rsplit(".", 1)[0]
        for k in range(crops):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(seed, i, k, 1))
                hr = crop_patch(arr, crop, random=True)
            lr, _ = degrade(hr[None], cfg, torch.Generator().manual_seed(derive_seed(seed, i, k, 2)), _SCALE)
            to_image(hr[None]).save(out / "HR" / f"{stem}__{k}.png")
            to_image(lr).save(out / "LR" / f"{stem}__{k}.png")
            count += 1
    (out / "photos.txt").write_text("".join(f"{r}\n" for _, r in val), encoding="utf-8")
    if train is not None:
        train.mkdir(parents=True, exist_ok=True)
        for p, r in zip(paths, rel, strict=True):
            link = train / r.replace("/", "__")
            if not held_out(r, every) and not link.exists():
                os.symlink(p.resolve(), link)
    print(f"{len(val)} of {len(paths)} photos held out, {count} crops in {out}")
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, required=True, help="folder of photos (searched recursively)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="folder for HR/, LR/ and photos.txt")
    parser.add_argument("--train", type=Path, help="folder to fill with links to the photos not held out")
    parser.add_argument("--every", type=int, default=8, help="hold out one photo in EVERY (by a hash of its path)")
    parser.add_argument("--crops", type=int, default=4, help="crops per held-out photo")
    parser.add_argument("--crop", type=int, default=256, help="HR crop side (a multiple of 4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.crop % _SCALE or args.every < 1 or args.crops < 1:
        parser.error("--crop must be a multiple of 4; --every and --crops at least 1")
    make_split(args.photos, args.out, args.every, args.crops, args.crop, args.seed, args.train)
    return 0


if __name__ == "__main__":
    sys.exit(main())
