"""vpdsr.weights / vpdsr.text_encoder: base weights from single files, diffusers folders and the hub.

Files are written in the real layouts (original LDM keys; diffusers folders with a transformers
text encoder) for a toy SD 2 backbone, so every conversion path runs for real in under a second.
"""

import pytest
import torch
from safetensors.torch import save_file

from tests.sd_fixtures import (
    TINY_SD2,
    UNET_PREFIX,
    VAE_PREFIX,
    hf_text_encoder_from_tower,
    hf_tokenizer,
    ldm_state,
    random_parts,
    text_tower,
    tiny_config,
    write_diffusers_folder,
)
from vpdsr.errors import DownloadNotAllowed, ModelFileError
from vpdsr.text_encoder import build_open_clip_text_encoder
from vpdsr.weights import load_base


@pytest.fixture(scope="module")
def parts():
    unet, vae = random_parts()
    return unet, vae, text_tower()


@pytest.fixture(scope="module")
def single_file(parts, tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "tiny-sd2.safetensors"
    save_file(ldm_state(*parts), str(path))
    return path


@pytest.fixture(scope="module")
def folder(parts, tmp_path_factory):
    return write_diffusers_folder(tmp_path_factory.mktemp("sd") / "tiny-sd2", *parts)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sb[key].dtype == torch.float32
        assert torch.equal(sa[key], sb[key]), key


def assert_same_outputs(unet, vae, base) -> None:
    torch.manual_seed(1)
    z, cond, x = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32), torch.rand(1, 3, 16, 16) * 2 - 1
    t = torch.tensor([999])
    with torch.no_grad():
        torch.testing.assert_close(
            base.unet(z, t, encoder_hidden_states=cond).sample, unet(z, t, encoder_hidden_states=cond).sample
        )
        torch.testing.assert_close(base.vae.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean)
        torch.testing.assert_close(base.vae.decode(z).sample, vae.decode(z).sample)


def reference_penultimate(tower, ids):
    """SD 2's FrozenOpenCLIPEmbedder(layer="penultimate"), written out on the full tower."""
    x = tower.token_embedding(ids) + tower.positional_embedding
    for block in tower.transformer.resblocks[:-1]:
        x = block(x, attn_mask=tower.attn_mask)
    return tower.ln_final(x)


def test_single_file_round_trip(parts, single_file):
    unet, vae, tower = parts
    base = load_base(TINY_SD2, single_file)
    assert_same_weights(unet, base.unet)
    assert_same_weights(vae, base.vae)
    assert_same_outputs(unet, vae, base)
    ids = base.text_encoder.tokenizer(["a photo of a cat"])
    with torch.no_grad():
        expected = reference_penultimate(tower, ids)
    torch.testing.assert_close(base.text_encoder("a photo of a cat"), expected)
    assert len(base.text_encoder.tower.transformer.resblocks) == 2  # the unused top block is never built


def test_ckpt_is_read_with_weights_only(parts, tmp_path):
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": ldm_state(*parts), "global_step": 3}, path)
    base = load_base(TINY_SD2, path)
    assert_same_weights(parts[0], base.unet)


class Callback:  # stands in for the pytorch-lightning objects old .ckpt files pickle
    pass


def test_ckpt_with_python_objects_is_refused(parts, tmp_path):
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": ldm_state(*parts), "callbacks": Callback()}, path)
    with pytest.raises(ModelFileError, match="will not unpickle"):
        load_base(TINY_SD2, path)


def test_open_clip_penultimate_equals_diffusers_text_encoder(parts):
    """The open_clip route (single files) and the transformers route (diffusers folders) agree."""
    tower = parts[2]
    state = tower.state_dict()
    ours = build_open_clip_text_encoder(TINY_SD2["text_encoder"], dict(state))
    hf, _ = hf_text_encoder_from_tower(tower)  # converted by diffusers' own open_clip -> HF converter
    ids = hf_tokenizer()(
        "a red house by the sea", padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    assert torch.equal(ids, ours.tokenizer(["a red house by the sea"]))
    with torch.no_grad():
        torch.testing.assert_close(ours("a red house by the sea"), hf(ids).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_diffusers_folder_round_trip(parts, folder, single_file):
    unet, vae, _ = parts
    base = load_base(TINY_SD2, folder)
    assert_same_weights(unet, base.unet)
    assert_same_weights(vae, base.vae)
    assert_same_outputs(unet, vae, base)
    prompt = "a photo of a cat"
    out = base.text_encoder(prompt)
    assert out.shape == (1, 77, 32)
    torch.testing.assert_close(out, load_base(TINY_SD2, single_file).text_encoder(prompt), rtol=1e-5, atol=1e-5)


def test_folder_without_text_encoder(parts, tmp_path):
    base = load_base(TINY_SD2, write_diffusers_folder(tmp_path / "m", parts[0], parts[1]))
    assert base.text_encoder is None


def test_broken_text_encoder_folder_degrades_with_warning(parts, folder, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "tokenizer")
    with pytest.warns(UserWarning, match="text encoder could not be loaded"):
        base = load_base(TINY_SD2, copy)
    assert base.text_encoder is None and base.unet is not None


def test_folder_text_encoder_of_another_depth_is_not_used(parts, folder, tmp_path):
    """A 3-block encoder would condition on the last block, not SD 2's penultimate one."""
    import shutil

    from transformers import CLIPTextModel

    copy = tmp_path / "m"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "text_encoder")
    config = hf_text_encoder_from_tower(parts[2])[0].config
    config.num_hidden_layers = 3
    CLIPTextModel(config).save_pretrained(copy / "text_encoder")
    with pytest.warns(UserWarning, match="blocks"):
        assert load_base(TINY_SD2, copy).text_encoder is None


def test_hub_ids_need_allow_download(monkeypatch, folder):
    with pytest.raises(DownloadNotAllowed, match="downloads nothing unless asked") as caught:
        load_base(TINY_SD2, "stabilityai/stable-diffusion-2-1-base")
    assert caught.value.source == "stabilityai/stable-diffusion-2-1-base"
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(folder)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    base = load_base(TINY_SD2, "stabilityai/stable-diffusion-2-1-base", allow_download=True)
    assert base.source == "stabilityai/stable-diffusion-2-1-base" and base.unet is not None
    assert calls[0][0] == "stabilityai/stable-diffusion-2-1-base"
    assert "unet/diffusion_pytorch_model.safetensors" in calls[0][1]
    with pytest.raises(ModelFileError, match="neither an existing"):
        load_base(TINY_SD2, "not a repo id", allow_download=True)


def test_sd1_style_file_is_named(tmp_path):
    """Same block layout, 768-wide cross-attention: an SD 1.x file given for an SD 2 backbone."""
    config = tiny_config(cross_attention_dim=768)
    unet, vae = random_parts(config)
    path = tmp_path / "sd15.safetensors"
    save_file(ldm_state(unet, vae, None, config), str(path))
    with pytest.raises(ModelFileError, match="Stable Diffusion 1.x"):
        load_base(TINY_SD2, path)


def test_other_architecture_is_refused(tmp_path):
    config = tiny_config(block_out_channels=[32, 96], attention_head_dim=[2, 6])
    unet, vae = random_parts(config)
    path = tmp_path / "wider.safetensors"
    save_file(ldm_state(unet, vae, None, config), str(path))
    with pytest.raises(ModelFileError, match="another architecture|does not fit"):
        load_base(TINY_SD2, path)
    folder = write_diffusers_folder(tmp_path / "wider", unet, vae)
    with pytest.raises(ModelFileError, match="block_out_channels"):
        load_base(TINY_SD2, folder)


def test_sdxl_file_is_named(parts, tmp_path):
    state = ldm_state(*parts)
    state["conditioner.embedders.1.model.ln_final.weight"] = torch.ones(32)
    path = tmp_path / "sdxl.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelFileError, match="SDXL"):
        load_base(TINY_SD2, path)


def test_v_prediction_folder_is_refused(parts, tmp_path):
    folder = write_diffusers_folder(tmp_path / "v", parts[0], parts[1], prediction_type="v_prediction")
    with pytest.raises(ModelFileError, match="v_prediction"):
        load_base(TINY_SD2, folder)


@pytest.mark.parametrize(
    "drop, message",
    [(VAE_PREFIX, "no VAE weights"), (UNET_PREFIX, "no UNet weights")],
)
def test_missing_parts_are_named(parts, tmp_path, drop, message):
    state = {k: v for k, v in ldm_state(*parts).items() if not k.startswith(drop)}
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelFileError, match=message):
        load_base(TINY_SD2, path)


def test_missing_unet_layers_are_named(parts, tmp_path):
    state = {k: v for k, v in ldm_state(*parts).items() if "output_blocks.4." not in k}
    path = tmp_path / "truncated.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelFileError, match="weights missing"):
        load_base(TINY_SD2, path)


def test_lora_and_component_files_are_told_apart(parts, tmp_path):
    lora = tmp_path / "style_lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(lora))
    with pytest.raises(ModelFileError, match="LoRA file"):
        load_base(TINY_SD2, lora)
    component = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in parts[0].state_dict().items()}, str(component))
    with pytest.raises(ModelFileError, match="diffusers folder"):
        load_base(TINY_SD2, component)


def test_damaged_and_unsupported_files(tmp_path, single_file):
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(single_file.read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="not a readable safetensors"):
        load_base(TINY_SD2, damaged)
    ckpt = tmp_path / "garbage.ckpt"
    ckpt.write_bytes(b"\x00not a torch file")
    with pytest.raises(ModelFileError, match="not a readable checkpoint"):
        load_base(TINY_SD2, ckpt)
    odd = tmp_path / "weights.onnx"
    odd.write_bytes(b"x")
    with pytest.raises(ModelFileError, match="unsupported base checkpoint"):
        load_base(TINY_SD2, odd)
    with pytest.raises(ModelFileError, match="not a diffusers model folder"):
        load_base(TINY_SD2, tmp_path)


def test_single_file_without_text_encoder_warns(parts, tmp_path):
    path = tmp_path / "no_te.safetensors"
    save_file(ldm_state(parts[0], parts[1], None), str(path))
    with pytest.warns(UserWarning, match="no text encoder"):
        base = load_base(TINY_SD2, path)
    assert base.text_encoder is None


def test_integer_weights_in_a_single_file_are_refused(parts, tmp_path):
    """Cast to float they loaded without a word, and every image came out as noise (#24)."""
    state = ldm_state(*parts)
    state = {k: v.round().to(torch.int8) if "model.diffusion_model." in k else v for k, v in state.items()}
    path = tmp_path / "int8.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelFileError, match=r"int8\.safetensors: its UNet has \d+ tensors stored as int8, e\.g\. ") as err:
        load_base(TINY_SD2, path)
    assert "\n" not in str(err.value)
