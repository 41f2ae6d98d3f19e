"""The teacher file: an LR-conditioned diffusion SR model as one ``.safetensors`` with JSON metadata.

Written by the teacher stage, read by the student stage (initial weights, regression targets,
the prior of VSD/DiffLoss). Like our student files it holds the full backbone config, so it
stays loadable when the bundled configs change, and safetensors cannot carry code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file

from vpdsr.backbones import backbone_config
from vpdsr.errors import ModelFileError
from vpdsr.paths import check_model_file

from .diffusion import LatentDiffusion

__all__ = ["TEACHER_FORMAT", "load_teacher", "save_teacher"]

TEACHER_FORMAT = "vpdsr-teacher"
TEACHER_FORMAT_VERSION = 1


def save_teacher(
    path: str | Path, model: LatentDiffusion, *, sampling_steps: int, training_info: dict[str, Any]
) -> Path:
    """Write the teacher next to ``path`` and rename it into place (never a truncated file)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"teacher files are .safetensors, got {path.name!r}")
    meta = {
        "format": TEACHER_FORMAT,
        "format_version": TEACHER_FORMAT_VERSION,
        "backbone": model.config.to_dict(),
        "unet": dict(model.unet.config),
        "lr_conditioned": model.lr_conditioned,
        "sampling_steps": int(sampling_steps),
        "training": training_info,
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata={"vpdsr_teacher": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def load_teacher(path: str | Path) -> tuple[LatentDiffusion, dict[str, Any]]:
    """The teacher model (CPU, float32, eval) and its metadata (sampling steps, training info)."""
    path = Path(path)
    check_model_file(path, "teacher file", "train one with a stage: teacher config")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle is not iterable)
    except Exception as err:  # safetensors raises its own error types for every kind of damage
        raise ModelFileError(f"{path.name}: not a readable safetensors file ({err})") from None
    try:
        meta = json.loads(header["vpdsr_teacher"])
    except (KeyError, json.JSONDecodeError):
        raise ModelFileError(f"{path.name} is not a vpdsr teacher file (no valid 'vpdsr_teacher' metadata)") from None
    if meta.get("format") != TEACHER_FORMAT or int(meta.get("format_version", 0)) > TEACHER_FORMAT_VERSION:
        raise ModelFileError(
            f"{path.name}: unsupported teacher format {meta.get('format')!r} v{meta.get('format_version')}"
        )
    config = backbone_config(meta["backbone"])
    unet_config = {k: v for k, v in meta["unet"].items() if not k.startswith("_")}
    model = LatentDiffusion(
        AutoencoderKL(**config.vae),
        UNet2DConditionModel(**unet_config),
        config,
        lr_conditioned=bool(meta["lr_conditioned"]),
        cond=tensors["cond"],
        uncond=tensors["uncond"],
    )
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ModelFileError(
            f"{path.name}: weights do not fit its own config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval().requires_grad_(False), meta
