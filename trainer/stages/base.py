"""What every stage shares: optimizers through accelerate, the NaN guard, EMA and validation data.

A stage owns its models, losses and optimizers and implements ``train_step``, ``validate`` and
``export``; the loop (``trainer.loop``) owns data, checkpoints, logging and the step count.

Multi-GPU: trainable sub-modules are handed to ``accelerator.prepare`` *in place* (the parent's
attribute is replaced by the wrapped module) because the students call their UNet and VAE
encoder through methods such as ``OneStepStudent.denoise``; DDP only synchronises gradients of
calls that go through the wrapper's ``forward``. Checkpoints and exports always use the
unwrapped modules, so their keys do not depend on the number of processes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from vpdsr.backbones import BackboneConfig
from vpdsr.errors import DownloadNotAllowed, MissingBaseError

from ..config import TrainConfig
from ..config_loading import ConfigError
from ..ema import EMA

__all__ = [
    "NonFiniteLoss",
    "Stage",
    "ValBatch",
    "load_base_weights",
    "portable_paths",
    "prompt_embedding",
]

ValBatch = dict[str, torch.Tensor]


class NonFiniteLoss(RuntimeError):
    """A loss or gradient norm was NaN/inf: the step is skipped (see ``optim.max_bad_steps``)."""


def load_base_weights(config: BackboneConfig, path: str | None, option: str) -> Any:
    """The user's base weights (VAE, UNet, text encoder) for SD-family backbones; never downloaded.

    The core says what is missing; the trainer adds the config key that sets it (``option``, e.g.
    ``student.base``), as each front-end words the core's errors in its own settings.
    """
    from vpdsr.weights import load_base

    hints = {MissingBaseError: f"set {option} to one", DownloadNotAllowed: f"{option}: the trainer downloads nothing"}
    try:
        return load_base(config, path, allow_download=False)
    except (MissingBaseError, DownloadNotAllowed) as err:
        raise ConfigError(str(err.worded(hints))) from None


def prompt_embedding(config: BackboneConfig, text_encoder: Any, prompt: str) -> torch.Tensor:
    """(tokens, dim) conditioning: zeros for backbones without a text encoder (tiny)."""
    if text_encoder is None:
        if prompt:
            raise ConfigError(
                f"the {config.name} backbone has no text encoder, so it cannot take a prompt ({prompt!r})"
            )
        return torch.zeros(config.prompt_embed_shape)
    with torch.no_grad():
        return text_encoder(prompt)[0].float().cpu()


_TEXT_OPTIONS = frozenset({"prompt", "negative_prompt"})
"""Free text that may start with a slash without being a path."""


def portable_paths(value: Any, run_dir: Path, key: str = "") -> Any:
    """``value`` (JSON-like) with every absolute path made relative to the run folder when it lies
    inside it, else cut to its last part (a data folder's or weight file's name).

    Training info goes into model files that are shared; absolute paths would publish the
    training machine's user and folder names. Relative paths are kept as given.
    """
    if isinstance(value, dict):
        return {k: portable_paths(v, run_dir, k) for k, v in value.items()}
    if isinstance(value, list):
        return [portable_paths(v, run_dir, key) for v in value]
    if not isinstance(value, str) or key in _TEXT_OPTIONS or not Path(value).is_absolute():
        return value
    path, run = Path(value).resolve(), run_dir.resolve()
    return path.relative_to(run).as_posix() if run in path.parents else path.name


def _lr_lambda(warmup: int, total: int, schedule: str):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


class Stage:
    """Base class; subclasses build their models in ``__init__`` using the helpers here."""

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator) -> None:
        self.cfg = cfg
        self.acc = accelerator
        self.device = accelerator.device
        self.saved_modules: dict[str, nn.Module] = {}
        """Unwrapped modules whose trainable parameters and buffers go into checkpoints."""
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {}
        self.ema: EMA | None = None
        self._ema_optimizer: str | None = None
        self._params: dict[str, list[nn.Parameter]] = {}

    # ------------------------------------------------------------------ set-up helpers

    def prepare_in_place(self, parent: nn.Module, attr: str) -> nn.Module:
        """Replace ``parent.<attr>`` by its accelerate-prepared form; returns the raw module."""
        raw = getattr(parent, attr)
        setattr(parent, attr, self.acc.prepare(raw))
        return raw

    def unwrap_in_place(self, parent: nn.Module, attr: str) -> None:
        setattr(parent, attr, self.acc.unwrap_model(getattr(parent, attr)))

    def add_optimizer(self, name: str, params: list[nn.Parameter], lr: float, *, main: bool = False,
                      total_steps: int | None = None) -> None:  # fmt: skip
        """AdamW over ``params``; the main optimizer gets the warm-up/cosine schedule and the EMA."""
        if not params:
            raise ConfigError(f"nothing to train for the {name!r} optimizer; check the config")
        o = self.cfg.optim
        optimizer = torch.optim.AdamW(params, lr=lr, betas=o.betas, weight_decay=o.weight_decay)
        self.optimizers[name] = self.acc.prepare(optimizer)
        self._params[name] = params
        if main:
            total = total_steps if total_steps is not None else o.steps
            self.schedulers[name] = torch.optim.lr_scheduler.LambdaLR(
                self.optimizers[name], _lr_lambda(o.warmup_steps, total, o.lr_schedule)
            )

    def enable_ema(self, named_params: dict[str, nn.Parameter], optimizer: str) -> None:
        """EMA of ``named_params``, updated after each step of ``optimizer`` (when optim.ema_decay > 0)."""
        if self.cfg.optim.ema_decay > 0:
            self.ema = EMA(named_params, self.cfg.optim.ema_decay)
            self._ema_optimizer = optimizer

    # ------------------------------------------------------------------ training helpers

    def optimize(self, name: str, loss: torch.Tensor) -> float:
        """Backward, clip, step one optimizer; raises NonFiniteLoss (nothing stepped) on NaN/inf."""
        value = float(loss.detach())
        bad = torch.tensor([0.0 if math.isfinite(value) else 1.0], device=self.device)
        if self.acc.gather(bad).sum() > 0:  # every process skips together, or DDP would hang
            raise NonFiniteLoss(f"{name} loss is {value}")
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        self.acc.backward(loss)
        clip = self.cfg.optim.grad_clip or math.inf
        norm = self.acc.clip_grad_norm_(self._params[name], clip)
        if self.cfg.optim.mixed_precision != "fp16" and norm is not None and not torch.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)  # fp16's scaler skips such steps itself
            raise NonFiniteLoss(f"{name} gradient norm is {float(norm)}")
        optimizer.step()
        if name in self.schedulers:
            self.schedulers[name].step()
        if self.ema is not None and name == self._ema_optimizer:
            self.ema.update()
        return value

    def zero_grad(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)

    def stateful(self) -> dict[str, Any]:
        """Optimizers, schedulers and the grad scaler: everything with a state_dict to checkpoint."""
        items: dict[str, Any] = {f"optimizer/{k}": v for k, v in self.optimizers.items()}
        items.update({f"scheduler/{k}": v for k, v in self.schedulers.items()})
        if self.acc.scaler is not None:
            items["grad_scaler"] = self.acc.scaler
        return items

    def train(self, mode: bool = True) -> None:
        """Put the trained modules in training (or eval) mode; frozen judges stay in eval."""
        raise NotImplementedError

    # ------------------------------------------------------------------ what stages implement

    def train_step(self, batch: dict[str, torch.Tensor], step: int, generator: torch.Generator) -> dict[str, float]:
        """One optimisation step on a batch with "hr" and "lr" in [0, 1]; returns values to log."""
        raise NotImplementedError

    def validate(self, batches: list[ValBatch], step: int) -> tuple[dict[str, float], list[list[torch.Tensor]]]:
        """Metrics and grid rows (lists of (3, H, W) images in [0, 1]) for the validation images."""
        raise NotImplementedError

    def export(self, out_dir: Path) -> Path:
        """Write the stage's product (teacher file, student file, CLIP file); returns its path."""
        raise NotImplementedError

    def training_info(self, step: int) -> dict[str, Any]:
        """What the exported file records about its training, with no absolute path in it (see
        ``portable_paths``): model files are shared, the training machine's folders are not."""
        info = {"stage": self.cfg.stage, "steps": step, "config": self.cfg.to_dict()}
        return portable_paths(info, Path(self.cfg.output_dir))
