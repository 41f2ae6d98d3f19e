"""The ``vpdsr`` command: upscale files and folders, inspect and convert model files."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from .color import COLOR_FIXES, DEFAULT_COLOR_FIX
from .errors import VPDError
from .imageio import DEFAULT_MAX_PIXELS, load_image, save_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def _collect(inputs: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        else:
            files.append(path)
    return files


def _output_path(src: Path, out: Path, single: bool) -> Path:
    if single and out.suffix.lower() in IMAGE_SUFFIXES:
        return out
    return out / (src.stem + ".png")


def cmd_upscale(args: argparse.Namespace) -> int:
    from .pipeline import load_pipeline

    files = _collect(args.inputs)
    if not files:
        print("vpdsr: no input images found", file=sys.stderr)
        return 2
    pipe = load_pipeline(model=args.model, base=args.base, device=args.device, dtype=args.dtype, allow_download=args.allow_download)
    out = Path(args.output)
    failures = 0
    bar = tqdm(files, unit="img", disable=args.quiet)
    for src in bar:
        bar.set_postfix_str(src.name)
        dst = _output_path(src, out, single=len(files) == 1)
        try:
            image = load_image(src, max_pixels=args.max_pixels)
            result = pipe.upscale_pil(image, scale=args.scale, tile=args.tile, overlap=args.overlap, color_fix=args.color_fix, prompt=args.prompt)
            save_image(result, dst)
        except VPDError as err:
            failures += 1
            tqdm.write(f"vpdsr: skipped {src}: {err}", file=sys.stderr)
    if failures:
        print(f"vpdsr: {failures} of {len(files)} images failed", file=sys.stderr)
        return 1
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .modelfile import read_meta

    meta = read_meta(args.model)
    data = json.loads(meta.to_json())
    if not args.full:
        data["backbone"] = {"name": meta.backbone.name, "vae_factor": meta.backbone.vae_factor,
                            "latent_channels": meta.backbone.latent_channels}  # fmt: skip
    print(json.dumps(data, indent=2))
    return 0


def cmd_convert_osediff(args: argparse.Namespace) -> int:
    from .osediff import convert_osediff

    path = convert_osediff(args.checkpoint, args.output, backbone=args.backbone, prompt=args.prompt)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpdsr", description="One-step diffusion super-resolution.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("upscale", help="upscale image files or folders")
    up.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    up.add_argument("-o", "--output", required=True, help="output folder, or a file name for a single input")
    up.add_argument("--model", help="student .safetensors file (default: the embedded default model)")
    up.add_argument("--base", help="base weights for LoRA students: a diffusers folder or a single-file .safetensors")
    up.add_argument("--scale", type=float, default=4.0, help="upscale factor, 1 to 8 (default 4)")
    up.add_argument("--tile", type=int, default=None, help="tile size in output pixels; 0 disables (default: auto)")
    up.add_argument("--overlap", type=int, default=64, help="tile overlap in output pixels (default 64)")
    up.add_argument("--color-fix", choices=COLOR_FIXES, default=DEFAULT_COLOR_FIX, help=f"colour correction (default {DEFAULT_COLOR_FIX})")
    up.add_argument("--prompt", default=None, help="text prompt (models with a text encoder only)")
    up.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    up.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    up.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse inputs with more pixels")
    up.add_argument("--allow-download", action="store_true", help="let --base name a Hugging Face repo and download it")
    up.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    up.set_defaults(func=cmd_upscale)

    info = sub.add_parser("info", help="show a model file's metadata")
    info.add_argument("model")
    info.add_argument("--full", action="store_true", help="include the full backbone config")
    info.set_defaults(func=cmd_info)

    conv = sub.add_parser("convert-osediff", help="import a released OSEDiff checkpoint (osediff.pkl)")
    conv.add_argument("checkpoint", help="OSEDiff .pkl file")
    conv.add_argument("-o", "--output", required=True, help="output .safetensors file")
    conv.add_argument("--backbone", default="sd21-base", help="backbone it was trained on (default sd21-base)")
    conv.add_argument("--prompt", default="", help="prompt to condition on (computed with the base's text encoder at load)")
    conv.set_defaults(func=cmd_convert_osediff)
    _add_plugin_commands(sub)
    return parser


def _add_plugin_commands(sub: argparse._SubParsersAction) -> None:
    """Front-ends add their own subcommands (e.g. ``vpdsr demo``) through entry points, so the
    core never imports them; a front-end whose dependencies are missing simply adds nothing."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="vpdsr.commands"):
        try:
            register = entry.load()
        except ImportError:
            continue
        register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except VPDError as err:
        print(f"vpdsr: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vpdsr: interrupted", file=sys.stderr)
        return 130
