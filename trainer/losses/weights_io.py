"""Reading user-supplied weight files for the losses: tensors only, never pickled code."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from vpdsr.errors import ModelFileError

__all__ = ["read_state_dict"]


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
