"""Regression onto a multi-step teacher's output for the same LR image (SinSR's form).

The teacher runs its deterministic DDIM sampler from a fresh noise draw; the student, which has
one step, regresses onto that clean latent. It is the cheapest distillation signal (no second
trainable model) and it needs an SR teacher: a model conditioned on the LR image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import LatentDiffusion

__all__ = ["TeacherRegressionLoss"]


class TeacherRegressionLoss(nn.Module):
    def __init__(self, teacher: LatentDiffusion, steps: int = 4, guidance: float = 1.0) -> None:
        super().__init__()
        if not teacher.lr_conditioned:
            raise ValueError(
                "regression onto a teacher needs an SR teacher (LR-conditioned); train one with stage: teacher"
            )
        self.teacher, self.steps, self.guidance = teacher, steps, guidance

    def forward(self, z: torch.Tensor, z_lr: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        target = self.teacher.sample(z_lr, self.steps, generator, self.guidance)
        return F.mse_loss(z.float(), target.float())
