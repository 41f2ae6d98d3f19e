"""ESS (embedding semantic supervision): SR must mean to CLIP what HR means.

The student is judged by a frozen CLIP: the cosine between SR and HR embeddings and the KL
between their zero-shot tag distributions (``SemanticModel.semantic_loss``). A CLIP with random
weights would make this a loss towards noise, so a real checkpoint is required; tests build a
tiny random CLIP only to check the plumbing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vpdsr.semantics import SemanticModel

from .registry import LossConfig, LossContext, StudentLoss, StudentStep, Terms
from .weights_io import clip_judge, load_semantic_model

__all__ = ["SemanticLoss", "SemanticLossConfig", "SemanticTerm", "load_semantic_model"]


@dataclass
class SemanticLossConfig(LossConfig):
    """ESS: CLIP embeddings and zero-shot tags of SR pulled towards HR's (needs clip.path)."""

    weight: float = 0.0
    """Weight of 1 - cos(SR, HR) embeddings."""
    kl_weight: float = 0.0
    """Weight of KL(HR tags || SR tags)."""


class SemanticLoss(nn.Module):
    """Images in [-1, 1] -> {"cosine": 1 - cos(SR, HR), "kl": KL(HR tags || SR tags)}."""

    def __init__(self, semantic: SemanticModel) -> None:
        super().__init__()
        self.semantic = semantic

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = self.semantic.semantic_loss((sr.float() + 1) / 2, (hr.float() + 1) / 2)
        return {"cosine": terms.cosine, "kl": terms.kl}


class SemanticTerm(StudentLoss, key="semantic", config=SemanticLossConfig):
    config: SemanticLossConfig

    def __init__(self, config: SemanticLossConfig, ctx: LossContext) -> None:
        super().__init__(config, ctx)
        self.loss = SemanticLoss(clip_judge(ctx, "the ESS loss (losses.semantic)"))

    @classmethod
    def enabled(cls, config: SemanticLossConfig) -> bool:
        return config.weight > 0 or config.kl_weight > 0

    def terms(self, s: StudentStep) -> Terms:
        ess = self.loss(s.sr, s.hr)
        return {"ess_cos": (self.config.weight, ess["cosine"]), "ess_kl": (self.config.kl_weight, ess["kl"])}
