"""Shared fixtures: tiny students built offline, and small photo-like images made here."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vpdsr import OneStepStudent, build_backbone, pipeline, save_student, threads


@pytest.fixture(scope="session", autouse=True)
def temp_files_in_pytests_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Whatever a test leaves in a temp folder goes into pytest's own base folder, which pytest rotates
    (it keeps the last three runs): gradio caches uploads and results in ``$GRADIO_TEMP_DIR`` (else
    ``/tmp/gradio``), and gradio_client makes a 40-hex-digit folder in the system temp folder for every
    file it downloads and leaves it there empty. ``TMPDIR`` carries the same to the servers and commands
    the tests start. One folder for the session, not one per test: a demo served for a whole module
    accepts only files under the temp folder it was started with."""
    base = tmp_path_factory.getbasetemp()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(base / "gradio"))
        patch.setenv("TMPDIR", str(base))
        patch.setattr(tempfile, "tempdir", str(base))
        yield


@pytest.fixture(scope="session", autouse=True)
def one_thread_count() -> Iterator[None]:
    """The automatic CPU thread count follows the machine's load (vpdsr.threads), and another count sums
    floats in another order; tests that compare two pipeline calls bit for bit need the same count for both."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(threads, "_other_runnable", lambda: 0)
        yield


@pytest.fixture(scope="session", autouse=True)
def fp32_on_every_cpu() -> Iterator[None]:
    """"auto" precision on the CPU is bf16 where the CPU has it in hardware (vpdsr.pipeline), so the
    same test would run bf16 here and fp32 on another CI machine; the suite pins fp32 everywhere, and
    the tests of bf16 ask for it by name."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "cpu_has_native_bf16", lambda: False)
        yield


def photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth image with edges and texture: what a photo looks like to the networks."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.random((1, 3, 6, 6), dtype=np.float32))
    base = F.interpolate(low, size=(height, width), mode="bicubic", align_corners=False)[0]
    yy, xx = np.mgrid[0:height, 0:width]
    stripes = 0.15 * np.sin(xx / 3.0 + yy / 7.0)[None]
    disc = ((yy - height / 2) ** 2 + (xx - width / 3) ** 2 < (min(height, width) / 4) ** 2)[None] * 0.2
    img = (base.numpy() + stripes + disc).clip(0, 1)
    return (img.transpose(1, 2, 0) * 255).round().astype(np.uint8)


@pytest.fixture(scope="session")
def random_student_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    parts = build_backbone("tiny")
    student = OneStepStudent(parts.vae, parts.unet, parts.config, prompt_embeds=torch.randn(8, 64))
    return save_student(tmp_path_factory.mktemp("models") / "random.safetensors", student, name="random-tiny")


@pytest.fixture
def photo_file(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(photo_like(40, 56)).save(path)
    return path
