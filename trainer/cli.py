"""Command line of the trainer (``trainer/run.py``, ``python -m trainer``).

python trainer/run.py --config trainer/configs/tiny-student.yaml [section.key=value ...]
python trainer/run.py --config ... --resume latest
python trainer/run.py degrade-preview --config ... --out grid.png
accelerate launch trainer/run.py --config ...            (multi-GPU, mixed precision)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]

# Everything heavy (torch, diffusers, kornia) is imported after the arguments are parsed, so
# that --help and usage errors answer at once.


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainer/run.py",
        description="Train vpdsr models: an SR teacher, a one-step student, or a degradation-aware CLIP.",
        epilog="Overrides set any config key, e.g. data.hr_dirs=[photos] optim.steps=500 losses.vsd.weight=0.5",
    )
    parser.add_argument("command", nargs="?", default="train", choices=("train", "degrade-preview"))
    parser.add_argument("--config", required=True, help="YAML config (see trainer/configs/)")
    parser.add_argument("--resume", metavar="CHECKPOINT", help="'latest' or a checkpoint folder to continue from")
    parser.add_argument("--out", help="degrade-preview: the PNG to write")
    parser.add_argument("--count", type=int, default=4, help="degrade-preview: how many images (default 4)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs still written)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``key=value`` items anywhere on the line are overrides; argparse sees the rest."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    return [a for a in argv if a not in overrides], overrides


def _degrade_preview(args: argparse.Namespace, overrides: list[str]) -> int:
    from .config import ConfigError, load_config
    from .data import DatasetError, scan_images
    from .degradations import write_degrade_preview

    if not args.out:
        print("degrade-preview needs --out grid.png", file=sys.stderr)
        return 2
    cfg = load_config(args.config, overrides)
    if not cfg.data.hr_dirs:
        raise ConfigError("degrade-preview takes its images from data.hr_dirs; set it (e.g. data.hr_dirs=[photos])")
    images = [p for folder in cfg.data.hr_dirs for p in scan_images(folder)][: args.count]
    if not images:
        raise DatasetError(f"no readable images in {', '.join(cfg.data.hr_dirs)}")
    crop = min(cfg.data.crop_size, 256) // cfg.scale * cfg.scale
    path = write_degrade_preview(images, cfg.degradation, args.out, seed=cfg.seed, scale=cfg.scale, crop_size=crop)
    print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    from vpdsr.errors import VPDError

    from .config import ConfigError, load_config
    from .data import DatasetError

    try:
        if args.command == "degrade-preview":
            return _degrade_preview(args, overrides)
        from .loop import TrainingInterrupted, TrainingStopped, train

        cfg = load_config(args.config, overrides)
        try:
            path = train(cfg, resume=args.resume, progress=not args.no_progress)
        except TrainingInterrupted as err:
            print(f"{err}; continue with: --resume latest", file=sys.stderr)
            return 130
        except TrainingStopped as err:
            print(f"training stopped: {err}", file=sys.stderr)
            return 1
        if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
            print(f"exported {path}")
        return 0
    except (ConfigError, DatasetError, VPDError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
