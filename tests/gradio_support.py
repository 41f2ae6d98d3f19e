"""What the demo tests share: a tiny random student, small test images, and the demo started as
``python gradio_app/app.py`` in a subprocess."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from vpdsr import OneStepStudent, build_backbone, save_student


def write_tiny_student(path: Path) -> Path:
    """A tiny-backbone student with random weights: the demo's plumbing, not its quality."""
    torch.manual_seed(0)
    backbone = build_backbone("tiny")
    student = OneStepStudent(backbone.vae, backbone.unet, backbone.config)
    return save_student(path, student, name="tiny-random", training_info={"note": "random weights, tests only"})


def write_image(path: Path, width: int = 32, height: int = 32, seed: int = 0) -> Path:
    """A smooth random colour image (noise upscaled), saved losslessly."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    coarse.resize((width, height), Image.Resampling.BICUBIC).save(path)
    return path


REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300  # a guard only: start-up is import time, ~15 s on an idle 2-core machine


def start_app(cwd: Path, env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    """``python gradio_app/app.py --port PORT`` as a user would start it, its output in ``log``."""
    with log.open("w") as out:  # the child keeps its own handle
        return subprocess.Popen(
            [sys.executable, str(REPO / "gradio_app" / "app.py"), "--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_until_up(url: str, server: subprocess.Popen, log: Path) -> None:
    """Return once the page answers; fail with the server's log if it exits or never does."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the demo exited with code {server.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    pytest.fail(f"the demo did not answer within {START_TIMEOUT_S} s:\n{log.read_text()}")
