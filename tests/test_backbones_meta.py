"""The bundled SD backbones, built on the meta device: real SD 2 sizes without allocating any weight.

The configs were checked against the public diffusers configs of stabilityai/stable-diffusion-2-1-base
and stabilityai/sd-turbo (attention_head_dim [5, 10, 20, 20], use_linear_projection true,
upcast_attention false/null, sample_size 64, cross_attention_dim 1024, epsilon prediction with the
scaled_linear 0.00085..0.012 schedule); the parameter counts below are SD 2's published ones.
``sdxl-base`` was checked against stabilityai/stable-diffusion-xl-base-1.0's UNet and VAE configs
(transformer_layers_per_block [1, 2, 10], addition_time_embed_dim 256,
projection_class_embeddings_input_dim 2816, VAE scaling_factor 0.13025); its UNet count is SDXL's.
"""

import pytest
import torch
from peft.tuners.lora import LoraLayer

from vpdsr.backbones import backbone_config, backbone_family, build_backbone
from vpdsr.lora import UNET_TARGET_SUFFIXES, VAE_ENCODER_TARGET_SUFFIXES, LoraSpec, add_lora, default_lora_targets
from vpdsr.osediff import osediff_lora_specs, osediff_lora_targets
from vpdsr.text_encoder import build_open_clip_text_encoder

SD_BACKBONES = ["sd21-base", "sd-turbo"]
UNET_PARAMS = 865_910_724  # SD 2.x UNet ("865M")
VAE_PARAMS = 83_653_863  # SD VAE (kl-f8)
TEXT_PARAMS = 340_387_840  # OpenCLIP ViT-H-14 text tower up to the penultimate block = diffusers' SD 2 text_encoder
SDXL_UNET_PARAMS = 2_567_463_684  # SDXL 1.0 base's UNet ("2.6B")


@pytest.fixture(scope="module")
def backbone():
    """sd21-base only: sd-turbo's architecture is checked to be the same config."""
    return build_backbone("sd21-base", device="meta")


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", SD_BACKBONES)
def test_sizes_without_allocating(name):
    backbone = build_backbone(name, device="meta")
    tensors = [
        *backbone.unet.parameters(),
        *backbone.vae.parameters(),
        *backbone.unet.buffers(),
        *backbone.vae.buffers(),
    ]
    assert all(t.device.type == "meta" for t in tensors)
    assert count(backbone.unet) == UNET_PARAMS
    assert count(backbone.vae) == VAE_PARAMS
    assert backbone.config.vae_factor == 8 and backbone.config.latent_channels == 4
    assert backbone.config.scaling_factor == 0.18215 and backbone.config.prediction_type == "epsilon"


def test_sd_turbo_and_sd21_base_share_the_architecture():
    a, b = backbone_config("sd21-base").to_dict(), backbone_config("sd-turbo").to_dict()
    for key in ("vae", "unet", "scheduler", "text_encoder", "prompt_embed_shape"):
        assert a[key] == b[key], key
    unet = a["unet"]
    assert unet["attention_head_dim"] == [5, 10, 20, 20] and unet["use_linear_projection"] is True
    assert unet["upcast_attention"] is False and unet["sample_size"] == 64 and unet["cross_attention_dim"] == 1024


def test_meta_forward_shapes(backbone):
    z = torch.empty(1, 4, 64, 64, device="meta")
    cond = torch.empty(1, 77, 1024, device="meta")
    out = backbone.unet(z, torch.tensor([999], device="meta"), encoder_hidden_states=cond).sample
    assert out.shape == z.shape
    assert backbone.vae.decode(z).sample.shape == (1, 3, 512, 512)


def test_default_lora_targets_inject_on_meta(backbone):
    unet_targets = default_lora_targets(backbone.unet, UNET_TARGET_SUFFIXES)
    vae_targets = default_lora_targets(backbone.vae, VAE_ENCODER_TARGET_SUFFIXES, prefix="encoder.")
    assert "conv_in" in unet_targets and any(t.endswith("attn2.to_k") for t in unet_targets)
    assert vae_targets and all(t.startswith("encoder.") for t in vae_targets)
    add_lora(backbone.unet, LoraSpec("unet", "vpd", 4, 4.0, unet_targets))
    add_lora(backbone.vae, LoraSpec("vae", "vpd", 4, 4.0, vae_targets))
    for model, targets in ((backbone.unet, unet_targets), (backbone.vae, vae_targets)):
        adapted = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
        assert adapted == set(targets)
        assert all(p.device.type == "meta" for n, p in model.named_parameters() if "lora_" in n)


def test_osediff_targets_resolve_on_sd21_base():
    parts = build_backbone("sd21-base", device="meta")  # a fresh one: the fixture's carries adapters
    lists = osediff_lora_targets(parts.unet, parts.vae)
    # counted by hand: an attention block has 12 layers (proj_in/out, 2 x q/k/v/out, 2 ff), a
    # resnet 2 convs (+1 shortcut where channels change, always in up blocks), plus samplers
    assert {k: len(v) for k, v in lists.items()} == {
        "unet_lora_encoder_modules": 1 + 29 + 30 + 30 + 4,  # conv_in, down blocks 0..3
        "unet_lora_decoder_modules": 10 + 46 + 46 + 45 + 1,  # up blocks 0..3, conv_out
        "unet_lora_others_modules": 4 + 12,  # the mid block
        "vae_lora_encoder_modules": 1 + 16 + 2 + 3 + 4 + 4 + 1 + 1,  # conv_in ... conv_out, quant_conv
    }
    checkpoint = {**lists, "rank_unet": 4, "rank_vae": 4}
    for spec in osediff_lora_specs(checkpoint):
        model = parts.unet if spec.part == "unet" else parts.vae
        add_lora(model, spec)
        adapted = {n for n, m in model.named_modules() if isinstance(m, LoraLayer) and spec.name in m.lora_A}
        assert adapted == set(spec.targets)


def test_sd2_text_encoder_on_meta():
    encoder = build_open_clip_text_encoder(backbone_config("sd21-base").text_encoder, device="meta")
    assert len(encoder.tower.transformer.resblocks) == 23  # ViT-H-14 has 24; SD 2 reads the penultimate
    assert count(encoder.tower) == TEXT_PARAMS
    assert encoder("a photo of a cat").shape == (1, 77, 1024)


def test_sdxl_size_builds_on_meta_and_takes_its_added_conditioning():
    parts = build_backbone("sdxl-base", device="meta")
    assert count(parts.unet) == SDXL_UNET_PARAMS and count(parts.vae) == VAE_PARAMS  # SDXL keeps SD's kl-f8 VAE
    assert parts.config.family == "sdxl" and parts.config.scaling_factor == 0.13025
    family = backbone_family(parts.config)
    assert family.extra_embeds() == {"pooled_prompt_embeds": (1280,)}
    assert family.time_ids == (1024, 1024, 0, 0, 1024, 1024)
    z = torch.empty(1, 4, 32, 32, device="meta")
    embeds = torch.empty(77, 2048, device="meta")
    out = family.predict(parts.unet, z, torch.tensor([999], device="meta"), embeds, family.extra_tensors())
    assert out.shape == z.shape
    targets = family.unet_lora_targets(parts.unet, include_conv_in=False)
    assert any(t.endswith("attn2.to_k") for t in targets)
    assert not any(t.startswith(("add_embedding", "time_embedding", "conv_in")) for t in targets)
