"""Stage ``student``: one-step distillation into ``vpdsr.OneStepStudent`` (VPD-SR / OSEDiff form).

Initial weights come from the teacher file (tiny backbone: its trained VAE, and its UNet where
shapes match; the student's ``conv_in`` takes the teacher's LR-latent half, which makes the
untrained student already approximate the teacher's first, t=999, step) or from SD base weights
(LoRA on the UNet, ``conv_in`` trained in full). The VAE decoder is frozen unless
``student.train_vae_decoder`` (tiny backbone), so the student's latents stay in the latent space
the frozen prior scores.

Each step: the student makes SR from the bicubic-upscaled LR; the enabled losses of ``cfg.losses``
(``trainer.losses``, one registered class each) give the weighted terms that update it; then the
models some losses train themselves (VSD's fake UNet, the discriminator) take their own steps.
Validation runs the student through ``VPDPipeline``, the inference path itself.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel
from torch import nn

from vpdsr.color import apply_color_fix
from vpdsr.lora import LoraSpec, add_lora, merge_lora
from vpdsr.backbones import BackboneConfig, backbone_config, build_backbone
from vpdsr.errors import ModelFileError
from vpdsr.model import OneStepStudent
from vpdsr.modelfile import StudentMeta, load_student, save_student
from vpdsr.pipeline import VPDPipeline

from ..config import TrainConfig
from ..config_loading import ConfigError
from ..diffusion import LatentDiffusion
from ..images import bicubic_up, psnr_ssim, to_signed
from ..losses import LossContext, StudentStep, build_losses
from ..teacher_file import load_teacher
from .base import Stage, ValBatch, load_base_weights, prompt_embedding

__all__ = ["StudentStage", "init_from_student", "init_from_teacher"]


def init_from_teacher(teacher: LatentDiffusion) -> tuple[nn.Module, UNet2DConditionModel]:
    """A copy of the teacher's VAE and a student UNet holding the teacher's weights.

    Every tensor of matching shape is copied; ``conv_in`` (twice as many input channels in the
    teacher) takes the LR-latent half, the half that sees what the student's input will be.
    """
    config = teacher.config
    vae = copy.deepcopy(teacher.vae)
    unet = UNet2DConditionModel(**config.unet)
    own, source = unet.state_dict(), teacher.unet.state_dict()
    latent = config.latent_channels
    for key, value in own.items():
        src = source.get(key)
        if src is None:
            continue
        if src.shape == value.shape:
            own[key] = src.clone()
        elif key == "conv_in.weight" and src.shape[1] == 2 * latent:
            own[key] = src[:, latent:].clone()
    unet.load_state_dict(own)
    return vae, unet


def init_from_student(
    path: str | None, config: BackboneConfig
) -> tuple[nn.Module, UNet2DConditionModel, torch.Tensor, dict[str, torch.Tensor]]:
    """The VAE, UNet, conditioning and the family's extra conditioning of a student file, in parts built for ``config``.

    The file's backbone may lack only the config's refiner (``vpdsr.refiner``), which then keeps
    its zero start, so training begins from the file's exact output. Or it may have another decoder
    than the config's ``vae_decoder`` (``vpdsr.shuffle_decoder``): the encoder and the UNet are
    then the file's and the new decoder starts from its own initialisation.
    """
    if not path:
        raise ConfigError("student.init_from is 'student' but no student.init_student file is given")
    try:
        source = load_student(path)
    except ModelFileError as err:
        raise ConfigError(f"student.init_student: {err}") from None
    new_decoder = source.config.extra.get("vae_decoder") != config.extra.get("vae_decoder")
    ignore = ("name", "description", "refiner") + (("vae_decoder", "vae_upsample") if new_decoder else ())
    if _architecture(source.config, ignore=ignore) != _architecture(config, ignore=ignore):
        raise ConfigError(
            f"student.init_student {path} has the {source.config.name} backbone, which differs from "
            f"{config.name} in more than a refiner or the decoder"
        )
    parts = build_backbone(config)
    fresh = ("refiner.", "decoder.") if new_decoder else ("refiner.",)
    weights = {k: v for k, v in source.vae.state_dict().items() if not (new_decoder and k.startswith("decoder."))}
    missing, unexpected = parts.vae.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith(fresh) for k in missing):
        raise ConfigError(f"student.init_student {path}: its VAE weights do not fit {config.name}")
    parts.unet.load_state_dict(source.unet.state_dict())
    extras = {name: t.detach().clone() for name, t in source.extra_embeds.items()}
    return parts.vae, parts.unet, source.prompt_embeds.detach().clone(), extras


def _architecture(config: BackboneConfig, ignore: tuple[str, ...] = ("description",)) -> dict[str, Any]:
    """The config without ``ignore``: prose may be corrected later, and teacher files store the
    config they were trained with, so only what the weights depend on must match."""
    return {k: v for k, v in config.to_dict().items() if k not in ignore}


class StudentStage(Stage):
    def __init__(self, cfg: TrainConfig, accelerator: Accelerator) -> None:
        super().__init__(cfg, accelerator)
        sc = cfg.student
        config = backbone_config(cfg.backbone)  # a bundled name or a JSON file
        teacher = base = None
        if sc.teacher:
            teacher, _ = load_teacher(sc.teacher)
            if _architecture(teacher.config) != _architecture(config):
                raise ConfigError(
                    f"the teacher file {sc.teacher} was trained for another backbone ({teacher.config.name}) "
                    f"than backbone: {cfg.backbone}"
                )
        if sc.init_from == "base" or sc.prior == "base":
            base = load_base_weights(config, sc.base, "student.base")
        torch.manual_seed(cfg.seed)

        if sc.init_from == "teacher":
            if teacher is None:
                raise ConfigError("student.init_from is 'teacher' but no student.teacher file is given")
            vae, unet = init_from_teacher(teacher)
            prompt_embeds, extras = teacher.cond.cpu(), None
        elif sc.init_from == "student":
            vae, unet, prompt_embeds, extras = init_from_student(sc.init_student, config)
        else:
            vae, unet = copy.deepcopy(base.vae), copy.deepcopy(base.unet)
            prompt_embeds, extras = prompt_embedding(config, base.text_encoder, sc.prompt), None
        self.student = OneStepStudent(
            vae, unet, config, timestep=sc.timestep, prompt_embeds=prompt_embeds, extra_embeds=extras
        )
        self.lora_specs = self._make_trainable(vae, unet)
        self.student.to(self.device)
        meta = StudentMeta(
            config, timestep=sc.timestep, scale=cfg.scale, prompt=sc.prompt, name=cfg.name,
            wavelet_levels=sc.wavelet_levels, ring_clamp=sc.ring_clamp,
        )
        self.pipeline = VPDPipeline(self.student, meta, self.device, torch.float32)  # validation's upscaler
        if cfg.optim.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            vae.enable_gradient_checkpointing()
        self.unet, self.vae = unet, vae

        # the frozen models that judge the student
        prior = None
        if sc.prior == "teacher":
            prior = teacher
        elif base is not None:
            cond = prompt_embedding(config, base.text_encoder, sc.prompt)
            uncond = prompt_embedding(config, base.text_encoder, sc.negative_prompt)
            prior = LatentDiffusion(base.vae, base.unet, config, lr_conditioned=False, cond=cond, uncond=uncond)
        for frozen in (prior, teacher):
            if frozen is not None:
                frozen.requires_grad_(False).eval().to(self.device)
        self.prior, self.teacher = prior, teacher
        ctx = LossContext(cfg, self.device, prior, teacher)
        self.losses = build_losses(ctx)
        self.targets = ctx.targets

        trainable = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
        trainable.update({f"vae.{n}": p for n, p in vae.named_parameters() if p.requires_grad})
        self.saved_modules = {"unet": unet, "vae": vae}
        self.add_optimizer("student", list(trainable.values()), cfg.optim.lr, main=True)
        self.enable_ema(trainable, "student")
        self.prepare_in_place(self.student, "unet")
        if self.train_encoder:
            self.prepare_in_place(vae, "encoder")
        if self.train_decoder:
            self.prepare_in_place(vae, "decoder")
        self.own_models = [own for own in (loss.own_model() for loss in self.losses) if own is not None]
        for own in self.own_models:  # VSD's fake UNet, the discriminator
            self.saved_modules[own.name] = own.module
            self.add_optimizer(own.name, own.params, own.lr)
            self.prepare_in_place(own.owner, own.attr)

    # ------------------------------------------------------------------ set-up

    def _make_trainable(self, vae: nn.Module, unet: UNet2DConditionModel) -> list[LoraSpec]:
        """Full UNet (lora_rank 0) or LoRA + conv_in; optionally the VAE encoder and decoder. Returns LoRA specs."""
        sc = self.cfg.student
        self.student.requires_grad_(False)
        self.train_encoder = sc.train_vae_encoder
        self.train_decoder = sc.train_vae_decoder
        specs = []
        if sc.lora_rank > 0:
            alpha = sc.lora_alpha or float(sc.lora_rank)
            targets = self.student.family.unet_lora_targets(unet, include_conv_in=False)  # conv_in trains in full
            specs.append(LoraSpec("unet", "student", sc.lora_rank, alpha, targets))
            add_lora(unet, specs[-1])
            unet.conv_in.requires_grad_(True)
            if sc.train_vae_encoder:
                targets = self.student.family.vae_lora_targets(vae)
                specs.append(LoraSpec("vae", "student_encoder", sc.lora_rank, alpha, targets))
                add_lora(vae, specs[-1])
        else:
            unet.requires_grad_(True)
            if sc.train_vae_encoder:
                vae.encoder.requires_grad_(True)
            if sc.train_vae_decoder:
                vae.decoder.requires_grad_(True)
        if self.student.refiner is not None:
            self.student.refiner.requires_grad_(True)
        return specs

    # ------------------------------------------------------------------ training

    def train(self, mode: bool = True) -> None:
        self.student.train(mode)
        for own in self.own_models:
            own.module.train(mode)

    def _student_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            z_lr = self.student.encode(x)
        z_sr = self.student.denoise(z_lr)
        return self.student.refine(self.student.decode(z_sr), x), z_sr

    def train_step(self, batch: dict[str, torch.Tensor], step: int, generator: torch.Generator) -> dict[str, float]:
        self.train(True)
        hr = to_signed(batch["hr"])
        lr_up = to_signed(bicubic_up(batch["lr"], hr.shape[-2:]))
        sr, z_sr = self._student_forward(lr_up)
        sc = self.cfg.student
        sr = apply_color_fix(sr, lr_up, sc.color_fix, sc.wavelet_levels, sc.ring_clamp)
        s = StudentStep(step=step, generator=generator, hr=hr, lr=batch["lr"], lr_up=lr_up, sr=sr, z_sr=z_sr,
                        prior=self.prior, teacher=self.teacher, targets=self.targets)  # fmt: skip
        terms = {name: term for loss in self.losses for name, term in loss.terms(s).items()}
        loss = sum(weight * value for weight, value in terms.values())
        logs = {name: float(value.detach()) for name, (_, value) in terms.items()}
        logs["loss"] = self.optimize("student", loss)
        for each in self.losses:  # the models the losses train themselves, after the student
            logs.update(each.after_step(s, self.optimize))
        logs["lr"] = self.schedulers["student"].get_last_lr()[0]
        return logs

    # ------------------------------------------------------------------ validation and export

    @contextmanager
    def _unwrapped(self) -> Iterator[None]:
        """The student's prepared parts as the plain modules they wrap, for the pipeline, which runs
        their layers one by one (a DDP wrapper has only ``forward``); the wrappers are put back after."""
        parts = [(self.student, "unet"), (self.vae, "encoder"), (self.vae, "decoder")]
        wrapped = [getattr(owner, attr) for owner, attr in parts]
        for (owner, attr), module in zip(parts, wrapped, strict=True):
            setattr(owner, attr, self.acc.unwrap_model(module))
        try:
            yield
        finally:
            for (owner, attr), module in zip(parts, wrapped, strict=True):
                setattr(owner, attr, module)

    @torch.no_grad()
    def validate(self, batches: list[ValBatch], step: int) -> tuple[dict[str, float], list[list[torch.Tensor]]]:
        """PSNR/SSIM and sample rows of the student run as users run it: through ``VPDPipeline``,
        tiled as it tiles and with its colour fix, so the inference path exists once."""
        self.train(False)
        psnrs, ssims, rows = [], [], []
        with self.ema.applied() if self.ema is not None else nullcontext(), self._unwrapped():
            for batch in batches:
                hr, lr = batch["hr"].cpu(), batch["lr"].cpu()
                sr = self.pipeline(lr, color_fix=self.cfg.student.color_fix)
                p, s = psnr_ssim(sr, hr)
                psnrs.append(p)
                ssims.append(s)
                rows += [[a, b, c] for a, b, c in zip(bicubic_up(lr, hr.shape[-2:]), sr, hr, strict=True)]
        return {"psnr": float(torch.cat(psnrs).mean()), "ssim": float(torch.cat(ssims).mean())}, rows

    def export(self, out_dir: Path) -> Path:
        self.unwrap_in_place(self.student, "unet")
        if self.train_encoder:
            self.unwrap_in_place(self.vae, "encoder")
        if self.train_decoder:
            self.unwrap_in_place(self.vae, "decoder")
        if self.ema is not None:
            self.ema.copy_to_params()
        keep_lora = bool(self.lora_specs) and self.cfg.student.init_from == "base"
        if self.lora_specs and not keep_lora:
            merge_lora(self.unet)
            merge_lora(self.vae)
        path = out_dir / f"{self.cfg.name}.safetensors"
        return save_student(
            path,
            self.student,
            weights="lora" if keep_lora else "full",
            lora=self.lora_specs if keep_lora else None,
            scale=self.cfg.scale,
            prompt=self.cfg.student.prompt,
            name=self.cfg.name,
            training_info=self.training_info(self.cfg.optim.steps),
            wavelet_levels=self.cfg.student.wavelet_levels,
            ring_clamp=self.cfg.student.ring_clamp,
        )

    def training_info(self, step: int) -> dict[str, Any]:
        info = super().training_info(step)
        info["teacher"] = info["config"]["student"]["teacher"]  # made portable by the base class
        return info
