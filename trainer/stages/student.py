"""Stage ``student``: one-step distillation into ``vpdsr.OneStepStudent`` (VPD-SR / OSEDiff form).

Initial weights come from the teacher file (tiny backbone: its trained VAE, and its UNet where
shapes match; the student's ``conv_in`` takes the teacher's LR-latent half, which makes the
untrained student already approximate the teacher's first, t=999, step) or from SD base weights
(LoRA on the UNet, ``conv_in`` trained in full). The VAE decoder is frozen unless
``student.train_vae_decoder`` (tiny backbone), so the student's latents stay in the latent space
the frozen prior scores.

Each step: the student makes SR from the bicubic-upscaled LR; the weighted losses of
``cfg.losses`` update it; then VSD's fake model and the discriminator take their own steps.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel
from torch import nn

from vpdsr.color import apply_color_fix
from vpdsr.lora import (
    UNET_TARGET_SUFFIXES,
    VAE_ENCODER_TARGET_SUFFIXES,
    LoraSpec,
    add_lora,
    default_lora_targets,
    merge_lora,
)
from vpdsr.backbones import BackboneConfig, build_backbone
from vpdsr.errors import ModelFileError
from vpdsr.model import OneStepStudent
from vpdsr.modelfile import load_student, save_student

from ..config import TrainConfig
from ..config_loading import ConfigError
from ..diffusion import LatentDiffusion
from ..images import bicubic_up, pad_to_multiple, psnr_ssim, to_signed, to_unit
from ..losses import (
    AdversarialLoss,
    DiffLoss,
    HFPLoss,
    ReconstructionLoss,
    SemanticLoss,
    TeacherRegressionLoss,
    VSDLoss,
    load_lpips,
    load_semantic_model,
    load_sr_teacher,
)
from ..teacher_file import load_teacher
from .base import Stage, ValBatch, load_base_weights, prompt_embedding, resolve_backbone

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


def init_from_student(path: str | None, config: BackboneConfig) -> tuple[nn.Module, UNet2DConditionModel, torch.Tensor]:
    """The VAE, UNet and conditioning of a student file, in parts built for ``config``.

    The file's backbone may lack only the config's refiner (``vpdsr.refiner``), which then keeps
    its zero start, so training begins from the file's exact output.
    """
    if not path:
        raise ConfigError("student.init_from is 'student' but no student.init_student file is given")
    try:
        source = load_student(path)
    except ModelFileError as err:
        raise ConfigError(f"student.init_student: {err}") from None
    theirs = {k: v for k, v in source.config.to_dict().items() if k not in ("name", "description", "refiner")}
    ours = {k: v for k, v in config.to_dict().items() if k not in ("name", "description", "refiner")}
    if theirs != ours:
        raise ConfigError(
            f"student.init_student {path} has the {source.config.name} backbone, which differs from "
            f"{config.name} in more than a refiner"
        )
    parts = build_backbone(config)
    missing, unexpected = parts.vae.load_state_dict(source.vae.state_dict(), strict=False)
    if unexpected or any(not k.startswith("refiner.") for k in missing):
        raise ConfigError(f"student.init_student {path}: its VAE weights do not fit {config.name}")
    parts.unet.load_state_dict(source.unet.state_dict())
    return parts.vae, parts.unet, source.prompt_embeds.detach().clone()


class StudentStage(Stage):
    def __init__(self, cfg: TrainConfig, accelerator: Accelerator) -> None:
        super().__init__(cfg, accelerator)
        sc, losses = cfg.student, cfg.losses
        config = resolve_backbone(cfg.backbone)
        teacher = base = None
        if sc.teacher:
            teacher, _ = load_teacher(sc.teacher)
            if teacher.config.to_dict() != config.to_dict():
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
            prompt_embeds = teacher.cond.cpu()
        elif sc.init_from == "student":
            vae, unet, prompt_embeds = init_from_student(sc.init_student, config)
        else:
            vae, unet = copy.deepcopy(base.vae), copy.deepcopy(base.unet)
            prompt_embeds = prompt_embedding(config, base.text_encoder, sc.prompt)
        self.student = OneStepStudent(vae, unet, config, timestep=sc.timestep, prompt_embeds=prompt_embeds)
        self.lora_specs = self._make_trainable(vae, unet)
        self.student.to(self.device)
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
        self._build_losses(prior, teacher)

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
        if self.vsd is not None:
            self.saved_modules["fake"] = self.vsd.fake_unet
            self.add_optimizer("fake", self.vsd.fake_parameters(), losses.vsd.fake_lr)
            self.prepare_in_place(self.vsd, "fake_unet")
        if self.adversarial is not None:
            self.saved_modules["discriminator"] = self.adversarial.discriminator
            self.add_optimizer(
                "discriminator", list(self.adversarial.discriminator.parameters()), losses.adversarial.lr
            )
            self.prepare_in_place(self.adversarial, "discriminator")

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
            suffixes = tuple(s for s in UNET_TARGET_SUFFIXES if s != "conv_in")
            specs.append(LoraSpec("unet", "student", sc.lora_rank, alpha, default_lora_targets(unet, suffixes)))
            add_lora(unet, specs[-1])
            unet.conv_in.requires_grad_(True)
            if sc.train_vae_encoder:
                targets = default_lora_targets(vae, VAE_ENCODER_TARGET_SUFFIXES, prefix="encoder")
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

    def _build_losses(self, prior: LatentDiffusion | None, teacher: LatentDiffusion | None) -> None:
        lc = self.cfg.losses

        def need_prior(what: str) -> LatentDiffusion:
            if prior is None:
                raise ConfigError(
                    f"{what} needs a frozen diffusion prior: "
                    "set student.teacher (prior: teacher) or student.base (prior: base)"
                )
            return prior

        self.reconstruction = ReconstructionLoss(lc.reconstruction.kind)
        self.lpips = None
        if lc.reconstruction.lpips_weight > 0:
            self.lpips = load_lpips(lc.reconstruction.lpips_vgg_path, lc.reconstruction.lpips_lin_path).to(self.device)
        semantic = None
        if lc.semantic.weight > 0 or lc.semantic.kl_weight > 0 or lc.hfp.clip_weight > 0:
            what = (
                "the ESS loss (losses.semantic)"
                if lc.semantic.weight > 0 or lc.semantic.kl_weight > 0
                else "losses.hfp.clip_weight"
            )
            semantic = load_semantic_model(self.cfg.clip.path, self.cfg.clip.config, self.cfg.clip.tags, what).to(
                self.device
            )
        self.semantic = (
            SemanticLoss(semantic)
            if semantic is not None and (lc.semantic.weight > 0 or lc.semantic.kl_weight > 0)
            else None
        )
        h = lc.hfp
        self.hfp = (
            HFPLoss(
                h.bands, h.levels, semantic, h.clip_weight, energy_weight=h.energy_weight, energy_window=h.energy_window
            )
            if h.weight > 0
            else None
        )
        self._build_sr_teacher()
        self.regression = None
        if lc.regression.weight > 0:
            if teacher is None:
                raise ConfigError("losses.regression needs a multi-step SR teacher: set student.teacher")
            self.regression = TeacherRegressionLoss(teacher, lc.regression.steps, lc.regression.guidance)
        self.vsd = None
        if lc.vsd.weight > 0:
            v = lc.vsd
            self.vsd = VSDLoss(need_prior("losses.vsd"), v.guidance, v.t_min, v.t_max, v.fake_lora_rank).to(self.device)
        self.diffloss = None
        if lc.diffloss.weight > 0:
            d = lc.diffloss
            self.diffloss = DiffLoss(need_prior("losses.diffloss"), d.t_min, d.t_max, d.feature_weight)
        self.adversarial = None
        if lc.adversarial.weight > 0:
            a = lc.adversarial
            feature_prior = (
                need_prior("the prior_features discriminator") if a.discriminator == "prior_features" else None
            )
            self.adversarial = AdversarialLoss(a.discriminator, a.loss, a.channels, feature_prior, a.t_min, a.t_max).to(
                self.device
            )

    def _build_sr_teacher(self) -> None:
        """The pretrained SR network of ``student.sr_teacher``, and which terms it serves."""
        sc, st = self.cfg.student, self.cfg.losses.sr_teacher
        uses = st.weight > 0 or st.hfp_target or st.gan_target
        self.sr_teacher = None
        if sc.sr_teacher is None:
            if uses:
                raise ConfigError("losses.sr_teacher needs a pretrained SR network: set student.sr_teacher")
            return
        if not uses:
            raise ConfigError(
                "student.sr_teacher is set but no loss uses it: set losses.sr_teacher.weight "
                "(or its hfp_target / gan_target)"
            )
        if st.gan_target and self.cfg.losses.adversarial.weight <= 0:
            raise ConfigError("losses.sr_teacher.gan_target needs losses.adversarial.weight > 0")
        if st.hfp_target and self.cfg.losses.hfp.weight <= 0:
            raise ConfigError("losses.sr_teacher.hfp_target needs losses.hfp.weight > 0")
        self.sr_teacher = load_sr_teacher(
            sc.sr_teacher, self.cfg.scale, sc.sr_teacher_cache, remember=self.cfg.data.fixed_batches > 0
        ).to(self.device)
        self.sr_distill = ReconstructionLoss(st.kind)

    # ------------------------------------------------------------------ training

    def train(self, mode: bool = True) -> None:
        self.student.train(mode)
        if self.adversarial is not None:
            self.adversarial.discriminator.train(mode)
        if self.vsd is not None:
            self.vsd.fake_unet.train(mode)

    def _student_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            z_lr = self.student.encode(x)
        z_sr = self.student.denoise(z_lr)
        return self.student.refine(self.student.decode(z_sr), x), z_sr

    def train_step(self, batch: dict[str, torch.Tensor], step: int, generator: torch.Generator) -> dict[str, float]:
        lc = self.cfg.losses
        self.train(True)
        hr = to_signed(batch["hr"])
        lr_up = to_signed(bicubic_up(batch["lr"], hr.shape[-2:]))
        sr, z_sr = self._student_forward(lr_up)
        sr = apply_color_fix(sr, lr_up, self.cfg.student.color_fix)
        st = lc.sr_teacher
        teacher_sr = to_signed(self.sr_teacher(batch["lr"])) if self.sr_teacher is not None else None
        hfp_target = teacher_sr if st.hfp_target else hr
        gan_real = teacher_sr if st.gan_target else hr
        with torch.no_grad():
            z_lr_prior = self.prior.encode(lr_up) if self.prior is not None and self.prior.lr_conditioned else None
            z_lr_teacher = (
                z_lr_prior if self.teacher is self.prior else (self.teacher.encode(lr_up) if self.regression else None)
            )
            need_hr_latent = self.diffloss is not None or (
                self.adversarial is not None and self.adversarial.prior is not None
            )
            z_hr = self.prior.encode(hr) if need_hr_latent else None
            z_real = self.prior.encode(gan_real) if st.gan_target and need_hr_latent else z_hr
        adversarial_on = self.adversarial is not None and step >= lc.adversarial.start_step

        terms: dict[str, tuple[float, torch.Tensor]] = {"rec": (lc.reconstruction.weight, self.reconstruction(sr, hr))}
        if self.lpips is not None:
            terms["lpips"] = (lc.reconstruction.lpips_weight, self.lpips(sr, hr).mean())
        if self.hfp is not None:
            terms["hfp"] = (lc.hfp.weight, self.hfp(sr, hfp_target))
        if teacher_sr is not None and st.weight > 0:
            terms["sr_teacher"] = (st.weight, self.sr_distill(sr, teacher_sr))
        if self.semantic is not None:
            ess = self.semantic(sr, hr)
            terms["ess_cos"] = (lc.semantic.weight, ess["cosine"])
            terms["ess_kl"] = (lc.semantic.kl_weight, ess["kl"])
        if self.regression is not None:
            terms["regression"] = (lc.regression.weight, self.regression(z_sr, z_lr_teacher, generator))
        if self.vsd is not None:
            terms["vsd"] = (lc.vsd.weight, self.vsd(z_sr, z_lr_prior, generator))
        if self.diffloss is not None:
            terms["diffloss"] = (lc.diffloss.weight, self.diffloss(z_sr, z_hr, z_lr_prior, generator))
        if adversarial_on:
            terms["gan_g"] = (lc.adversarial.weight, self.adversarial.generator_loss(sr, z_sr, z_lr_prior, generator))
        loss = sum(w * value for w, value in terms.values())
        logs = {name: float(value.detach()) for name, (_, value) in terms.items()}
        logs["loss"] = self.optimize("student", loss)
        if self.vsd is not None:
            logs["vsd_fake"] = self.optimize("fake", self.vsd.fake_loss(z_sr, z_lr_prior, generator))
        if adversarial_on:
            d_loss = self.adversarial.discriminator_loss(
                sr.detach(), gan_real, z_sr.detach(), z_real, z_lr_prior, generator
            )
            logs["gan_d"] = self.optimize("discriminator", d_loss)
        logs["lr"] = self.schedulers["student"].get_last_lr()[0]
        return logs

    # ------------------------------------------------------------------ validation and export

    @property
    def multiple(self) -> int:
        return self.student.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @torch.no_grad()
    def upscale(self, lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """SR in [0, 1] for LR in [0, 1], exactly the path training takes (no tiling)."""
        x = pad_to_multiple(to_signed(bicubic_up(lr, size)), self.multiple)
        sr, _ = self._student_forward(x)
        sr = apply_color_fix(sr, x, self.cfg.student.color_fix)
        return to_unit(sr[..., : size[0], : size[1]])

    @torch.no_grad()
    def validate(self, batches: list[ValBatch], step: int) -> tuple[dict[str, float], list[list[torch.Tensor]]]:
        self.train(False)
        psnrs, ssims, rows = [], [], []
        with self.ema.applied() if self.ema is not None else nullcontext():
            for batch in batches:
                hr, lr = batch["hr"].to(self.device), batch["lr"].to(self.device)
                sr = self.upscale(lr, hr.shape[-2:])
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
        )

    def training_info(self, step: int) -> dict[str, Any]:
        info = super().training_info(step)
        info["teacher"] = info["config"]["student"]["teacher"]  # made portable by the base class
        return info
