"""vpdsr.osediff: importing OSEDiff checkpoints, checked against an OSEDiff-style reference model.

The checkpoint is written exactly the way OSEDiff's training saves one (diffusers ``add_adapter``
with peft's default alpha, the same target lists, the same dict keys), for the toy SD 2 backbone.
The imported student must compute what that reference computes, including OSEDiff's sampler step.
"""

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from PIL import Image

from conftest import photo_like
from tests.sd_fixtures import TINY_SD2, random_parts, text_tower, write_diffusers_folder
from vpdsr.cli import main
from vpdsr.errors import ModelFileError
from vpdsr.lora import LoraSpec
from vpdsr.modelfile import Preprocess, StudentMeta, read_meta
from vpdsr.osediff import (
    OSEDIFF_LORA_ALPHA,
    OSEDIFF_PREPROCESS,
    convert_osediff,
    osediff_lora_specs,
    osediff_lora_targets,
)
from vpdsr.pipeline import load_pipeline, resize_input

RANK = 4
UNET_ADAPTERS = {"default_encoder": "unet_lora_encoder_modules", "default_decoder": "unet_lora_decoder_modules",
                 "default_others": "unet_lora_others_modules"}  # fmt: skip
# SD 2.1-base's scheduler_config.json (a PNDMScheduler config), which OSEDiff loads into DDPMScheduler
SD21_BASE_SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                       "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
                       "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}  # fmt: skip


# SD 2.1's depth at toy width: an f8 VAE and a UNet with three downsamplings, so vpdsr's default
# multiple is 64 px while OSEDiff feeds multiples of 8 px (latents that are not multiples of 8)
DEEP_SD2 = copy.deepcopy(TINY_SD2)
DEEP_SD2["name"] = "tiny-sd2-deep"
DEEP_SD2["vae"].update(block_out_channels=[8, 8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
                       up_block_types=["UpDecoderBlock2D"] * 4)  # fmt: skip
DEEP_SD2["unet"].update(block_out_channels=[16, 16, 32, 32], attention_head_dim=[2, 2, 4, 4], layers_per_block=1,
                        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)  # fmt: skip


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """RGB PSNR in dB for images in [0, 1]."""
    return float(10 * torch.log10(1 / ((a.double() - b.double()) ** 2).mean()))


def to_pil(image: torch.Tensor) -> Image.Image:
    """A CHW tensor of 8-bit levels in [0, 1] as the RGB image it was read from."""
    return Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy())


def osediff_script_input(image: Image.Image) -> torch.Tensor:
    """The LR as OSEDiff's test_osediff.py feeds it to the network, in [0, 1] (before its ``*2-1``).

    Left out: the script first enlarges inputs whose short side is under process_size / 4 = 128 px
    (and keeps its output that large); vpdsr's output size is always the scale times the input.
    """
    image = image.convert("RGB")
    image = image.resize((image.width * 4, image.height * 4))  # PIL's default filter, BICUBIC
    image = image.resize((image.width - image.width % 8, image.height - image.height % 8), Image.LANCZOS)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255  # ToTensor


def osediff_script_output(output: torch.Tensor) -> torch.Tensor:
    """The script's 8-bit result of a network output in [-1, 1]: ToPILImage truncates (mul(255).byte())."""
    return (output.clamp(-1, 1) * 0.5 + 0.5).mul(255).byte()


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
    lr = torch.randint(0, 256, (1, 3, 8, 8)) / 255  # an 8-bit image, which the file says to resize with PIL
    x = osediff_script_input(to_pil(lr[0])) * 2 - 1
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


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A toy OSEDiff on the SD 2.1-depth toy, converted from the command line with ``--backbone toy.json``."""
    root = tmp_path_factory.mktemp("osediff-deep")
    unet, vae = random_parts(DEEP_SD2, seed=4)
    base = write_diffusers_folder(root / "base", unet, vae, text_tower())
    *_, checkpoint = osediff_reference(unet, vae, seed=1)
    torch.save(checkpoint, root / "osediff.pkl")
    (root / "toy.json").write_text(json.dumps(DEEP_SD2))
    out = root / "osediff.safetensors"
    code = main(["convert-osediff", str(root / "osediff.pkl"), "-o", str(out), "--backbone", str(root / "toy.json"),
                 "--prompt", "a photo"])  # fmt: skip
    assert code == 0
    lr = root / "lr.png"
    Image.fromarray(photo_like(18, 26, seed=2)).save(lr)  # 72x104 px at x4: latents 9x13, no multiple of 8
    pipe = load_pipeline(out, base=base, device="cpu", dtype="fp32")
    with torch.no_grad():  # what OSEDiff's script computes with this network (without its 8-bit rounding)
        forward = pipe.student(osediff_script_input(Image.open(lr)) * 2 - 1)[0].clamp(-1, 1)
    return {"base": base, "model": out, "lr": lr, "pipe": pipe, "forward": forward,
            "x": torch.from_numpy(np.array(Image.open(lr))).permute(2, 0, 1)[None] / 255}  # fmt: skip


def test_cli_upscale_matches_osediff_script(deep, tmp_path):
    """``vpdsr upscale`` on an LR PNG gives what OSEDiff's test script gives for the same network:
    PIL's bicubic on the 8-bit image, no padding past a multiple of 8, the output saved in 8 bits."""
    result = tmp_path / "sr.png"
    code = main(["upscale", str(deep["lr"]), "-o", str(result), "--model", str(deep["model"]), "--base",
                 str(deep["base"]), "--color-fix", "none", "--device", "cpu", "--dtype", "fp32", "-q"])  # fmt: skip
    assert code == 0
    ours = torch.from_numpy(np.array(Image.open(result))).permute(2, 0, 1)
    assert ours.shape == (3, 72, 104)
    assert psnr(ours / 255, osediff_script_output(deep["forward"]) / 255) >= 50  # its truncation costs ~51 dB
    rounded = ((deep["forward"] + 1) * 127.5).round()
    assert (ours - rounded).abs().max() <= 1  # the same network output, rounded where the script truncates


def test_old_preprocessing_is_not_osediffs(deep):
    """The test above can fail: torch bicubic and padding to 64 px give another result."""
    pipe, lr, script = deep["pipe"], deep["x"], (deep["forward"] + 1) / 2
    matched = pipe(lr, color_fix="none", tile=0)
    pipe.meta.preprocess = Preprocess()
    try:
        assert pipe.multiple == 64
        old = pipe(lr, color_fix="none", tile=0)
    finally:
        pipe.meta.preprocess = OSEDIFF_PREPROCESS
    assert psnr(matched, script) > 60 > 30 > psnr(old, script)


def test_tiles_and_one_tile_with_latents_off_the_unet_grid(deep):
    """Pad-to-8 latents (9x13) through the layer-wise tiles: a tile larger than the image is the
    untiled call itself (no padding to a tile grid), and small tiles agree with it."""
    pipe, lr = deep["pipe"], deep["x"]
    untiled = pipe(lr, color_fix="none", tile=0)
    assert untiled.shape[2:] == (72, 104)
    assert torch.equal(pipe(lr, color_fix="none", tile=512), untiled)
    assert psnr(pipe(lr, color_fix="none", tile=32), untiled) >= 60


def test_file_records_osediff_preprocessing(deep):
    meta = read_meta(deep["model"])
    assert meta.preprocess == OSEDIFF_PREPROCESS == Preprocess("pil-bicubic-uint8", 8)
    assert meta.backbone.name == "tiny-sd2-deep" and deep["pipe"].multiple == 8
    data = json.loads(meta.to_json())
    assert data["preprocess"] == {"resize": "pil-bicubic-uint8", "pad_multiple": 8}
    del data["preprocess"]  # a file written before the field: today's behaviour
    old = StudentMeta.from_json(json.dumps(data), "old.safetensors")
    assert old.preprocess == Preprocess("torch-bicubic", None)


@pytest.mark.parametrize(
    "preprocess, message",
    [({"resize": "lanczos"}, "resize must be one of"), ({"pad_multiple": 12}, "multiple of the VAE factor 8"),
     ({"pad_multiple": True}, "pad_multiple"), ({"pad_multiple": 0}, "pad_multiple")],
)  # fmt: skip
def test_refuses_bad_preprocessing(deep, preprocess, message):
    data = json.loads(read_meta(deep["model"]).to_json())
    data["preprocess"] = preprocess
    with pytest.raises(ModelFileError, match=message):
        StudentMeta.from_json(json.dumps(data), "bad.safetensors")


def test_pil_resize_keeps_more_than_8_bits():
    """A 16-bit image gets PIL's bicubic in float, not cut to 8 bits first; 8-bit ones go through PIL's own
    8-bit resize exactly."""
    torch.manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 3, 3), size=(6, 7), mode="bilinear") * 0.8 + 0.1
    deep_levels = (smooth * 65535).round() / 65535
    eight = (deep_levels * 255).round() / 255
    up16, up8 = resize_input(deep_levels, 24, 28, "pil-bicubic-uint8"), resize_input(eight, 24, 28, "pil-bicubic-uint8")
    assert not torch.equal((up16 * 255).round() / 255, up16)  # finer than 8-bit levels
    assert (up16 - up8).abs().max() < 1.5 / 255  # the same filter (PIL rounds between its two 8-bit passes)
    expected = to_pil(eight[0]).resize((28, 24), Image.BICUBIC)
    assert torch.equal(up8[0], torch.from_numpy(np.array(expected)).permute(2, 0, 1).float() / 255)


def test_cli_backbone_json_errors(setup, tmp_path, capsys):
    missing = ["convert-osediff", str(setup["pkl"]), "-o", str(tmp_path / "x.safetensors")]
    assert main([*missing, "--backbone", str(tmp_path / "none.json")]) == 2
    assert "backbone config file not found" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main([*missing, "--backbone", str(tmp_path / "bad.json")]) == 2
    assert "a backbone config is a JSON object" in capsys.readouterr().err
