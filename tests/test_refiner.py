"""The tiny-v3 pixel refiner: a zero start, a model-file round trip, and training from a v2 file."""

from __future__ import annotations

import torch

from trainer.config_loading import ConfigError
from trainer.stages.student import init_from_student
from vpdsr.backbones import backbone_config
from vpdsr.model import OneStepStudent
from vpdsr.modelfile import load_student, save_student
from vpdsr.pipeline import default_model_path, load_pipeline


def test_a_refiner_added_to_the_default_starts_at_its_exact_output(tmp_path) -> None:
    config = backbone_config("tiny-v3")
    vae, unet, cond, _ = init_from_student(str(default_model_path()), config)
    student = OneStepStudent(vae, unet, config, prompt_embeds=cond).eval()
    assert student.refiner is not None
    x = torch.rand(1, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        assert torch.equal(student(x), load_student(default_model_path())(x))
    default = load_pipeline()
    m = default.meta
    path = save_student(tmp_path / "v3.safetensors", student, wavelet_levels=m.wavelet_levels, ring_clamp=m.ring_clamp)
    assert any(p.startswith("vae.refiner.") for p in load_student(path).state_dict())
    image = torch.rand(1, 3, 40, 36)
    tiled = load_pipeline(path)(image, scale=4, tile=64)
    assert tiled.shape == (1, 3, 160, 144)
    assert (tiled - default(image, scale=4, tile=64)).abs().max() < 1e-5


def test_init_from_student_refuses_another_backbone() -> None:
    try:
        init_from_student(str(default_model_path()), backbone_config("tiny"))
    except ConfigError as err:
        assert "differs" in str(err)
    else:
        raise AssertionError("a tiny-v2 file was accepted for the tiny backbone")
