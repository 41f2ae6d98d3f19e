import pytest
import torch
from diffusers import DDPMScheduler

from vpdsr import OneStepStudent, build_backbone
from vpdsr.backbones import alphas_cumprod, available_backbones, backbone_config
from vpdsr.errors import ModelFileError
from vpdsr.model import predicted_x0


def _scheduler(prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)  # fmt: skip


def test_bundled_backbones_and_scheduler_facts():
    assert {"sd21-base", "sd-turbo", "tiny"} <= set(available_backbones())
    for name in ("sd21-base", "sd-turbo"):
        cfg = backbone_config(name)
        assert cfg.scaling_factor == pytest.approx(0.18215)
        assert cfg.vae_factor == 8 and cfg.latent_channels == 4
        assert cfg.scheduler["beta_start"] == 0.00085 and cfg.scheduler["beta_end"] == 0.012
        assert cfg.prediction_type == "epsilon"
    tiny = backbone_config("tiny")
    assert tiny.vae_factor == 4 and tiny.latent_channels == 8


def test_alphas_cumprod_match_diffusers():
    ours = alphas_cumprod(backbone_config("sd21-base").scheduler)
    theirs = _scheduler("epsilon").alphas_cumprod.double()
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("t", [999, 500, 20])
def test_x0_matches_diffusers_arithmetic(prediction_type: str, t: int):
    sched = _scheduler(prediction_type)
    torch.manual_seed(t)
    x0 = torch.randn(2, 4, 8, 8)
    noise = torch.randn_like(x0)
    z_t = sched.add_noise(x0, noise, torch.tensor([t]))
    target = noise if prediction_type == "epsilon" else sched.get_velocity(x0, noise, torch.tensor([t]))
    abar = sched.alphas_cumprod[t]
    # the exact prediction recovers x0 through our formula
    assert torch.allclose(predicted_x0(z_t, target, abar, prediction_type), x0, atol=2e-3)
    if t < 999:  # diffusers' step() cannot run at t=999; where it can, it agrees with us
        sched.set_timesteps(1000)
        pred = torch.randn_like(x0)
        expected = sched.step(pred, t, z_t).pred_original_sample
        assert torch.allclose(predicted_x0(z_t, pred, abar, prediction_type), expected, atol=1e-4)


def test_student_shapes_and_determinism():
    torch.manual_seed(0)
    parts = build_backbone("tiny")
    student = OneStepStudent(parts.vae, parts.unet, parts.config).eval()
    x = torch.rand(1, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        z = student.encode(x)
        assert z.shape == (1, 8, 16, 12)
        a, b = student(x), student(x)
    assert a.shape == x.shape and torch.equal(a, b)


def test_student_rejects_bad_arguments():
    parts = build_backbone("tiny")
    with pytest.raises(ValueError, match="timestep"):
        OneStepStudent(parts.vae, parts.unet, parts.config, timestep=1000)
    with pytest.raises(ValueError, match="prompt_embeds"):
        OneStepStudent(parts.vae, parts.unet, parts.config, prompt_embeds=torch.zeros(77, 1024))


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ModelFileError, match="unknown backbone 'sd99'"):
        backbone_config("sd99")


def test_tiny_v2_decoder_upsamples_smoothly_with_the_same_weight_keys():
    from vpdsr.backbones import SmoothUpsample

    v2 = backbone_config("tiny-v2")
    assert v2.vae_factor == 4 and v2.latent_channels == 16 and v2.extra["vae_upsample"] == "bilinear"
    smooth = build_backbone(v2).vae
    ups = [u for b in smooth.decoder.up_blocks if b.upsamplers is not None for u in b.upsamplers]
    assert len(ups) == 2 and all(isinstance(u, SmoothUpsample) for u in ups)
    nearest = build_backbone({**v2.to_dict(), "vae_upsample": "nearest"}).vae
    assert smooth.state_dict().keys() == nearest.state_dict().keys()
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert smooth.decode(smooth.encode(x).latent_dist.mean).sample.shape == x.shape
    with pytest.raises(ModelFileError, match="vae_upsample must be"):
        build_backbone({**v2.to_dict(), "vae_upsample": "bicubic"})
