"""A pretrained pixel-space SR network as a teacher: distillation onto its output for the same LR.

This is the "vanilla distillation from a strong teacher" of VPD-SR and SinSR, with the teacher
being any model a researcher already has (ESRGAN, Real-ESRGAN, SwinIR, HAT...): whatever spandrel,
ComfyUI's own upscale-model loader, can open. The student regresses onto the teacher's output,
which, unlike the HR crop, holds only what can be inferred from the LR: an easier, consistent
target for a small student, and optionally the target of the HFP and GAN terms too.

A large teacher dominates a CPU step, so its outputs can be cached: in memory for the run, and in
``student.sr_teacher_cache`` on disk, keyed by the teacher file and by the exact LR pixels. The LR
of a step is a pure function of its degradation seed (see ``trainer.loop``), so with
``data.fixed_batches`` a crop keeps its seed, reappears every cycle and is never recomputed, and
a resumed or repeated run reads the same targets.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vpdsr.paths import private_temp_path

from ..config_loading import ConfigError
from ..images import to_signed
from .reconstruction import ReconstructionLoss
from .registry import LossConfig, LossContext, StudentLoss, StudentStep, Terms

__all__ = ["SRTeacher", "SRTeacherLossConfig", "SRTeacherTerm", "load_sr_teacher", "teacher_dtype"]


@dataclass
class SRTeacherLossConfig(LossConfig):
    """Distillation onto a pretrained SR network's output for the same LR (student.sr_teacher)."""

    weight: float = 0.0
    kind: Literal["l1", "mse"] = "l1"
    hfp_target: bool = False
    """The HFP term compares with the teacher's output instead of the HR crop."""
    gan_target: bool = False
    """The discriminator takes the teacher's outputs as its "real" images instead of the HR crops."""


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def load_sr_teacher(
    path: str | Path,
    scale: int,
    cache_dir: str | Path | None = None,
    *,
    remember: bool = False,
    dtype: torch.dtype = torch.float32,
) -> SRTeacher:
    """Open ``path`` with spandrel and check it upscales by ``scale``; clear errors, no traceback.
    ``remember`` keeps outputs in memory too: only worth it when crops repeat (data.fixed_batches).
    ``dtype`` is the precision it computes in (``student.sr_teacher_dtype``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"student.sr_teacher: {path} not found (convert the bundled Real-ESRGAN with "
            "`python trainer/run.py export-realesrgan -o realesrgan-x4plus.safetensors`)"
        )
    if path.suffix.lower() not in (".pth", ".pt", ".safetensors", ".ckpt"):
        raise ConfigError(f"student.sr_teacher: {path.name} is not a .pth or .safetensors model file")
    try:
        import spandrel
    except ImportError:
        raise ConfigError(
            'student.sr_teacher needs spandrel: pip install "vpdsr[train]" (or pip install spandrel)'
        ) from None
    try:
        descriptor = spandrel.ModelLoader().load_from_file(str(path))
    except Exception as err:  # spandrel raises many types for unknown or damaged files
        raise ConfigError(f"student.sr_teacher: spandrel cannot load {path.name}: {err}") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise ConfigError(f"student.sr_teacher: {path.name} is not a super-resolution model")
    if descriptor.scale != scale:
        raise ConfigError(f"student.sr_teacher: {path.name} upscales x{descriptor.scale}, this run trains x{scale}")
    precision = "" if dtype == torch.float32 else "-" + str(dtype).removeprefix("torch.")  # targets differ by precision
    cache = Path(cache_dir) / f"{path.stem}-{_file_digest(path)}{precision}" if cache_dir else None
    return SRTeacher(descriptor.model.to(dtype), scale, cache, remember=remember)


class SRTeacher(nn.Module):
    """Frozen SR network, LR in [0, 1] -> SR in [0, 1] rounded to 8-bit (as its images would be
    published), each output cached by the LR's exact pixels: on disk in ``cache_dir``, and in
    memory with ``remember`` (which would grow without end if every step had new crops)."""

    def __init__(self, model: nn.Module, scale: int, cache_dir: Path | None = None, *, remember: bool = False) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.scale, self.cache_dir, self.remember = scale, cache_dir, remember
        self._memory: dict[str, torch.Tensor] = {}
        self.computed = 0  # teacher runs (cache misses), for tests and logs

    def train(self, mode: bool = True) -> SRTeacher:
        return super().train(False)  # always frozen: no dropout or norm statistics change

    @staticmethod
    def _key(lr: torch.Tensor) -> str:
        return hashlib.sha256(lr.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:32]

    def _lookup(self, key: str) -> torch.Tensor | None:
        if key in self._memory:
            return self._memory[key]
        if self.cache_dir is not None:
            file = self.cache_dir / f"{key}.safetensors"
            if file.is_file():
                sr_u8 = load_file(file)["sr"]
                if self.remember:
                    self._memory[key] = sr_u8
                return sr_u8
        return None

    def _store(self, key: str, sr_u8: torch.Tensor) -> None:
        if self.remember:
            self._memory[key] = sr_u8
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            entry = self.cache_dir / f"{key}.safetensors"
            tmp = private_temp_path(entry)  # runs sharing the cache each write their own
            try:
                save_file({"sr": sr_u8}, tmp)
                tmp.replace(entry)  # never a half-written entry
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)

    @torch.no_grad()
    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        keys = [self._key(item) for item in lr]
        found = [self._lookup(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            weight = next(self.model.parameters())
            out = self.model(lr[missing].to(weight.device, weight.dtype)).float().clamp(0, 1)
            for i, sr in zip(missing, out, strict=True):
                found[i] = (sr * 255).round().to(torch.uint8).cpu()
                self._store(keys[i], found[i])
            self.computed += len(missing)
        return torch.stack(found).to(lr.device, torch.float32) / 255


def teacher_dtype(name: str) -> torch.dtype:
    """``student.sr_teacher_dtype`` as a torch dtype."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


class SRTeacherTerm(StudentLoss, key="sr_teacher", config=SRTeacherLossConfig):
    """L1/MSE onto ``student.sr_teacher``'s output, which may also take HR's place as the HFP term's
    target and as the discriminator's real images."""

    config: SRTeacherLossConfig

    @classmethod
    def enabled(cls, config: SRTeacherLossConfig) -> bool:
        return config.weight > 0 or config.hfp_target or config.gan_target

    @classmethod
    def build(cls, config: SRTeacherLossConfig, ctx: LossContext) -> SRTeacherTerm | None:
        """Also the start-up check that the network and the options that use it come together."""
        if ctx.cfg.student.sr_teacher is None:
            if cls.enabled(config):
                raise ConfigError("losses.sr_teacher needs a pretrained SR network: set student.sr_teacher")
            return None
        if not cls.enabled(config):
            raise ConfigError(
                "student.sr_teacher is set but no loss uses it: set losses.sr_teacher.weight "
                "(or its hfp_target / gan_target)"
            )
        return cls(config, ctx)

    def __init__(self, config: SRTeacherLossConfig, ctx: LossContext) -> None:
        super().__init__(config, ctx)
        for option, loss in (("gan_target", "adversarial"), ("hfp_target", "hfp")):
            if getattr(config, option):
                if not ctx.enabled(loss):
                    raise ConfigError(f"losses.sr_teacher.{option} needs losses.{loss}.weight > 0")
                ctx.supply_target(loss, self.output)
        sc = ctx.cfg.student
        self.teacher = load_sr_teacher(
            sc.sr_teacher, ctx.cfg.scale, sc.sr_teacher_cache, remember=ctx.cfg.data.fixed_batches > 0,
            dtype=teacher_dtype(sc.sr_teacher_dtype),
        ).to(ctx.device)
        self.distill = ReconstructionLoss(config.kind)

    def output(self, s: StudentStep) -> torch.Tensor:
        """The teacher's SR of the step's LR, in [-1, 1], made once per step."""
        return s.once(self.key, lambda: to_signed(self.teacher(s.lr)))

    def terms(self, s: StudentStep) -> Terms:
        if self.config.weight <= 0:  # on only as a target of the HFP term or the discriminator
            return {}
        return {"sr_teacher": (self.config.weight, self.distill(s.sr, self.output(s)))}
