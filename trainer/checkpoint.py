"""Resumable checkpoints: weights, optimizers, schedulers, EMA, RNG states and the step.

Layout of ``<output_dir>/checkpoints/step-00001234/``::

    weights.safetensors   trainable parameters and buffers of every trained module ("name/key")
    ema.safetensors       the EMA weights, when EMA is on
    optim.pt              optimizer, scheduler and grad-scaler states (read with weights_only=True)
    rng.safetensors       torch CPU (and CUDA) generator states
    state.json            step, counters, python/numpy RNG states, the config of the run

A checkpoint is written into ``step-XXXXXXXX.partial`` and renamed when complete, so a crash
while saving never leaves something that looks like a checkpoint but is not. Data order needs
no state: it is a function of the step (see ``batches``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config_loading import ConfigError

__all__ = ["CheckpointState", "find_latest", "load_checkpoint", "prune_checkpoints", "save_checkpoint", "trained_keys"]

PREFIX = "step-"
PARTIAL = ".partial"


class CheckpointState:
    """What the loop hands to save/load: modules (with the keys to keep) and optimizer-like states."""

    def __init__(self, modules: dict[str, nn.Module], keys: dict[str, list[str]], stateful: dict[str, Any],
                 ema: Any = None) -> None:  # fmt: skip
        self.modules, self.keys, self.stateful, self.ema = modules, keys, stateful, ema


def trained_keys(module: nn.Module) -> list[str]:
    """State-dict keys that training changes: trainable parameters and all buffers.

    Frozen base weights (an SD UNet under LoRA) are left out, so checkpoints stay small; they
    are rebuilt from the same source when the run is resumed.
    """
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    names |= {n for n, _ in module.named_buffers()}
    return sorted(k for k in module.state_dict() if k in names)


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, mt, gauss = plain["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(root: Path, step: int, state: CheckpointState, extra: dict[str, Any]) -> Path:
    """Write the checkpoint for ``step`` completed steps atomically; returns its folder."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / (final.name + PARTIAL)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights = {}
    for name, module in state.modules.items():
        sd = module.state_dict()
        weights.update({f"{name}/{k}": sd[k].detach().to("cpu").contiguous() for k in state.keys[name]})
    save_file(weights, str(tmp / "weights.safetensors"))
    if state.ema is not None:
        save_file(
            {k: v.to("cpu").contiguous() for k, v in state.ema.state_dict().items()}, str(tmp / "ema.safetensors")
        )
    torch.save({name: obj.state_dict() for name, obj in state.stateful.items()}, tmp / "optim.pt")
    rng_tensors, rng_plain = _rng_state()
    save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "rng": rng_plain, **extra}), encoding="utf-8")
    if final.exists():  # the same step saved again after a resume: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_checkpoint(path: Path, state: CheckpointState, device: torch.device) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote; returns the contents of ``state.json``."""
    if path.name.endswith(PARTIAL) or not (path / "state.json").is_file():
        raise ConfigError(f"{path} is not a complete checkpoint folder")
    weights = load_file(str(path / "weights.safetensors"))
    for name, module in state.modules.items():
        prefix = name + "/"
        own = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        if sorted(own) != state.keys[name]:
            missing = sorted(set(state.keys[name]) - set(own))
            extra = sorted(set(own) - set(state.keys[name]))
            raise ConfigError(
                f"{path} does not fit this run's {name!r} (missing {missing[:3]}, unexpected {extra[:3]}); "
                "was it written with another config?"
            )
        module.load_state_dict(own, strict=False)
    if state.ema is not None:
        ema_file = path / "ema.safetensors"
        if not ema_file.is_file():
            raise ConfigError(f"{path} has no EMA weights but this run uses EMA (optim.ema_decay > 0)")
        state.ema.load_state_dict({k: v.to(device) for k, v in load_file(str(ema_file)).items()})
    saved = torch.load(path / "optim.pt", map_location=device, weights_only=True)
    for name, obj in state.stateful.items():
        if name not in saved:
            raise ConfigError(f"{path} has no state for {name!r}; was it written with another config?")
        obj.load_state_dict(saved[name])
    info = json.loads((path / "state.json").read_text(encoding="utf-8"))
    _set_rng_state(load_file(str(path / "rng.safetensors")), info["rng"])
    return info


def find_latest(root: Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root``, if any."""
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and not p.name.endswith(PARTIAL)]
    done = [p for p in done if (p / "state.json").is_file()]
    return max(done, key=lambda p: int(p.name[len(PREFIX) :]), default=None)


def prune_checkpoints(root: Path, keep: int) -> None:
    done = sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and not p.name.endswith(PARTIAL)),
        key=lambda p: int(p.name[len(PREFIX) :]),
    )
    for old in done[:-keep]:
        shutil.rmtree(old)
