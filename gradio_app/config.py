"""What the demo is started with: model files, limits and where it listens.

Every setting has a command-line flag and an environment variable, so the same demo runs from a
shell (``vpdsr demo --model ...``), from ``python gradio_app/app.py`` and in a container where
only the environment can be set. Flags win over the environment.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
# A web demo takes uploads from anyone who can reach it, so its limits are far below the CLI's:
# 4 megapixels in is 64 megapixels out at x4.
DEFAULT_MAX_PIXELS = 4_000_000
# What the network may compute per request: 2048x2048, a 512x512 upload at x4, took two minutes with
# the tiny default model on a busy 2-core CPU; the input limit alone allows 64 megapixels, an hour.
DEFAULT_MAX_OUTPUT_PIXELS = 2048 * 2048
# Requests waiting for the model at once; more are refused with gradio's "queue is full".
DEFAULT_MAX_QUEUE = 8
DEFAULT_MAX_FILE_SIZE = "25mb"
DEFAULT_MAX_BATCH = 16


@dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo instance; ``None`` model means the embedded default."""

    model: Path | None = None
    base: Path | None = None
    clip: Path | None = None
    clip_config: str | None = None
    device: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS
    max_file_size: str = DEFAULT_MAX_FILE_SIZE
    max_batch: int = DEFAULT_MAX_BATCH
    concurrency: int = 1
    max_queue: int = DEFAULT_MAX_QUEUE
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT


# flag, environment variable, help; the environment supplies the default, the flag overrides it
_OPTIONS: list[tuple[str, str, str]] = [
    ("--model", "VPDSR_MODEL", "student .safetensors file (default: the embedded default model)"),
    ("--base", "VPDSR_BASE", "base weights for LoRA students: a diffusers folder or a single-file .safetensors"),
    ("--clip", "VPDSR_CLIP", "OpenCLIP checkpoint for the semantics tab and prompts from tags (optional)"),
    ("--clip-config", "VPDSR_CLIP_CONFIG", "OpenCLIP config name or JSON file for --clip, if its file has none"),
    ("--device", "VPDSR_DEVICE", "auto, cpu, cuda, cuda:N or mps (default auto)"),
    ("--host", "VPDSR_DEMO_HOST", f"address to listen on (default {DEFAULT_HOST}; 0.0.0.0 exposes the demo)"),
    ("--port", "VPDSR_DEMO_PORT", f"port to listen on (default {DEFAULT_PORT})"),
    ("--max-pixels", "VPDSR_MAX_PIXELS", f"largest input image in pixels (default {DEFAULT_MAX_PIXELS})"),
    (
        "--max-output-pixels",
        "VPDSR_MAX_OUTPUT_PIXELS",
        f"most pixels the network computes per request, all images together (default {DEFAULT_MAX_OUTPUT_PIXELS})",
    ),
    ("--max-file-size", "VPDSR_MAX_FILE_SIZE", f"largest upload, e.g. 25mb (default {DEFAULT_MAX_FILE_SIZE})"),
    ("--max-batch", "VPDSR_MAX_BATCH", f"most files in one batch (default {DEFAULT_MAX_BATCH})"),
    ("--concurrency", "VPDSR_CONCURRENCY", "model jobs run at the same time (default 1: one GPU job at a time)"),
    ("--max-queue", "VPDSR_MAX_QUEUE", f"requests that may wait for the model (default {DEFAULT_MAX_QUEUE})"),
]


def launch_option(flag: str) -> str:
    """How a message names a setting: its flag and its environment variable, since a demo in a
    container is started with the one and from a shell with the other."""
    env = next(env for name, env, _ in _OPTIONS if name == flag)
    return f"{flag} or {env}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's flags, shared by ``vpdsr demo``, ``python -m gradio_app`` and ``app.py``."""
    for flag, env, text in _OPTIONS:
        parser.add_argument(flag, default=os.environ.get(env), help=f"{text} [env {env}]")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """Validate the flags once, at start-up, so a typo fails before the server is up."""

    def path(value: str | None) -> Path | None:
        return Path(value).expanduser() if value else None

    def positive(name: str, value: str | None, default: int) -> int:
        if value in (None, ""):
            return default
        try:
            number = int(value)
        except ValueError:
            raise SystemExit(f"vpdsr demo: --{name} must be a whole number, got {value!r}") from None
        if number < 1:
            raise SystemExit(f"vpdsr demo: --{name} must be at least 1, got {number}")
        return number

    return DemoConfig(
        model=path(args.model),
        base=path(args.base),
        clip=path(args.clip),
        clip_config=args.clip_config or None,
        device=args.device or "auto",
        max_pixels=positive("max-pixels", args.max_pixels, DEFAULT_MAX_PIXELS),
        max_output_pixels=positive("max-output-pixels", args.max_output_pixels, DEFAULT_MAX_OUTPUT_PIXELS),
        max_file_size=args.max_file_size or DEFAULT_MAX_FILE_SIZE,
        max_batch=positive("max-batch", args.max_batch, DEFAULT_MAX_BATCH),
        concurrency=positive("concurrency", args.concurrency, 1),
        max_queue=positive("max-queue", args.max_queue, DEFAULT_MAX_QUEUE),
        host=args.host or DEFAULT_HOST,
        port=positive("port", args.port, DEFAULT_PORT),
    )
