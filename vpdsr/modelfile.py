"""Our model-file format: one ``.safetensors`` file per student, with JSON metadata.

Layout:
- tensors ``unet.*`` / ``vae.*`` hold either the full weights (``weights: "full"``, the tiny
  backbone) or only the LoRA parameters plus the few layers trained in full such as ``conv_in``
  (``weights: "lora"``, SD backbones, whose base weights the user supplies);
- ``prompt_embeds`` holds the stored conditioning when there is one;
- ``__metadata__["vpdsr"]`` is JSON: format name and version, backbone config, LoRA specs,
  timestep, scale, prompt text and free-form training info.

safetensors cannot carry code, so loading a file never runs anything from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .backbones import BackboneConfig, backbone_config, build_backbone
from .errors import ModelFileError
from .lora import LoraSpec, add_lora
from .model import OneStepStudent

__all__ = ["FORMAT", "FORMAT_VERSION", "StudentMeta", "load_student", "read_meta", "save_student", "write_model_file"]

FORMAT = "vpdsr-student"
FORMAT_VERSION = 1


@dataclass
class StudentMeta:
    backbone: BackboneConfig
    weights: str = "full"  # "full" or "lora"
    lora: list[LoraSpec] = field(default_factory=list)
    timestep: int = 999
    scale: int = 4
    prompt: str = ""
    has_prompt_embeds: bool = True  # False: compute it from ``prompt`` with the base's text encoder
    name: str = ""
    training: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "name": self.name,
                "backbone": self.backbone.to_dict(),
                "weights": self.weights,
                "lora": [s.to_dict() for s in self.lora],
                "timestep": self.timestep,
                "scale": self.scale,
                "prompt": self.prompt,
                "has_prompt_embeds": self.has_prompt_embeds,
                "training": self.training,
            }
        )

    @classmethod
    def from_json(cls, text: str, source: str) -> StudentMeta:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ModelFileError(f"{source}: the vpdsr metadata is not valid JSON ({err})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ModelFileError(f"{source}: not a vpdsr student file (metadata format is {data.get('format')!r})")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ModelFileError(
                f"{source}: format version {version!r} is newer than this vpdsr understands ({FORMAT_VERSION}); upgrade vpdsr"
            )
        try:
            meta = cls(
                backbone=backbone_config(data["backbone"]),
                weights=str(data.get("weights", "full")),
                lora=[LoraSpec.from_dict(s) for s in data.get("lora", [])],
                timestep=int(data.get("timestep", 999)),
                scale=int(data.get("scale", 4)),
                prompt=str(data.get("prompt", "")),
                has_prompt_embeds=bool(data.get("has_prompt_embeds", True)),
                name=str(data.get("name", "")),
                training=dict(data.get("training", {})),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFileError(f"{source}: invalid vpdsr metadata ({err})") from None
        if meta.weights not in ("full", "lora"):
            raise ModelFileError(f"{source}: weights must be 'full' or 'lora', got {meta.weights!r}")
        if meta.weights == "lora" and not meta.lora:
            raise ModelFileError(f"{source}: a LoRA model file lists no LoRA adapters")
        return meta


def _open(path: Path):
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    if path.suffix.lower() != ".safetensors":
        raise ModelFileError(f"{path.name}: vpdsr model files are .safetensors (for OSEDiff .pkl files use `vpdsr convert-osediff`)")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types for truncated/garbled headers
        raise ModelFileError(f"{path.name}: not a readable safetensors file ({err})") from None


def read_meta(path: str | Path) -> StudentMeta:
    """Metadata only, without reading any tensor: what ``vpdsr info`` shows."""
    path = Path(path)
    with _open(path) as f:
        header = f.metadata() or {}
    if "vpdsr" not in header:
        raise ModelFileError(f"{path.name}: a safetensors file, but not a vpdsr model (no 'vpdsr' metadata)")
    return StudentMeta.from_json(header["vpdsr"], path.name)


def _trained_state(student: OneStepStudent, weights: str) -> dict[str, torch.Tensor]:
    state = {}
    for part in ("unet", "vae"):
        for name, tensor in getattr(student, part).state_dict().items():
            if weights == "full" and "lora_" not in name:
                state[f"{part}.{name}"] = tensor
            elif weights == "lora" and ("lora_" in name or name.startswith("conv_in.")):
                state[f"{part}.{name}"] = tensor
    return state


def save_student(
    path: str | Path,
    student: OneStepStudent,
    *,
    weights: str = "full",
    lora: list[LoraSpec] | None = None,
    scale: int = 4,
    prompt: str = "",
    has_prompt_embeds: bool = True,
    name: str = "",
    training_info: dict[str, Any] | None = None,
) -> Path:
    """Write a student; ``weights="full"`` expects merged (adapter-free) parts."""
    path = Path(path)
    meta = StudentMeta(
        backbone=student.config,
        weights=weights,
        lora=list(lora or []),
        timestep=student.timestep,
        scale=scale,
        prompt=prompt,
        has_prompt_embeds=has_prompt_embeds,
        name=name or path.stem,
        training=dict(training_info or {}),
    )
    if weights == "full" and any("lora_" in n for n, _ in student.named_parameters()):
        raise ValueError("merge the LoRA adapters (vpdsr.lora.merge_lora) before saving full weights")
    tensors = _trained_state(student, weights)
    tensors["prompt_embeds"] = student.prompt_embeds.float()
    return write_model_file(path, meta, tensors)


def write_model_file(path: str | Path, meta: StudentMeta, tensors: dict[str, torch.Tensor]) -> Path:
    """Write tensors and metadata as a model file; importers use it without building a student.

    The file is written next to its destination and renamed into place, so an interrupted save
    never leaves a truncated model where a good one was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata={"vpdsr": meta.to_json()})
    tmp.replace(path)
    return path


def _apply_state(student: OneStepStudent, tensors: dict[str, torch.Tensor], source: str, strict_full: bool) -> None:
    model_state = {f"{p}.{k}": v for p in ("unet", "vae") for k, v in getattr(student, p).state_dict().items()}
    unexpected = sorted(k for k in tensors if k not in model_state)
    if unexpected:
        raise ModelFileError(
            f"{source}: {len(unexpected)} weights do not fit the {student.config.name} backbone, e.g. {unexpected[:3]}"
        )
    bad_shapes = [
        f"{k} {tuple(v.shape)} != {tuple(model_state[k].shape)}" for k, v in tensors.items() if v.shape != model_state[k].shape
    ]
    if bad_shapes:
        raise ModelFileError(f"{source}: {len(bad_shapes)} weights have the wrong shape, e.g. {bad_shapes[:3]}")
    if strict_full:
        missing = sorted(k for k in model_state if k not in tensors and "lora_" not in k)
        if missing:
            raise ModelFileError(f"{source}: {len(missing)} weights are missing, e.g. {missing[:3]}")
    else:
        missing = sorted(k for k in model_state if "lora_" in k and k not in tensors)
        if missing:
            raise ModelFileError(f"{source}: {len(missing)} LoRA weights are missing, e.g. {missing[:3]}")
    for part in ("unet", "vae"):
        prefix = part + "."
        sub = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        getattr(student, part).load_state_dict(sub, strict=False)


def load_student(path: str | Path, base: Any = None) -> OneStepStudent:
    """Build the student a file describes, on the CPU in float32.

    ``base`` supplies backbone weights for LoRA files: an object with ``.vae`` and ``.unet``
    (see ``vpdsr.weights.load_base``). Full-weight files need none.
    """
    path = Path(path)
    meta = read_meta(path)
    with _open(path) as f:
        try:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:
            raise ModelFileError(f"{path.name}: the file is damaged, a tensor could not be read ({err})") from None
    prompt_embeds = tensors.pop("prompt_embeds", None)
    if meta.weights == "lora":
        if base is None:
            raise ModelFileError(
                f"{path.name} holds LoRA weights for the {meta.backbone.name} backbone and needs its base weights: "
                "pass --base with a diffusers folder or a single-file .safetensors checkpoint"
            )
        vae, unet = base.vae, base.unet
    else:
        parts = build_backbone(meta.backbone)
        vae, unet = parts.vae, parts.unet
    for spec in meta.lora:
        add_lora(unet if spec.part == "unet" else vae, spec)
    try:
        student = OneStepStudent(vae, unet, meta.backbone, timestep=meta.timestep, prompt_embeds=prompt_embeds)
    except ValueError as err:
        raise ModelFileError(f"{path.name}: {err}") from None
    _apply_state(student, tensors, path.name, strict_full=meta.weights == "full")
    return student.eval().requires_grad_(False)
