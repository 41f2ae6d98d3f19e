"""Reading user-supplied weight files for the losses: tensors only, never pickled code."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from vpdsr.errors import ModelFileError
from vpdsr.semantics import SemanticModel, load_tags

if TYPE_CHECKING:
    from .registry import LossContext

__all__ = ["clip_judge", "load_semantic_model", "read_state_dict"]


def load_semantic_model(
    path: str | None, config: str | None, tags: str | None, purpose: str, text_path: str | None = None
) -> SemanticModel:
    """The frozen CLIP judge from local files: a whole CLIP, or an image tower (``path``) and its
    text tower (``text_path``); a clear error when none is configured."""
    if not path:
        raise ModelFileError(
            f"{purpose} needs a real CLIP checkpoint: set clip.path to a local CLIP file, or to an image tower "
            "with its text tower in clip.text_path (clip.config names the architecture of plain OpenCLIP "
            "checkpoints, e.g. ViT-B-32), or switch it off"
        )
    tags_list = load_tags(tags) if tags else None
    return SemanticModel.from_file(path, config=config, tags=tags_list, text_path=text_path)


def clip_judge(ctx: LossContext, purpose: str) -> SemanticModel:
    """The run's frozen CLIP (``clip.path``, ``clip.text_path``), loaded once for every loss that judges
    with it; ``purpose`` names the first of them in the error when there is none."""
    clip = ctx.cfg.clip
    return ctx.shared(
        "clip",
        lambda: load_semantic_model(clip.path, clip.config, clip.tags, purpose, clip.text_path).to(ctx.device),
    )


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{what} weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling and safetensors failures come in many types
        raise ModelFileError(f"{path} could not be read as {what} weights (tensors only): {err}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{path} does not hold a state dict of tensors ({what})")
    return state
