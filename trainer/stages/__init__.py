"""The three training stages; ``build_stage`` picks one by the config's ``stage``."""

from __future__ import annotations

from accelerate import Accelerator

from ..config import TrainConfig
from .base import NonFiniteLoss, Stage

__all__ = ["NonFiniteLoss", "Stage", "build_stage"]


def build_stage(cfg: TrainConfig, accelerator: Accelerator) -> Stage:
    if cfg.stage == "teacher":
        from .teacher import TeacherStage as stage_class
    elif cfg.stage == "student":
        from .student import StudentStage as stage_class
    else:
        from .dape import DapeStage as stage_class
    return stage_class(cfg, accelerator)
