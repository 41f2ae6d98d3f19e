"""A toy SD 2.x backbone and writers for the real file layouts SD weights come in.

The backbone has SD 2's block types (cross-attention down/up blocks with linear projections, a
cross-attention mid block, a VAE with a mid-block attention, an OpenCLIP text tower read at the
penultimate block) at toy widths, so files in the exact real layouts are written and loaded in
well under a second. The LDM key mapping below is written independently of diffusers': loading
these files through diffusers' converters is what checks both directions at once.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import save_file

SD2_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                 "num_train_timesteps": 1000, "prediction_type": "epsilon"}  # fmt: skip
TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3}
TINY_SD2 = {
    "name": "tiny-sd2",
    "description": "SD 2.x layout at toy width (tests only)",
    "vae": {
        "act_fn": "silu", "block_out_channels": [32, 64], "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 32, "scaling_factor": 0.18215,
    },
    "unet": {
        "act_fn": "silu", "attention_head_dim": [2, 4], "block_out_channels": [32, 64], "cross_attention_dim": 32,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "norm_num_groups": 8, "sample_size": 8,
        "use_linear_projection": True, "upcast_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    },
    "scheduler": SD2_SCHEDULER,
    "text_encoder": {"kind": "open_clip", "text_cfg": TEXT_CFG, "layer": "penultimate"},
    "prompt_embed_shape": [77, 32],
}  # fmt: skip
UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."


def tiny_config(**unet_changes) -> dict:
    config = copy.deepcopy(TINY_SD2)
    config["unet"].update(unet_changes)
    return config


def random_parts(config: dict = TINY_SD2, seed: int = 0) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """Parts with every parameter random (diffusers zero-initialises none here, but be sure)."""
    torch.manual_seed(seed)
    unet, vae = UNet2DConditionModel(**config["unet"]), AutoencoderKL(**config["vae"])
    with torch.no_grad():
        for p in [*unet.parameters(), *vae.parameters()]:
            p.add_(torch.randn_like(p) * 0.02)
    return unet.eval(), vae.eval()


def text_tower(seed: int = 0) -> torch.nn.Module:
    """A full (3-block) OpenCLIP text tower; SD's penultimate conditioning uses 2 of its blocks."""
    from open_clip.model import _build_text_tower

    torch.manual_seed(seed)
    return _build_text_tower(TEXT_CFG["width"], dict(TEXT_CFG)).eval()


# --- diffusers names -> original (LDM) names ---------------------------------------------------

_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_first(rest: str, table: dict[str, str]) -> str:
    for new, old in table.items():
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def unet_key_to_ldm(key: str, config: dict) -> str:
    n = config["layers_per_block"] + 1  # LDM numbers every resnet (+ attention) and sampler in one list
    for new, old in _UNET_FIXED.items():
        if key.startswith(new + "."):
            return old + key[len(new) :]
    p = key.split(".")
    if p[0] == "down_blocks":
        b = int(p[1])
        if p[2] == "downsamplers":
            return f"input_blocks.{(b + 1) * n}.0.op.{p[-1]}"
        idx, rest = 1 + b * n + int(p[3]), ".".join(p[4:])
        return (
            f"input_blocks.{idx}.0.{_rename_first(rest, _UNET_RESNET)}"
            if p[2] == "resnets"
            else f"input_blocks.{idx}.1.{rest}"
        )
    if p[0] == "mid_block":
        rest = ".".join(p[3:])
        return (
            f"middle_block.1.{rest}"
            if p[1] == "attentions"
            else f"middle_block.{2 * int(p[2])}.{_rename_first(rest, _UNET_RESNET)}"
        )
    if p[0] == "up_blocks":
        b = int(p[1])
        if p[2] == "upsamplers":
            slot = 2 if config["up_block_types"][b].startswith("CrossAttn") else 1
            return f"output_blocks.{b * n + n - 1}.{slot}.conv.{p[-1]}"
        idx, rest = b * n + int(p[3]), ".".join(p[4:])
        return (
            f"output_blocks.{idx}.0.{_rename_first(rest, _UNET_RESNET)}"
            if p[2] == "resnets"
            else f"output_blocks.{idx}.1.{rest}"
        )
    raise KeyError(key)


def vae_key_to_ldm(key: str, config: dict) -> str:
    side, rest = key.split(".", 1)
    if side in ("quant_conv", "post_quant_conv") or rest.split(".")[0] in ("conv_in", "conv_out"):
        return key
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest.split('.')[-1]}"
    p = rest.split(".")
    resnet = lambda tail: tail.replace("conv_shortcut", "nin_shortcut")
    if p[0] in ("down_blocks", "up_blocks"):
        i = int(p[1]) if p[0] == "down_blocks" else len(config["up_block_types"]) - 1 - int(p[1])
        level = "down" if p[0] == "down_blocks" else "up"
        if p[2] in ("downsamplers", "upsamplers"):
            return f"{side}.{level}.{i}.{'downsample' if level == 'down' else 'upsample'}.conv.{p[-1]}"
        return f"{side}.{level}.{i}.block.{p[3]}.{resnet('.'.join(p[4:]))}"
    if p[0] == "mid_block" and p[1] == "resnets":
        return f"{side}.mid.block_{int(p[2]) + 1}.{resnet('.'.join(p[3:]))}"
    if p[0] == "mid_block" and p[1] == "attentions":
        return f"{side}.mid.attn_1.{_rename_first('.'.join(p[3:]), _VAE_ATTN)}"
    raise KeyError(key)


def ldm_state(
    unet: torch.nn.Module, vae: torch.nn.Module, tower: torch.nn.Module | None, config: dict = TINY_SD2
) -> dict:
    """The state dict of an original-layout SD 2 checkpoint holding these parts."""
    state = {UNET_PREFIX + unet_key_to_ldm(k, config["unet"]): v.clone() for k, v in unet.state_dict().items()}
    for k, v in vae.state_dict().items():
        name = VAE_PREFIX + vae_key_to_ldm(k, config["vae"])
        # the original VAE's attention projections are 1x1 convolutions
        state[name] = v.clone()[:, :, None, None] if ".mid.attn_1." in name and v.dim() == 2 else v.clone()
    if tower is not None:
        state.update({TEXT_PREFIX + k: v.clone() for k, v in tower.state_dict().items()})
        state[TEXT_PREFIX + "logit_scale"] = torch.tensor(4.6)
    state["alphas_cumprod"] = torch.linspace(1, 0, 1000)  # real files carry schedule buffers too
    return state


# --- diffusers folders -------------------------------------------------------------------------


def hf_text_encoder_from_tower(tower: torch.nn.Module):
    """transformers' CLIPTextModel holding the tower's blocks below the top one, converted with
    diffusers' own open_clip converter, and its state dict in the key layout SD 2 folders ship."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=TEXT_CFG["vocab_size"], hidden_size=TEXT_CFG["width"], intermediate_size=4 * TEXT_CFG["width"],
                         num_hidden_layers=TEXT_CFG["layers"] - 1, num_attention_heads=TEXT_CFG["heads"],
                         max_position_embeddings=TEXT_CFG["context_length"], hidden_act="gelu", layer_norm_eps=1e-5)  # fmt: skip
    model = CLIPTextModel(cfg).eval()
    converted = convert_open_clip_checkpoint(model, {TEXT_PREFIX + k: v for k, v in tower.state_dict().items()})
    # diffusers' converter skips SD 2's top block by its index (23); here the top block is 2
    top = f"encoder.layers.{TEXT_CFG['layers'] - 1}."
    converted = {k: v for k, v in converted.items() if top not in k and k != "text_projection.weight"}
    # SD 2 folders name these "text_model.*"; transformers 5 drops that prefix inside the model
    expected = model.state_dict()
    inside = {(k if k in expected else k.removeprefix("text_model.")): v for k, v in converted.items()}
    missing = [k for k in expected if k not in inside and not k.endswith("position_ids")]
    assert not missing and set(inside) <= set(expected), (missing, set(inside) - set(expected))
    model.load_state_dict(inside, strict=False)
    return model, converted


def hf_tokenizer():
    """A CLIPTokenizer built from open_clip's bundled BPE vocabulary, padding with "!" as SD 2's does."""
    from transformers import CLIPTokenizer

    tok = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(k, k): v for k, v in tok.encoder.items()}
    merges = [pair for pair, _ in sorted(tok.bpe_ranks.items(), key=lambda item: item[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=TEXT_CFG["context_length"])


def write_diffusers_folder(folder: Path, unet, vae, tower=None, prediction_type: str = "epsilon") -> Path:
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    (folder / "scheduler").mkdir(parents=True)
    scheduler = {"_class_name": "PNDMScheduler", **SD2_SCHEDULER, "prediction_type": prediction_type, "clip_sample": False,
                 "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1}  # fmt: skip
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    if tower is not None:
        model, sd2_layout = hf_text_encoder_from_tower(tower)
        model.config.save_pretrained(folder / "text_encoder")
        save_file(
            {k: v.contiguous() for k, v in sd2_layout.items()}, str(folder / "text_encoder" / "model.safetensors")
        )
        hf_tokenizer().save_pretrained(folder / "tokenizer")
    return folder
