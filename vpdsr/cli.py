"""The ``vpdsr`` command: upscale files and folders, inspect and convert model files.

Only the standard library is imported up front: torch and diffusers take seconds to import, so
they load when a command runs and ``--help``, ``--version`` and argument errors answer at once.
Arguments are checked, and every output path planned (``vpdsr.outputs``), before a model loads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import (
    DownloadNotAllowed,
    ImageError,
    MissingBaseError,
    NoDefaultModel,
    NonFiniteOutput,
    OutOfMemory,
    VPDError,
)
from .paths import DEFAULT, DEFAULT_MODEL_NAME, check_model_file, model_path
from .threads import PASSIVE_WAIT

if TYPE_CHECKING:
    from .modelfile import StudentMeta
    from .outputs import Job

# The choices of vpdsr.color, which imports torch; tests/test_cli.py keeps the two equal.
COLOR_FIXES = ("none", "adain", "wavelet")
DEFAULT_COLOR_FIX = "wavelet"
MAX_LISTED = 20  # file names shown for one kind of skip; the rest are counted
WRITTEN_MEANWHILE = "written meanwhile by another run (kept)"
EXIT_BROKEN_PIPE = 141  # what a shell reports for a command whose reader went away (128 + SIGPIPE)
# The flags that fix what the core reports: its messages name no flags, since the node and the demo have none.
HINTS: dict[type[VPDError], str] = {
    MissingBaseError: "pass them with --base",
    DownloadNotAllowed: "--allow-download lets --base name a Hugging Face repo",
    OutOfMemory: "--dtype fp16 runs in half precision, --device cpu on the CPU",
    NoDefaultModel: "pass one with --model",
    NonFiniteOutput: "--dtype fp32 or --dtype bf16 selects the precision",
}

UPSCALE_DESCRIPTION = """\
Upscale image files and folders (searched recursively for every format Pillow reads).

Results are PNG files named after their inputs, and a folder's subfolders are kept under -o.
Where two inputs would get one name (photo.jpg and photo.webp), each one that is not a .png is
named after its whole file name instead (photo.jpg.png, photo.webp.png).

An existing output is never replaced without --overwrite: it is kept and reported. That is also
how an interrupted run resumes: run the same command again and it does only what is left."""


MODEL_HELP = (f"a student .safetensors file, or '{DEFAULT}' for the embedded default model "
              f"(vpdsr/assets/{DEFAULT_MODEL_NAME}; a file called {DEFAULT} is ./{DEFAULT})")


def _scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 1 to 8, got {text!r}") from None
    if not (math.isfinite(value) and 1 <= value <= 8):
        raise argparse.ArgumentTypeError(f"the scale must be from 1 to 8, got {text}")
    return value


def _tile(text: str) -> int | None:
    """``auto`` (None: the pipeline picks), 0 (no tiling) or a tile size in output pixels."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected auto, 0 (off) or a tile size in output pixels, got {text!r}")
    return value


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {minimum}, got {text!r}")
        return value

    return parse


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def cmd_upscale(args: argparse.Namespace) -> int:
    from .outputs import plan_outputs

    plan = plan_outputs(args.inputs, args.output, overwrite=args.overwrite)
    if not plan.inputs:
        _report_skipped(plan.skipped)
        print("vpdsr: no input images found", file=sys.stderr)
        return 2
    if plan.jobs:  # a resumed run with nothing left to do needs no model
        check_model_file(model_path(args.model))  # a typo answers now, not after torch has loaded
    written, failed, taken, interrupted = _run(plan.jobs, args) if plan.jobs else (0, [], [], False)
    _report_skipped([*plan.skipped, *((job.target, WRITTEN_MEANWHILE) for job in taken)], plan.existing)
    for problem in failed:
        print(f"vpdsr: failed: {problem}", file=sys.stderr)
    images = _files(written, "image")
    if interrupted:
        print(f"vpdsr: interrupted after writing {images} to {plan.output}; run the same command again to resume "
              "(finished outputs are kept)", file=sys.stderr)  # fmt: skip
        return 130
    skipped = len(plan.skipped) + len(plan.existing) + len(taken)
    counts = [f"{n} {what}" for n, what in ((len(failed), "failed"), (skipped, "skipped")) if n]
    print(f"vpdsr: wrote {images} to {plan.output}" + (f" ({', '.join(counts)})" if counts else ""), file=sys.stderr)
    return 1 if failed else 0


def _run(jobs: Sequence[Job], args: argparse.Namespace) -> tuple[int, list[str], list[Job], bool]:
    """Load the model and upscale each job: (images written, why each failure failed, the jobs whose
    output another run wrote first, interrupted).

    Without --overwrite an output that appears while this run works is left as it is and counted as
    skipped: two runs into one folder share the work rather than report each other as failures.
    """
    from .imageio import DEFAULT_MAX_PIXELS, OutputTaken, load_image, save_image
    from .pipeline import load_pipeline

    pipe = load_pipeline(model=args.model, base=args.base, device=args.device, dtype=args.dtype,
                         allow_download=args.allow_download)  # fmt: skip
    options: dict[str, Any] = {"scale": args.scale, "tile": args.tile,
                               "color_fix": args.color_fix, "prompt": args.prompt}  # fmt: skip
    max_pixels = args.max_pixels or DEFAULT_MAX_PIXELS
    written, failed, taken = 0, [], []
    bar = _progress_bar(len(jobs), args.quiet)
    with warnings.catch_warnings():
        # the pipeline's notes (what a scale other than the model's own costs) as one line of ours,
        # not Python's "file:line: UserWarning" report
        warnings.showwarning = lambda message, *_: bar.write(f"vpdsr: note: {message}", file=sys.stderr)
        try:
            for job in jobs:
                bar.set_postfix_str(job.source.name)
                try:
                    image = load_image(job.source, max_pixels=max_pixels)
                    progress = _step_progress(bar, job.source.name, counts_steps=len(jobs) == 1)
                    result = pipe.upscale_pil(image, **options, progress=progress)
                    save_image(result, job.target, replace=args.overwrite)
                    written += 1
                except OutputTaken:
                    taken.append(job)
                except ImageError as err:  # its message starts with the file's name
                    failed.append(str(err))
                except VPDError as err:
                    failed.append(f"{job.source}: {err.worded(HINTS)}")
                except OSError as err:  # the path in the cause where it is another (a subfolder that is a file)
                    where = f": {err.filename}" if err.filename and Path(err.filename) != job.target else ""
                    failed.append(f"{job.target}: cannot write the result ({err.strerror or err}{where})")
                if len(jobs) > 1:
                    bar.update()  # a failed image counts as done too
        except KeyboardInterrupt:
            return written, failed, taken, True
        finally:
            bar.close()
    return written, failed, taken, False


def _progress_bar(images: int, quiet: bool) -> Any:
    """Whole units, never "0.3/1": several images count images; a single one counts the pipeline's steps
    (each stage's layers over each tile), so a large image shows its progress and time left too (a
    1920x1200 output once sat at 0/1 for 70 s)."""
    from tqdm import tqdm

    return tqdm(total=images if images > 1 else None, unit="img" if images > 1 else "step", disable=quiet,
                file=sys.stderr)  # fmt: skip


def _step_progress(bar: Any, name: str, counts_steps: bool) -> Callable[[int, int], None]:
    """The pipeline's progress hook (``done`` of ``total`` steps): the bar itself where it counts steps,
    else the image's own count beside its name, so a large image in a folder run shows it moves."""

    def update(done: int, total: int) -> None:
        if not counts_steps:
            if done * 100 // total != (done - 1) * 100 // total:  # a redraw per percent, not per step
                bar.set_postfix_str(f"{name} {done}/{total}")
            return
        if bar.total != total:
            bar.reset(total=total)  # the first call, or a retry with smaller tiles after running out of memory
        bar.update(done - bar.n)

    return update


def _report_skipped(skipped: Iterable[tuple[Path, str]], existing: Sequence[Job] = ()) -> None:
    """One line per reason, naming each file once (the first ``MAX_LISTED``, then a count)."""
    by_reason: dict[str, list[str]] = {}
    for path, reason in skipped:
        by_reason.setdefault(reason, []).append(str(path))
    for reason, names in by_reason.items():
        _list_files(f"skipped {_files(len(names))}, {reason}", names)
    if existing:
        them = "it" if len(existing) == 1 else "them"
        _list_files(f"kept {_files(len(existing), 'existing output')} (--overwrite replaces {them})",
                    [str(job.target) for job in existing])  # fmt: skip


def _files(n: int, what: str = "file") -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _list_files(head: str, names: list[str]) -> None:
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    print(f"vpdsr: {head}: {', '.join(names[:MAX_LISTED])}{more}", file=sys.stderr)


# What ``vpdsr info`` prints of free-form metadata: real files are far below these bounds.
MAX_TRAINING_KEYS = 8  # training entries in the summary
LARGE_METADATA = 64_000  # characters of metadata above which the summary says how many
MAX_INFO_STRING, MAX_INFO_ITEMS = 1000, 100  # per string, and per list or object, in --json


def cmd_info(args: argparse.Namespace) -> int:
    path = model_path(args.model)
    check_model_file(path)  # before torch loads, so a typo answers at once
    from .modelfile import read_meta

    meta = read_meta(path)
    if not (args.json or args.full):
        print(_summary(path, meta))
        return 0
    data = json.loads(meta.to_json())
    if not args.full:
        data["backbone"] = {"name": meta.backbone.name, "family": meta.backbone.family,
                            "vae_factor": meta.backbone.vae_factor,
                            "latent_channels": meta.backbone.latent_channels}  # fmt: skip
    data, cut = _bounded(data)
    print(json.dumps(data, indent=2))
    if cut:
        print(f"vpdsr: note: {cut} values longer than {MAX_INFO_STRING} characters or {MAX_INFO_ITEMS} items are "
              "cut short; the file's safetensors metadata ('vpdsr') holds them whole", file=sys.stderr)  # fmt: skip
    return 0


def _summary(path: Path, meta: StudentMeta, width: int = 60) -> str:
    """A few lines a person reads: what the model is, what it needs, how it was made.

    Every value is cut to ``width`` characters: metadata is free-form, and a file can carry
    megabytes of it (``metadata`` then says how much, and the training line which part).
    """
    weights = "full weights"
    if meta.weights == "lora":
        ranks = sorted({spec.rank for spec in meta.lora})
        weights = f"LoRA rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}, needs --base"
    lines = [
        f"name      {_cut(meta.name or path.stem, width)}",
        f"file      {path} ({path.stat().st_size / 1e6:.1f} MB)",
        f"backbone  {_cut(meta.backbone.name, width)}, {meta.backbone.family} family ({weights})",
        f"scale     x{meta.scale} (the scale it was trained for)",
    ]
    if meta.prompt:
        lines.append(f"prompt    {_cut(repr(meta.prompt), width)}")
    lines.append(f"training  {_training_summary(meta.training, width)}")
    size = len(meta.to_json())
    if size > LARGE_METADATA:
        lines.append(f"metadata  {_size(size)}")
    lines.append("(vpdsr info --json shows all metadata)")
    return "\n".join(lines)


def _training_summary(training: dict[str, Any], width: int = 60) -> str:
    """Its first plain values, each cut to ``width`` characters; nested ones (a whole config) by name and size."""
    if not training:
        return "not recorded"
    parts = []
    for key, value in islice(training.items(), MAX_TRAINING_KEYS):
        key = _cut(str(key), width)
        if isinstance(value, (dict, list)):
            parts.append(f"{key} ({_size(len(json.dumps(value)))}, see --json)")
        else:
            text = str(value)
            parts.append(f"{key}: {_cut(text, width)}" + (f" ({_size(len(text))})" if len(text) > width else ""))
    if len(training) > MAX_TRAINING_KEYS:
        parts.append(f"and {len(training) - MAX_TRAINING_KEYS} more (see --json)")
    return "; ".join(parts)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _size(chars: int) -> str:
    """A length of text as people read it: 812 bytes, 3.2 KB, 50.0 MB."""
    for unit, word in ((1e6, "MB"), (1e3, "KB")):
        if chars >= unit:
            return f"{chars / unit:.1f} {word}"
    return f"{chars} bytes"


def _bounded(value: Any) -> tuple[Any, int]:
    """``value`` with long strings and long lists or objects cut short, and how many were cut, so
    ``--json`` prints a 50 MB training log as a page. The loader bounds the nesting depth."""
    if isinstance(value, str):
        if len(value) <= MAX_INFO_STRING:
            return value, 0
        return f"{value[:MAX_INFO_STRING]}... ({_size(len(value))} in all)", 1
    if not isinstance(value, (dict, list)):
        return value, 0
    items = value.items() if isinstance(value, dict) else enumerate(value)
    kept = [(key, *_bounded(item)) for key, item in islice(items, MAX_INFO_ITEMS)]
    cut = sum(n for *_, n in kept) + (len(value) > MAX_INFO_ITEMS)
    more = [("...", f"... and {len(value) - MAX_INFO_ITEMS} more")] if len(value) > MAX_INFO_ITEMS else []
    pairs = [(key, item) for key, item, _ in kept] + more
    return (dict(pairs) if isinstance(value, dict) else [item for _, item in pairs]), cut


def cmd_convert_osediff(args: argparse.Namespace) -> int:
    from .osediff import convert_osediff

    path = convert_osediff(args.checkpoint, args.output, backbone=args.backbone, prompt=args.prompt)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; building it imports nothing heavy (plugins included)."""
    parser = argparse.ArgumentParser(prog="vpdsr", description="One-step diffusion super-resolution.")
    parser.add_argument("--version", action="version", version=f"vpdsr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("upscale", help="upscale image files or folders", description=UPSCALE_DESCRIPTION,
                        formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    up.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    up.add_argument("-o", "--output", required=True, help="output folder, or an image file name for a single input")
    up.add_argument("--overwrite", action="store_true",
                    help="replace existing outputs (without it they are kept, so running an interrupted "
                         "command again resumes it)")  # fmt: skip
    up.add_argument("--model", default=DEFAULT, help=f"{MODEL_HELP} (default: {DEFAULT})")
    up.add_argument("--base", help="base weights for LoRA students: a diffusers folder or a single-file .safetensors")
    up.add_argument("--scale", type=_scale, default=None,
                    help="upscale factor, 1 to 8 (default: the model's own scale)")  # fmt: skip
    up.add_argument("--tile", type=_tile, default=None, metavar="auto|0|N",
                    help="tile size in output pixels; 0 turns tiling off (default: auto)")  # fmt: skip
    up.add_argument("--color-fix", choices=COLOR_FIXES, default=DEFAULT_COLOR_FIX,
                    help=f"colour correction (default {DEFAULT_COLOR_FIX})")  # fmt: skip
    up.add_argument("--prompt", default=None, help="text prompt (models with a text encoder only)")
    up.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    up.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                    help="precision: auto is bf16 on CUDA GPUs that support it, else fp16 on a GPU; on the CPU "
                         "bf16 where the CPU has it in hardware, else fp32 (default auto)")  # fmt: skip
    up.add_argument("--max-pixels", type=_count(1), default=None,
                    help="refuse inputs with more pixels than this (default: 40 megapixels)")  # fmt: skip
    up.add_argument("--allow-download", action="store_true", help="let --base name a Hugging Face repo and download it")
    up.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    up.set_defaults(func=cmd_upscale)

    info = sub.add_parser("info", help="show a model file's metadata")
    info.add_argument("model", help=MODEL_HELP)
    info.add_argument("--json", action="store_true", help="print all metadata as JSON")
    info.add_argument("--full", action="store_true", help="JSON with the backbone's full config (implies --json)")
    info.set_defaults(func=cmd_info)

    conv = sub.add_parser("convert-osediff", help="import a released OSEDiff checkpoint (osediff.pkl)")
    conv.add_argument("checkpoint", help="OSEDiff .pkl file")
    conv.add_argument("-o", "--output", required=True, help="output .safetensors file")
    conv.add_argument("--backbone", default="sd21-base",
                      help="backbone it was trained on: a bundled name or a backbone JSON file "
                           "(default sd21-base)")  # fmt: skip
    conv.add_argument("--prompt", default="",
                      help="prompt to condition on (computed with the base's text encoder at load)")  # fmt: skip
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


def _drop_stdout() -> None:
    """Point stdout at /dev/null once its reader is gone (``vpdsr info MODEL | head``), so the
    flush at exit does not fail a second time with Python's own report."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (a test's capture): nothing to flush
        pass


def main(argv: Sequence[str] | None = None) -> int:
    for name, value in PASSIVE_WAIT.items():  # read once, when torch's OpenMP starts: see vpdsr.threads
        os.environ.setdefault(name, value)
    try:
        try:
            args = build_parser().parse_args(argv)
            return int(args.func(args))
        finally:
            sys.stdout.flush()  # here, not at exit, so a closed pipe is caught below
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_BROKEN_PIPE
    except VPDError as err:
        print(f"vpdsr: {err.worded(HINTS)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vpdsr: interrupted", file=sys.stderr)
        return 130
