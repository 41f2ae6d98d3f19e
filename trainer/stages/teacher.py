"""Stage ``teacher``: a multi-step diffusion SR model, for backbones without a pretrained one.

The backbone's UNet is widened to take the LR latent beside the noisy HR latent and trained
with the ordinary diffusion loss (with LR-condition dropout, for classifier-free guidance). The
tiny backbone also needs a VAE: the first ``teacher.vae_steps`` steps train it alone on
reconstruction (of HR crops and of upscaled LR images, which is what the student's encoder will
see), then it is frozen for the UNet phase. The product is a teacher file (``teacher_file``)
that the student stage loads.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from vpdsr.backbones import backbone_config, build_backbone

from ..config import TrainConfig
from ..config_loading import ConfigError
from ..diffusion import LatentDiffusion, conditional_unet_config, expand_conv_in, random_timesteps
from ..images import bicubic_up, psnr_ssim, to_signed, to_unit
from ..losses import hfp_loss
from ..teacher_file import save_teacher
from .base import Stage, ValBatch, load_base_weights, prompt_embedding

__all__ = ["TeacherStage", "VAEReconstruction"]

VAL_SEED = 1234


class VAEReconstruction(nn.Module):
    """encode -> sample (or mean) -> decode as one ``forward``, so DDP sees the VAE being trained."""

    def __init__(self, vae: AutoencoderKL, sample: bool = True) -> None:
        super().__init__()
        self.vae = vae
        self.sample = sample

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator) if self.sample else posterior.mean
        return self.vae.decode(z).sample, posterior.kl().mean()


class TeacherStage(Stage):
    def __init__(self, cfg: TrainConfig, accelerator: Accelerator) -> None:
        super().__init__(cfg, accelerator)
        tc = cfg.teacher
        config = backbone_config(cfg.backbone)  # a bundled name or a JSON file
        if tc.vae_steps >= cfg.optim.steps:
            raise ConfigError(
                f"teacher.vae_steps ({tc.vae_steps}) leaves no steps for the UNet (optim.steps = {cfg.optim.steps})"
            )
        torch.manual_seed(cfg.seed)  # the same initial weights on every process and every resume
        if tc.base:
            base = load_base_weights(config, tc.base, "teacher.base")
            vae, unet = base.vae, expand_conv_in(base.unet, 2 * config.latent_channels)
            cond = prompt_embedding(config, base.text_encoder, tc.prompt)
        else:
            if config.text_encoder is not None:
                raise ConfigError(f"the {config.name} backbone is trained from its base weights: set teacher.base")
            vae = build_backbone(config).vae
            unet = UNet2DConditionModel(**conditional_unet_config(config))
            cond = prompt_embedding(config, None, tc.prompt)
        self.model = LatentDiffusion(vae, unet, config, lr_conditioned=True, cond=cond).to(self.device)
        if cfg.optim.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            vae.enable_gradient_checkpointing()
        self.saved_modules = {"vae": vae, "unet": unet}
        self.unet = unet
        self.vae_steps = tc.vae_steps
        if self.vae_steps:
            self.vae_trainer = self.acc.prepare(VAEReconstruction(vae, tc.vae_sample))
            self.add_optimizer("vae", list(vae.parameters()), tc.vae_lr)
        self.add_optimizer(
            "unet", list(unet.parameters()), cfg.optim.lr, main=True, total_steps=cfg.optim.steps - self.vae_steps
        )
        self.enable_ema(dict(unet.named_parameters()), "unet")
        self.prepare_in_place(self.model, "unet")

    def train(self, mode: bool = True) -> None:
        in_vae_phase = getattr(self, "_in_vae_phase", True)
        self.model.vae.train(mode and in_vae_phase)
        self.model.unet.train(mode)

    def _inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hr = batch["hr"]
        return to_signed(hr), to_signed(bicubic_up(batch["lr"], hr.shape[-2:]))

    def train_step(self, batch: dict[str, torch.Tensor], step: int, generator: torch.Generator) -> dict[str, float]:
        self._in_vae_phase = step < self.vae_steps
        self.train(True)
        return self._vae_step(batch, generator) if self._in_vae_phase else self._unet_step(batch, generator)

    def _vae_step(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, float]:
        tc = self.cfg.teacher
        hr, lr_up = self._inputs(batch)
        k = round(hr.shape[0] * tc.vae_lr_fraction)
        x = torch.cat([lr_up[:k], hr[k:]])
        rec, kl = self.vae_trainer(x, generator)
        l1 = F.l1_loss(rec.float(), x.float())
        loss = l1 + tc.vae_kl_weight * kl
        logs = {"vae/l1": float(l1.detach()), "vae/kl": float(kl.detach())}
        if tc.vae_hfp_weight > 0:
            hfp = hfp_loss(rec.float(), x.float())
            loss = loss + tc.vae_hfp_weight * hfp
            logs["vae/hfp"] = float(hfp.detach())
        logs["loss"] = self.optimize("vae", loss)
        return logs

    def _unet_step(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, float]:
        model = self.model
        hr, lr_up = self._inputs(batch)
        n = hr.shape[0]
        with torch.no_grad():
            z_hr, z_lr = model.encode(hr), model.encode(lr_up)
        keep = torch.rand(n, generator=generator, device=generator.device) >= self.cfg.teacher.cond_dropout
        t = random_timesteps(n, 0, model.num_timesteps - 1, generator, self.device)
        noise = torch.randn(z_hr.shape, generator=generator, device=generator.device).to(z_hr)
        pred = model.predict(model.add_noise(z_hr, noise, t), t, model.lr_input(z_lr, keep.to(self.device)))
        loss = F.mse_loss(pred.float(), model.target(z_hr, noise, t).float())
        return {"loss": self.optimize("unet", loss), "lr": self.schedulers["unet"].get_last_lr()[0]}

    @torch.no_grad()
    def validate(self, batches: list[ValBatch], step: int) -> tuple[dict[str, float], list[list[torch.Tensor]]]:
        self.train(False)
        model = self.model
        psnrs, ssims, rows = [], [], []
        generator = torch.Generator(self.device).manual_seed(VAL_SEED)
        unet_trained = step > self.vae_steps
        ema = self.ema.applied() if self.ema is not None and unet_trained else nullcontext()
        with ema:
            for batch in batches:
                hr, lr_up = self._inputs({k: v.to(self.device) for k, v in batch.items()})
                if unet_trained:
                    z = model.sample(model.encode(lr_up), self.cfg.teacher.sampling_steps, generator)
                    out = to_unit(model.decode(z))
                else:  # still in the VAE phase: show what the VAE makes of the HR
                    out = to_unit(model.decode(model.encode(hr)))
                p, s = psnr_ssim(out, to_unit(hr))
                psnrs.append(p)
                ssims.append(s)
                rows += [[to_unit(a), b, to_unit(c)] for a, b, c in zip(lr_up, out, hr, strict=True)]
        prefix = "teacher" if unet_trained else "vae"
        metrics = {f"{prefix}_psnr": float(torch.cat(psnrs).mean()), f"{prefix}_ssim": float(torch.cat(ssims).mean())}
        return metrics, rows

    def export(self, out_dir: Path) -> Path:
        self.unwrap_in_place(self.model, "unet")
        if self.ema is not None:
            self.ema.copy_to_params()
        path = out_dir / f"{self.cfg.name}.safetensors"
        return save_teacher(path, self.model, sampling_steps=self.cfg.teacher.sampling_steps,
                            training_info=self.training_info(self.cfg.optim.steps))  # fmt: skip
