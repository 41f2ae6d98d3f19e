"""The backbone-family seam (``vpdsr.backbones.family``): SD 2 and an SDXL-style toy through every path.

The SDXL toy has SDXL's UNet layout (added ``text_time`` conditioning from a pooled embedding and
size/crop time ids, several transformer layers per block, self-attention) at toy width, built here
with random weights: it runs through the model-file round trip, tiled inference, ``vpdsr upscale``,
the base-weight loader and the trainer's student stage (the full SDXL size is built on the meta
device in ``test_backbones_meta.py``).
A file written before families existed (``tests/fixtures/student-v1-sd2.safetensors``, written with
the code of commit 22df8d7) still loads, as an SD 2 student, with the output it had then.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vpdsr
from conftest import photo_like
from tests.sd_fixtures import SD2_SCHEDULER, TINY_SD2, ldm_state, random_parts, unet_key_to_ldm, write_diffusers_folder
from tests.test_trainer import SD21, common, logged_names
from trainer.config import load_config
from trainer.loop import train
from vpdsr import layerwise
from vpdsr.backbones import FAMILIES, available_backbones, backbone_config, build_backbone, detect_family
from vpdsr.cli import main
from vpdsr.errors import ModelFileError
from vpdsr.model import OneStepStudent
from vpdsr.modelfile import load_student, read_meta, save_student
from vpdsr.weights import load_base

FIXTURES = Path(__file__).parent / "fixtures"
POOLED = "pooled_prompt_embeds"
TOY_SDXL = {
    "name": "toy-sdxl",
    "family": "sdxl",
    "description": "SDXL's UNet layout at toy width (tests only)",
    "vae": {**TINY_SD2["vae"], "scaling_factor": 0.13025},
    "unet": {
        "act_fn": "silu", "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 16 + 6 * 8, "attention_head_dim": [2, 4],
        "block_out_channels": [32, 64], "cross_attention_dim": 32, "transformer_layers_per_block": [1, 2],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 8,
        "use_linear_projection": True,
    },
    "scheduler": SD2_SCHEDULER,
    "text_encoder": None,
    "prompt_embed_shape": [8, 32],
    "time_ids": [64, 64, 0, 0, 64, 64],
}  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_student(seed: int = 0) -> OneStepStudent:
    unet, vae = random_parts(TOY_SDXL, seed)
    torch.manual_seed(seed)
    extras = {POOLED: torch.randn(16)}
    config = backbone_config(TOY_SDXL)
    return OneStepStudent(vae, unet, config, prompt_embeds=torch.randn(8, 32), extra_embeds=extras).eval()


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory) -> Path:
    return save_student(tmp_path_factory.mktemp("sdxl") / "toy-sdxl.safetensors", toy_student(), name="toy-sdxl")


# ----------------------------------------------------------------------------- the registry


def test_every_bundled_backbone_has_a_family_and_configs_without_one_are_sd2():
    families = {name: backbone_config(name).family for name in available_backbones()}
    assert families["sdxl-base"] == "sdxl"
    assert {families[n] for n in ("sd21-base", "sd-turbo", "tiny", "tiny-v2", "tiny-v3")} == {"sd2"}
    assert set(FAMILIES) == {"sd2", "sdxl"}
    assert backbone_config(TINY_SD2).family == "sd2"  # a config written before families existed
    with pytest.raises(ModelFileError, match="unknown backbone family 'sd99'"):
        backbone_config({**TINY_SD2, "family": "sd99"})
    with pytest.raises(ModelFileError, match="text_time"):
        build_backbone({**TOY_SDXL, "unet": {**TOY_SDXL["unet"], "addition_embed_type": None}})


def test_single_file_layouts_are_detected():
    sd2 = list(ldm_state(*random_parts(), None))
    assert detect_family(sd2).name == "sd2"
    assert detect_family([*sd2, "conditioner.embedders.1.model.ln_final.weight"]).name == "sdxl"
    assert detect_family(["model.diffusion_model.label_emb.0.0.weight", "first_stage_model.x"]).name == "sdxl"
    assert detect_family(["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"]) is None


# ----------------------------------------------------------------------------- files written earlier


def test_a_file_written_in_todays_format_still_loads_as_sd2():
    path = FIXTURES / "student-v1-sd2.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert "family" not in json.loads(f.metadata()["vpdsr"])["backbone"]  # really written before families
    student = load_student(path)
    assert student.config.family == "sd2" and read_meta(path).name == "format-v1"
    io = load_file(str(FIXTURES / "student-v1-sd2-io.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(student(io["x"]), io["y"], rtol=0, atol=1e-5)


def test_the_embedded_default_loads_as_sd2():
    pipe = vpdsr.load_pipeline(device="cpu")
    assert pipe.student.config.family == "sd2" and not dict(pipe.student.extra_embeds)


# ----------------------------------------------------------------------------- the SDXL-style toy


def test_toy_sdxl_model_file_round_trip(toy_file):
    student = toy_student()
    assert set(load_file(str(toy_file))) >= {"prompt_embeds", POOLED}
    assert read_meta(toy_file).backbone.family == "sdxl"
    loaded = load_student(toy_file)
    assert torch.equal(loaded.extra_embeds[POOLED], student.extra_embeds[POOLED])
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        y = student(x)
        assert torch.equal(loaded(x), y)
        # the pooled embedding reaches the UNet: another one changes the result
        loaded.extra_embeds[POOLED].data.add_(1.0)
        assert (loaded(x) - y).abs().max() > 1e-3


def test_toy_sdxl_tiles_layer_by_layer_with_its_added_conditioning():
    student = toy_student()
    z = torch.randn(1, 4, 23, 17, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        kwargs = student.unet_inputs(z)
        ref = student.unet(z, **kwargs).sample
        for tile in (0, 8):
            assert (layerwise.unet_forward(student.unet, z, **kwargs, tile=tile) - ref).abs().max() < 1e-4


def test_vpdsr_upscale_runs_a_toy_sdxl_student(toy_file, tmp_path, capsys):
    image = tmp_path / "in.png"
    Image.fromarray(photo_like(12, 16)).save(image)
    code = main(["upscale", str(image), "-o", str(tmp_path / "out"), "--model", str(toy_file), "--tile", "32", "-q"])
    assert code == 0, capsys.readouterr().err
    with Image.open(tmp_path / "out" / "in.png") as out:
        assert out.size == (64, 48)


def test_sdxl_base_weights_load_and_the_wrong_family_is_named(tmp_path):
    unet, vae = random_parts(TOY_SDXL)
    folder = write_diffusers_folder(tmp_path / "toy-sdxl", unet, vae)
    base = load_base(TOY_SDXL, folder)
    assert base.text_encoder is None
    assert torch.equal(base.unet.add_embedding.linear_1.weight, unet.add_embedding.linear_1.weight)
    wider = {**TOY_SDXL["unet"], "projection_class_embeddings_input_dim": 24 + 6 * 8}  # another pooled width
    with pytest.raises(ModelFileError, match="projection_class_embeddings_input_dim"):
        load_base({**TOY_SDXL, "unet": wider}, folder)
    # the SDXL single-file layout: the added-embedding MLP is the LDM UNet's label_emb
    added = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    state = {}
    for key, value in unet.state_dict().items():
        head, _, tail = key.rpartition(".")
        name = f"{added[head]}.{tail}" if head in added else unet_key_to_ldm(key, TOY_SDXL["unet"])
        state[f"model.diffusion_model.{name}"] = value
    state.update({k: v for k, v in ldm_state(*random_parts(), None).items() if k.startswith("first_stage_model.")})
    path = tmp_path / "toy-sdxl.safetensors"
    save_file(state, str(path))
    single = load_base(TOY_SDXL, path)
    for key, value in unet.state_dict().items():
        assert torch.equal(single.unet.state_dict()[key], value), key
    with pytest.raises(ModelFileError, match="SDXL"):
        load_base(TINY_SD2, path)
    sd2_file = tmp_path / "sd2.safetensors"
    save_file(ldm_state(*random_parts(), None), str(sd2_file))
    with pytest.raises(ModelFileError, match="Stable Diffusion 2.x"):
        load_base(TOY_SDXL, sd2_file)


def test_student_stage_trains_a_toy_sdxl_lora_student(tmp_path):
    """The sd21-student recipe (LoRA + conv_in, VSD against the frozen base with CFG) on the toy:
    the base from a diffusers folder, no text encoder, so prompts are empty and conditioning zero."""
    images = tmp_path / "hr"
    images.mkdir()
    for i in range(2):
        Image.fromarray(photo_like(40, 40, seed=i)).save(images / f"img{i}.png")
    unet, vae = random_parts(TOY_SDXL)
    base = write_diffusers_folder(tmp_path / "base", unet, vae)
    (tmp_path / "toy-sdxl.json").write_text(json.dumps(TOY_SDXL))
    out = tmp_path / "student"
    cfg = load_config(SD21, common(images, out) + [
        f"backbone={tmp_path / 'toy-sdxl.json'}", f"student.base={base}", "student.negative_prompt=",
        "optim.steps=2", "optim.mixed_precision=no", "optim.gradient_checkpointing=false", "validation.every=2",
        "losses.semantic.weight=0", "losses.semantic.kl_weight=0", "data.batch_size=1",
    ])  # fmt: skip
    path = train(cfg, progress=False)
    assert {"rec", "vsd", "vsd_fake", "val/psnr"} <= logged_names(out)
    meta = read_meta(path)
    assert meta.backbone.family == "sdxl" and meta.weights == "lora" and {s.part for s in meta.lora} == {"unet", "vae"}
    assert POOLED in load_file(str(path))
    pipe = vpdsr.load_pipeline(model=path, base=base, device="cpu")
    assert pipe(torch.rand(1, 3, 12, 12), color_fix="none").shape == (1, 3, 48, 48)
