"""vpdsr.osediff: importing OSEDiff checkpoints, checked against an OSEDiff-style reference model.

The checkpoint is written exactly the way OSEDiff's training saves one (diffusers ``add_adapter``
with peft's default alpha, the same target lists, the same dict keys), for the toy SD 2 backbone.
The imported student must compute what that reference computes, including OSEDiff's sampler step.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from tests.sd_fixtures import TINY_SD2, random_parts, text_tower, write_diffusers_folder
from vpdsr.errors import ModelFileError
from vpdsr.lora import LoraSpec
from vpdsr.modelfile import read_meta
from vpdsr.osediff import OSEDIFF_LORA_ALPHA, convert_osediff, osediff_lora_specs, osediff_lora_targets
from vpdsr.pipeline import load_pipeline

RANK = 4
UNET_ADAPTERS = {"default_encoder": "unet_lora_encoder_modules", "default_decoder": "unet_lora_decoder_modules",
                 "default_others": "unet_lora_others_modules"}  # fmt: skip
# SD 2.1-base's scheduler_config.json (a PNDMScheduler config), which OSEDiff loads into DDPMScheduler
SD21_BASE_SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                       "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
                       "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}  # fmt: skip


def osediff_reference(unet, vae, seed=0):
    """Adapted copies of the base parts, set up as OSEDiff does, and its checkpoint dict."""
    unet, vae = copy.deepcopy(unet), copy.deepcopy(vae)
    targets = osediff_lora_targets(unet, vae)
    for name, key in UNET_ADAPTERS.items():
        with warnings.catch_warnings():  # peft warns when a model gets a second adapter
            warnings.simplefilter("ignore")
            unet.add_adapter(
                LoraConfig(r=RANK, init_lora_weights="gaussian", target_modules=targets[key]), adapter_name=name
            )
    unet.set_adapter(list(UNET_ADAPTERS))
    vae.add_adapter(LoraConfig(r=RANK, init_lora_weights="gaussian", target_modules=targets["vae_lora_encoder_modules"]),
                    adapter_name="default_encoder")  # fmt: skip
    vae.set_adapter(["default_encoder"])
    torch.manual_seed(seed)
    with torch.no_grad():  # trained adapters and a trained conv_in (lora_B starts at zero otherwise)
        for model in (unet, vae):
            for name, p in model.named_parameters():
                if "lora_" in name or name.startswith("conv_in."):
                    p.add_(torch.randn_like(p) * 0.05)
    checkpoint = {
        **targets,
        "rank_unet": RANK,
        "rank_vae": RANK,
        "state_dict_unet": {k: v for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k},
        "state_dict_vae": {k: v for k, v in vae.state_dict().items() if "lora" in k},
    }
    return unet.eval(), vae.eval(), checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("osediff")
    unet, vae = random_parts(seed=3)
    tower = text_tower()
    base = write_diffusers_folder(root / "base", unet, vae, tower)
    ref_unet, ref_vae, checkpoint = osediff_reference(unet, vae)
    pkl = root / "osediff.pkl"
    torch.save(checkpoint, pkl)
    out = convert_osediff(pkl, root / "osediff.safetensors", backbone=TINY_SD2, prompt="a photo of a cat")
    pipe = load_pipeline(out, base=base, device="cpu", dtype="fp32")
    return {
        "root": root,
        "pkl": pkl,
        "out": out,
        "pipe": pipe,
        "ref_unet": ref_unet,
        "ref_vae": ref_vae,
        "checkpoint": checkpoint,
    }


def test_targets_follow_osediff_rules(setup):
    ckpt = setup["checkpoint"]
    assert "conv_in" in ckpt["unet_lora_encoder_modules"] and "conv_out" in ckpt["unet_lora_decoder_modules"]
    assert all(n.startswith("mid_block.") for n in ckpt["unet_lora_others_modules"])
    assert (
        "quant_conv" in ckpt["vae_lora_encoder_modules"] and "post_quant_conv" not in ckpt["vae_lora_encoder_modules"]
    )
    assert all(n.startswith("encoder.") or n == "quant_conv" for n in ckpt["vae_lora_encoder_modules"])
    assert not any("norm" in n for lst in ("unet_lora_encoder_modules", "vae_lora_encoder_modules") for n in ckpt[lst])
    # conv_in is itself adapted, so OSEDiff saves its base weights under peft's wrapped name
    assert "conv_in.base_layer.weight" in ckpt["state_dict_unet"]


def test_file_metadata(setup):
    meta = read_meta(setup["out"])
    assert meta.weights == "lora" and not meta.has_prompt_embeds and meta.prompt == "a photo of a cat"
    assert meta.timestep == 999 and meta.scale == 4 and meta.backbone.name == "tiny-sd2"
    assert {(s.part, s.name) for s in meta.lora} == {("unet", n) for n in UNET_ADAPTERS} | {("vae", "default_encoder")}
    assert all(s.rank == RANK and s.alpha == OSEDIFF_LORA_ALPHA == 8 for s in meta.lora)
    assert meta.training["imported_file"] == "osediff.pkl" and len(meta.training["imported_sha256"]) == 64


def test_lora_scaling_is_peft_default(setup):
    layers = [m for m in setup["pipe"].student.unet.modules() if isinstance(m, LoraLayer)]
    assert layers and all(s == OSEDIFF_LORA_ALPHA / RANK for m in layers for s in m.scaling.values())


def test_student_parts_equal_reference(setup):
    s, ref_unet, ref_vae = setup["pipe"].student, setup["ref_unet"], setup["ref_vae"]
    torch.manual_seed(5)
    x, z, cond = torch.rand(1, 3, 16, 16) * 2 - 1, torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    t = torch.tensor([999, 999])
    with torch.no_grad():
        torch.testing.assert_close(
            s.unet(z, t, encoder_hidden_states=cond).sample, ref_unet(z, t, encoder_hidden_states=cond).sample
        )
        torch.testing.assert_close(s.vae.encode(x).latent_dist.mean, ref_vae.encode(x).latent_dist.mean)
        torch.testing.assert_close(s.vae.decode(z).sample, ref_vae.decode(z).sample)


def test_prompt_is_embedded_with_base_text_encoder(setup):
    pipe = setup["pipe"]
    torch.testing.assert_close(pipe.student.prompt_embeds.data, pipe.text_encoder("a photo of a cat")[0])
    assert pipe.student.prompt_embeds.abs().sum() > 0


def test_one_step_matches_osediff_sampler(setup):
    """OSEDiff calls DDPMScheduler.set_timesteps(1), then step(eps, 999, z), under its pinned
    diffusers 0.25, whose step takes the previous timestep as 999 - 1000 // 1 = -1 (newer diffusers
    look 999 up in the schedule and fail). With abar_prev = 1 the step returns the x0 estimate
    (z - sqrt(1 - abar) eps) / sqrt(abar), plus its variance, which is 0 (clamped to 1e-20, so
    1e-10 * noise). Custom timesteps [999] give today's diffusers that same previous timestep."""
    pipe, ref_unet, ref_vae = setup["pipe"], setup["ref_unet"], setup["ref_vae"]
    scheduler = DDPMScheduler.from_config(SD21_BASE_SCHEDULER)
    scheduler.set_timesteps(timesteps=[999])
    assert int(scheduler.previous_timestep(999)) == -1
    torch.manual_seed(7)
    lr = torch.rand(1, 3, 8, 8)
    x = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1) * 2 - 1
    with torch.no_grad():
        sf = ref_vae.config.scaling_factor
        z = ref_vae.encode(x).latent_dist.mean * sf  # OSEDiff samples; vpdsr uses the mean
        cond = pipe.text_encoder("a photo of a cat")
        eps = ref_unet(z, torch.tensor([999]), encoder_hidden_states=cond).sample
        x0 = scheduler.step(eps, 999, z, generator=torch.Generator().manual_seed(0)).prev_sample
        reference = ref_vae.decode(x0 / sf).sample.clamp(-1, 1)
        torch.testing.assert_close(pipe.student.denoise(z), x0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pipe.student(x).clamp(-1, 1), reference, rtol=1e-5, atol=1e-5)
    out = pipe(lr, scale=4, color_fix="none", tile=0)
    torch.testing.assert_close(out, ((reference + 1) / 2).clamp(0, 1), rtol=1e-4, atol=1e-4)


def test_specs_dedupe_and_skip_empty_lists():
    ckpt = {"rank_unet": 2, "rank_vae": 3, "unet_lora_encoder_modules": ["a", "b", "a"], "unet_lora_decoder_modules": [],
            "unet_lora_others_modules": ["c"], "vae_lora_encoder_modules": ["quant_conv"] * 3}  # fmt: skip
    specs = osediff_lora_specs(ckpt)
    assert specs == [
        LoraSpec("unet", "default_encoder", 2, 8.0, ("a", "b")),
        LoraSpec("unet", "default_others", 2, 8.0, ("c",)),
        LoraSpec("vae", "default_encoder", 3, 8.0, ("quant_conv",)),
    ]


class Namespace:  # what a checkpoint pickled with an argparse namespace or a model object holds
    pass


def test_refuses_checkpoints_needing_unpickling(setup, tmp_path):
    bad = tmp_path / "bad.pkl"
    torch.save({**setup["checkpoint"], "args": Namespace()}, bad)
    with pytest.raises(ModelFileError, match="not a plain OSEDiff checkpoint"):
        convert_osediff(bad, tmp_path / "x.safetensors", backbone=TINY_SD2)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.pop("rank_vae"), "lacks"),
        (lambda c: c.update(rank_unet=0), "positive integer"),
        (lambda c: c.update(rank_unet=8), "wrong shape"),
        (lambda c: c["unet_lora_others_modules"].append("mid_block.nonexistent"), "do not exist"),
        (
            lambda c: c["state_dict_unet"].update({"time_embedding.linear_1.lora_A.x.weight": torch.zeros(1)}),
            "not parameters",
        ),
        (lambda c: c["state_dict_vae"].pop(next(iter(c["state_dict_vae"]))), "LoRA weights are missing"),
        (
            lambda c: c["state_dict_unet"].update(
                {"conv_in.base_layer.weight": torch.full((32, 4, 3, 3), float("nan"))}
            ),
            "finite",
        ),
    ],
)
def test_refuses_malformed_checkpoints(setup, tmp_path, change, message):
    checkpoint = copy.deepcopy(setup["checkpoint"])
    change(checkpoint)
    path = tmp_path / "broken.pkl"
    torch.save(checkpoint, path)
    with pytest.raises(ModelFileError, match=message):
        convert_osediff(path, tmp_path / "x.safetensors", backbone=TINY_SD2)


def test_refuses_other_files(setup, tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        convert_osediff(tmp_path / "missing.pkl", tmp_path / "x.safetensors")
    with pytest.raises(ModelFileError, match=".safetensors"):
        convert_osediff(setup["pkl"], tmp_path / "x.pkl")
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ModelFileError, match="not a readable"):
        convert_osediff(garbage, tmp_path / "x.safetensors")
    tensor = tmp_path / "tensor.pkl"
    torch.save(torch.zeros(2), tensor)
    with pytest.raises(ModelFileError, match="not an OSEDiff checkpoint"):
        convert_osediff(tensor, tmp_path / "x.safetensors")


def test_tiny_checkpoint_does_not_fit_sd21_base(setup, tmp_path):
    """The default backbone: names check out (same block layout), shapes do not."""
    with pytest.raises(ModelFileError, match="wrong shape"):
        convert_osediff(setup["pkl"], tmp_path / "x.safetensors")
