"""Stage ``dape``: a degradation-aware CLIP (SeeSR's DAPE idea, with CLIP instead of RAM).

A LoRA on the CLIP image tower is trained so that its embedding of a *degraded* image matches
what the frozen original CLIP sees in the *clean* image: the squared distance between the unit
embeddings plus the KL between their zero-shot tag distributions. Prompts and semantic
guidance computed from LR inputs then describe the scene rather than the damage. The adapters
are merged and the result is written with ``vpdsr.semantics.save_clip``, so it loads wherever a
CLIP file is accepted.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import LoraConfig, inject_adapter_in_model

from vpdsr.lora import default_lora_targets, merge_lora
from vpdsr.semantics import SemanticModel, clip_preprocess, load_clip, load_tags, save_clip

from ..config import TrainConfig
from ..config_loading import ConfigError
from ..images import bicubic_up
from .base import Stage, ValBatch

__all__ = ["DapeStage"]

# MLP layers of OpenCLIP's ViT blocks. nn.MultiheadAttention reads its out_proj weight directly,
# bypassing any wrapper, so attention projections cannot carry a LoRA this way.
_TARGET_SUFFIXES = ("mlp.c_fc", "mlp.c_proj")


class DapeStage(Stage):
    def __init__(self, cfg: TrainConfig, accelerator: Accelerator) -> None:
        super().__init__(cfg, accelerator)
        if not cfg.clip.path:
            raise ConfigError(
                "the dape stage fine-tunes a real CLIP: set clip.path to a local CLIP checkpoint, or to an image "
                "tower with its text tower in clip.text_path"
            )
        clip, spec = load_clip(cfg.clip.path, cfg.clip.config, text_path=cfg.clip.text_path)
        tags = load_tags(cfg.clip.tags) if cfg.clip.tags else None
        self.judge = SemanticModel(copy.deepcopy(clip), spec, tags=tags).to(self.device)
        self.spec = spec
        clip.requires_grad_(False)
        targets = list(default_lora_targets(clip.visual, _TARGET_SUFFIXES))
        if not targets:
            raise ConfigError(
                f"the CLIP image tower of {cfg.clip.path} has no MLP layers named {_TARGET_SUFFIXES} to adapt"
            )
        rank = cfg.dape.lora_rank
        lora = LoraConfig(
            r=rank, lora_alpha=cfg.dape.lora_alpha or rank, init_lora_weights="gaussian", target_modules=targets
        )
        torch.manual_seed(cfg.seed)
        inject_adapter_in_model(lora, clip.visual, adapter_name="dape")
        self.clip = clip.to(self.device)
        self.visual = clip.visual
        trainable = {n: p for n, p in clip.visual.named_parameters() if p.requires_grad}
        self.saved_modules = {"visual": clip.visual}
        self.add_optimizer("clip", list(trainable.values()), cfg.optim.lr, main=True)
        self.enable_ema(trainable, "clip")
        self.prepare_in_place(self.clip, "visual")

    def train(self, mode: bool = True) -> None:
        self.clip.train(mode)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        pixels = clip_preprocess(images, self.spec.image_size, self.spec.mean, self.spec.std)
        return F.normalize(self.clip.encode_image(pixels).float(), dim=-1)

    def _tag_log_probs(self, embeddings: torch.Tensor) -> torch.Tensor:
        return (self.judge.logit_scale * embeddings @ self.judge.tag_embeddings().T).log_softmax(dim=-1)

    def _losses(self, hr: torch.Tensor, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            target = self.judge.encode_images(hr)
            target_log_probs = self._tag_log_probs(target)
        emb = self._embed(bicubic_up(lr, hr.shape[-2:]))
        distance = (emb - target).pow(2).sum(dim=-1).mean()
        kl = F.kl_div(self._tag_log_probs(emb), target_log_probs, log_target=True, reduction="batchmean")
        return distance, kl, (emb * target).sum(dim=-1)

    def train_step(self, batch: dict[str, torch.Tensor], step: int, generator: torch.Generator) -> dict[str, float]:
        self.train(True)
        distance, kl, _ = self._losses(batch["hr"], batch["lr"])
        loss = self.cfg.dape.embed_weight * distance + self.cfg.dape.kl_weight * kl
        return {"embed": float(distance.detach()), "kl": float(kl.detach()), "loss": self.optimize("clip", loss)}

    @torch.no_grad()
    def validate(self, batches: list[ValBatch], step: int) -> tuple[dict[str, float], list[list[torch.Tensor]]]:
        """Cosine between LR and clean-HR embeddings, for the adapted and for the original CLIP."""
        self.train(False)
        adapted, original = [], []
        with self.ema.applied() if self.ema is not None else nullcontext():
            for batch in batches:
                hr, lr = batch["hr"].to(self.device), batch["lr"].to(self.device)
                adapted.append(self._losses(hr, lr)[2])
                original.append(
                    (self.judge.encode_images(bicubic_up(lr, hr.shape[-2:])) * self.judge.encode_images(hr)).sum(-1)
                )
        return {"cos_adapted": float(torch.cat(adapted).mean()), "cos_original": float(torch.cat(original).mean())}, []

    def export(self, out_dir: Path) -> Path:
        self.unwrap_in_place(self.clip, "visual")
        if self.ema is not None:
            self.ema.copy_to_params()
        merge_lora(self.clip.visual)
        path = out_dir / f"{self.cfg.name}.safetensors"
        save_clip(path, self.clip, self.spec, info=self.training_info(self.cfg.optim.steps))
        return path
