"""Prompt -> cross-attention conditioning for SD 2.x backbones, offline, from two weight layouts.

SD 2.x conditions its UNet on OpenCLIP ViT-H-14's text tower read at the *penultimate* block and
then passed through the final LayerNorm (SD2's ``FrozenOpenCLIPEmbedder(layer="penultimate")``).
The same weights reach users in two layouts:

- single-file checkpoints keep open_clip's own layout under ``cond_stage_model.model.*``; we build
  the tower from its config (the named configs ship inside the open_clip wheel, and so does the
  BPE vocabulary) and never ask open_clip for pretrained weights, which it would download;
- diffusers folders hold a transformers ``CLIPTextModel`` that was cut to 23 blocks when it was
  converted, so its ``last_hidden_state`` (final LayerNorm included) is already that tensor.

Both are wrapped behind one call, ``encoder(prompt) -> (1, tokens, dim)``, which is all the
pipeline needs. They are frozen: the students never train the text encoder. The SD-2 backbone
family (``vpdsr.backbones.sd2``) decides when they are built; another family brings its own.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import _build_text_tower
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from .errors import ModelFileError

__all__ = [
    "HFClipTextEncoder",
    "OpenClipTextEncoder",
    "build_open_clip_text_encoder",
    "load_hf_text_encoder",
    "open_clip_text_spec",
]

# Blocks left out at the top of the tower for each conditioning layer SD configs name.
_SKIPPED_BLOCKS = {"last": 0, "penultimate": 1}
# Parameters of the open_clip text tower that the token-level conditioning never reads.
_UNUSED_KEYS = ("text_projection", "logit_scale")


class OpenClipTextEncoder(nn.Module):
    """An open_clip text tower already cut at the conditioning layer, plus its tokenizer."""

    def __init__(self, tower: nn.Module, context_length: int) -> None:
        super().__init__()
        self.tower = tower
        self.tokenizer = SimpleTokenizer(context_length=context_length)

    @torch.no_grad()
    def forward(self, prompt: str) -> torch.Tensor:
        weight = self.tower.token_embedding.weight
        ids = self.tokenizer([prompt]).to(weight.device)  # pads with token 0 ("!"), like SD2's tokenizer
        x = self.tower.token_embedding(ids) + self.tower.positional_embedding.to(weight.dtype)
        x = self.tower.transformer(x, attn_mask=self.tower.attn_mask.to(weight.dtype))
        return self.tower.ln_final(x)


class HFClipTextEncoder(nn.Module):
    """A transformers ``CLIPTextModel`` and its tokenizer, used the way diffusers' SD pipelines use them."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer

    @torch.no_grad()
    def forward(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.model(ids.to(self.model.device)).last_hidden_state


def open_clip_text_spec(spec: dict[str, Any]) -> tuple[dict[str, Any], bool, int]:
    """(text_cfg, quick_gelu, skipped top blocks) for a backbone's ``text_encoder`` entry.

    The entry names an open_clip config (``"arch": "ViT-H-14"``) or inlines one (``"text_cfg"``,
    used by test backbones), and the layer SD reads (``"last"`` or ``"penultimate"``).
    """
    if spec.get("kind") != "open_clip":
        raise ModelFileError(f"unsupported text encoder kind {spec.get('kind')!r} (expected 'open_clip')")
    if "text_cfg" in spec:
        text_cfg, quick_gelu = dict(spec["text_cfg"]), bool(spec.get("quick_gelu", False))
    else:
        model_cfg = open_clip.get_model_config(str(spec.get("arch")))
        if model_cfg is None:
            raise ModelFileError(f"open_clip has no built-in config named {spec.get('arch')!r}")
        text_cfg, quick_gelu = dict(model_cfg["text_cfg"]), bool(model_cfg.get("quick_gelu", False))
    if text_cfg.get("hf_model_name"):
        raise ModelFileError("open_clip text towers backed by a Hugging Face model are not supported (they download)")
    layer = spec.get("layer", "last")
    if layer not in _SKIPPED_BLOCKS:
        raise ModelFileError(f"text encoder layer must be one of {sorted(_SKIPPED_BLOCKS)}, got {layer!r}")
    return text_cfg, quick_gelu, _SKIPPED_BLOCKS[layer]


def build_open_clip_text_encoder(
    spec: dict[str, Any],
    state: dict[str, torch.Tensor] | None = None,
    *,
    source: str = "checkpoint",
    device: str | None = None,
) -> OpenClipTextEncoder:
    """Build the tower cut at the conditioning layer and load ``state`` (open_clip key names).

    The blocks above the conditioning layer are never built: they cannot change the output, and
    leaving them out saves memory. ``state=None`` gives random weights (tests); ``device="meta"``
    allocates nothing (architecture checks).
    """
    text_cfg, quick_gelu, skipped = open_clip_text_spec(spec)
    layers = int(text_cfg.get("layers", 12))
    text_cfg["layers"] = layers - skipped
    with torch.device("meta" if state is not None else (device or "cpu")):
        tower = _build_text_tower(int(text_cfg.get("width", 512)), text_cfg, quick_gelu=quick_gelu)
    tower.text_projection = None
    if state is not None:
        _load_tower(tower, state, layers, source)
        tower.attn_mask = tower.build_causal_mask()
        if device is not None:
            tower.to(device)
    return OpenClipTextEncoder(tower.eval().requires_grad_(False), int(text_cfg.get("context_length", 77)))


def _load_tower(tower: nn.Module, state: dict[str, torch.Tensor], layers: int, source: str) -> None:
    expected = tower.state_dict()
    built = len(tower.transformer.resblocks)
    unused = {
        k
        for k in state
        if k in _UNUSED_KEYS or any(k.startswith(f"transformer.resblocks.{i}.") for i in range(built, layers))
    }
    unexpected = sorted(set(state) - set(expected) - unused)
    missing = sorted(set(expected) - set(state))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ModelFileError(
            f"{source}: its text encoder weights do not fit the expected OpenCLIP text tower "
            f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {detail})"
        )
    bad = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise ModelFileError(f"{source}: its text encoder has another architecture, e.g. {bad[:2]}")
    tower.load_state_dict({k: state[k].float() for k in expected}, assign=True)


def load_hf_text_encoder(folder: Path, spec: dict[str, Any], embed_shape: tuple[int, int]) -> HFClipTextEncoder | None:
    """The text encoder of a diffusers folder, or None (with a warning) if it cannot be used.

    Students store their conditioning, so a missing text encoder only matters for prompts and for
    imported files that keep a prompt instead of an embedding; the pipeline says so when it does.
    """
    if not (folder / "text_encoder").is_dir():
        return None
    try:
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
        model = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True).float()
    except Exception as err:  # transformers missing, or an incomplete/foreign folder: degrade, don't fail
        warnings.warn(f"{folder}: the text encoder could not be loaded, prompts are unavailable ({err})", stacklevel=3)
        return None
    text_cfg, _, skipped = open_clip_text_spec(spec)
    # diffusers' SD 2 folders keep the blocks below the conditioning layer only (23 of ViT-H's 24)
    found = (tokenizer.model_max_length, model.config.hidden_size, model.config.num_hidden_layers)
    expected = (*embed_shape, int(text_cfg.get("layers", 12)) - skipped)
    if found != expected:
        warnings.warn(
            f"{folder}: its text encoder (context, width, blocks) is {found}, the backbone needs {expected}; "
            "prompts are unavailable",
            stacklevel=3,
        )
        return None
    return HFClipTextEncoder(model.eval().requires_grad_(False), tokenizer)
