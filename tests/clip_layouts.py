"""Toy CLIPs written in the exact key layouts ComfyUI installs hold, all from one set of weights.

The weights come from Hugging Face's own ``CLIPModel`` (tiny widths, random init), so its
``get_text_features`` / ``get_image_features`` are the reference every layout must reproduce.
The SD 2.x layout holds open_clip's own keys: it is written from a model open_clip built.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

SD2_TEXT_PREFIX = "cond_stage_model.model."
_OPEN_CLIP_TEXT = (
    "token_embedding.",
    "positional_embedding",
    "transformer.",
    "ln_final.",
    "text_projection",
    "logit_scale",
)


def toy_hf_clip(
    seed: int = 0, *, embed: int = 64, act: str = "gelu", text_heads: int = 2, image_heads: int = 2
) -> CLIPModel:
    """A random CLIP, 128 wide in both towers; 2 heads of 64 follow the rule the shapes are read by."""
    torch.manual_seed(seed)
    common = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "hidden_act": act}
    config = CLIPConfig(
        text_config={**common, "num_attention_heads": text_heads, "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={**common, "num_attention_heads": image_heads, "image_size": 32, "patch_size": 8},
        projection_dim=embed,
    )
    model = CLIPModel(config).eval()
    with torch.no_grad():  # random non-zero norms and biases, so a swapped norm or bias shows
        for name, param in model.named_parameters():
            if "norm" in name or "layrnorm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def _select(model: CLIPModel, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith(prefixes)}


def write_clip_model(model: CLIPModel, path: Path) -> Path:
    """A whole ``CLIPModel`` state dict in one file."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def write_text_tower(model: CLIPModel, path: Path) -> Path:
    """``models/text_encoders/clip_l.safetensors``: ``CLIPTextModelWithProjection`` keys."""
    save_file(_select(model, ("text_model.", "text_projection.")), str(path))
    return path


def write_image_tower(model: CLIPModel, path: Path) -> Path:
    """``models/clip_vision/*.safetensors``: ``CLIPVisionModelWithProjection`` keys."""
    save_file(_select(model, ("vision_model.", "visual_projection.")), str(path))
    return path


def write_sd2_checkpoint(open_clip_model: torch.nn.Module, path: Path) -> Path:
    """An SD 2.x single file: open_clip's text tower under ``cond_stage_model.model.``, among UNet and VAE keys."""
    state = {
        SD2_TEXT_PREFIX + k: v.contiguous()
        for k, v in open_clip_model.state_dict().items()
        if k.startswith(_OPEN_CLIP_TEXT)
    }
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3)
    state["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 4, 3, 3)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 1}, path)
    return path
