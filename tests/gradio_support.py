"""Files the demo tests share: a tiny random student and small test images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
