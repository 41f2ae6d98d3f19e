"""ESS (embedding semantic supervision): SR must mean to CLIP what HR means.

The student is judged by a frozen CLIP: the cosine between SR and HR embeddings and the KL
between their zero-shot tag distributions (``SemanticModel.semantic_loss``). A CLIP with random
weights would make this a loss towards noise, so a real checkpoint is required; tests build a
tiny random CLIP only to check the plumbing.
"""

from __future__ import annotations

import torch
from torch import nn

from vpdsr.errors import ModelFileError
from vpdsr.semantics import SemanticModel, load_tags

__all__ = ["SemanticLoss", "load_semantic_model"]


def load_semantic_model(path: str | None, config: str | None, tags: str | None, purpose: str) -> SemanticModel:
    """The frozen CLIP judge from a local checkpoint; a clear error when none is configured."""
    if not path:
        raise ModelFileError(
            f"{purpose} needs a real CLIP checkpoint: set clip.path to a local OpenCLIP file "
            "(and clip.config to its architecture for plain checkpoints, e.g. ViT-B-32), or switch it off"
        )
    return SemanticModel.from_file(path, config=config, tags=load_tags(tags) if tags else None)


class SemanticLoss(nn.Module):
    """Images in [-1, 1] -> {"cosine": 1 - cos(SR, HR), "kl": KL(HR tags || SR tags)}."""

    def __init__(self, semantic: SemanticModel) -> None:
        super().__init__()
        self.semantic = semantic

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = self.semantic.semantic_loss((sr.float() + 1) / 2, (hr.float() + 1) / 2)
        return {"cosine": terms.cosine, "kl": terms.kl}
