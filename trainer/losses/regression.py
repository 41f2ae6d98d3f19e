"""Regression onto a multi-step teacher's output for the same LR image (SinSR's form).

The teacher runs its deterministic DDIM sampler from a fresh noise draw; the student, which has
one step, regresses onto that clean latent. It is the cheapest distillation signal (no second
trainable model) and it needs an SR teacher: a model conditioned on the LR image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config_loading import ConfigError
from ..diffusion import LatentDiffusion
from .registry import LossConfig, LossContext, StudentLoss, StudentStep, Terms, at_least

__all__ = ["RegressionLossConfig", "RegressionTerm", "TeacherRegressionLoss"]


@dataclass
class RegressionLossConfig(LossConfig):
    """Regression onto the multi-step teacher's output for the same LR (SinSR form)."""

    weight: float = 0.0
    steps: int = at_least(1, 4)
    """DDIM steps of the teacher per training batch."""
    guidance: float = 1.0


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


class RegressionTerm(StudentLoss, key="regression", config=RegressionLossConfig):
    config: RegressionLossConfig

    def __init__(self, config: RegressionLossConfig, ctx: LossContext) -> None:
        super().__init__(config, ctx)
        if ctx.teacher is None:
            raise ConfigError("losses.regression needs a multi-step SR teacher: set student.teacher")
        self.loss = TeacherRegressionLoss(ctx.teacher, config.steps, config.guidance)

    def terms(self, s: StudentStep) -> Terms:
        return {"regression": (self.config.weight, self.loss(s.z_sr, s.z_lr_teacher, s.generator))}
