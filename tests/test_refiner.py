"""The tiny-v3 pixel refiner: a zero start, a model-file round trip, and training from a v2 file."""

from __future__ import annotations

import torch

import pytest

from trainer.config_loading import ConfigError
from trainer.stages.student import init_from_student
from vpdsr.backbones import backbone_config, build_backbone
from vpdsr.model import OneStepStudent
from vpdsr.modelfile import load_student, save_student
from vpdsr.pipeline import load_pipeline


@pytest.fixture(scope="module")
def v2_file(tmp_path_factory) -> str:
    """A tiny-v2 student file with random weights (the refiner's base; the shipped default is tiny-v4)."""
    torch.manual_seed(0)
    parts = build_backbone("tiny-v2")
    student = OneStepStudent(parts.vae, parts.unet, parts.config, prompt_embeds=torch.randn(8, 64))
    return str(save_student(tmp_path_factory.mktemp("v2") / "v2.safetensors", student, wavelet_levels=3))


def test_a_refiner_added_to_a_v2_file_starts_at_its_exact_output(tmp_path, v2_file) -> None:
    config = backbone_config("tiny-v3")
    vae, unet, cond, _ = init_from_student(v2_file, config)
    student = OneStepStudent(vae, unet, config, prompt_embeds=cond).eval()
    assert student.refiner is not None
    x = torch.rand(1, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        assert torch.equal(student(x), load_student(v2_file)(x))
    default = load_pipeline(v2_file)
    path = save_student(tmp_path / "v3.safetensors", student, wavelet_levels=3)
    assert any(p.startswith("vae.refiner.") for p in load_student(path).state_dict())
    image = torch.rand(1, 3, 40, 36)
    tiled = load_pipeline(path)(image, scale=4, tile=64)
    assert tiled.shape == (1, 3, 160, 144)
    assert (tiled - default(image, scale=4, tile=64)).abs().max() < 1e-5


def test_init_from_student_refuses_another_backbone(v2_file) -> None:
    try:
        init_from_student(v2_file, backbone_config("tiny"))
    except ConfigError as err:
        assert "differs" in str(err)
    else:
        raise AssertionError("a tiny-v2 file was accepted for the tiny backbone")
