"""Our model-file format: one ``.safetensors`` file per student, with JSON metadata.

Layout:
- tensors ``unet.*`` / ``vae.*`` hold either the full weights (``weights: "full"``, the tiny
  backbone) or only the LoRA parameters plus the few layers trained in full such as ``conv_in``
  (``weights: "lora"``, SD backbones, whose base weights the user supplies);
- ``prompt_embeds`` holds the stored conditioning when there is one, and the family's extra
  conditioning sits beside it under its own names (SDXL: ``pooled_prompt_embeds``);
- the backbone config in the metadata names the backbone's family (``backbone.family``); files
  written before families existed have none and are ``sd2``;
- ``__metadata__["vpdsr"]`` is JSON: format name and version, backbone config, LoRA specs,
  timestep, scale, prompt text and free-form training info.

safetensors cannot carry code, so loading a file never runs anything from it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .backbones import Backbone, BackboneConfig, backbone_config, backbone_family, build_backbone
from .color import RING_CLAMP, WAVELET_LEVELS, check_ring_clamp, check_wavelet_levels
from .errors import MissingBaseError, ModelFileError, NonFiniteWeights
from .lora import LoraSpec, add_lora
from .model import OneStepStudent
from .paths import check_model_file, private_temp_path

__all__ = ["FORMAT", "FORMAT_VERSION", "RESIZES", "Preprocess", "StudentMeta", "load_student", "read_meta",
           "save_student", "write_model_file"]  # fmt: skip

FORMAT = "vpdsr-student"
FORMAT_VERSION = 1
RESIZES = ("torch-bicubic", "pil-bicubic-uint8")

# Bounds on what a file can make the loader do before its weights are known to fit its metadata.
# Real metadata is a few KB (a training config, a prompt); these are far above it and below
# safetensors' own 100 MB header limit.
MAX_META_CHARS = 64 * 2**20
MAX_META_DEPTH = 64  # JSON nesting; a training config nests 4 levels
MAX_MODULES = 10_000  # modules in one backbone; SD 2.1's UNet and VAE have 950
MAX_PLACEHOLDER_VALUES = 2**22  # an unstored prompt embedding's zeros; SD's is 77 x 1024


@dataclass(frozen=True)
class Preprocess:
    """How an LR image becomes the network's input. The model file records it because it belongs to
    the model: a student reproduces its makers' results only on inputs prepared their way.

    ``resize``: ``"torch-bicubic"`` (torch's bicubic on floats, vpdsr's own students) or
    ``"pil-bicubic-uint8"`` (PIL's BICUBIC on the 8-bit image, what OSEDiff's test script feeds).
    ``pad_multiple``: sides are padded up to a multiple of this many pixels (a multiple of the VAE
    factor; diffusers' UNet takes latents of any size); None keeps vpdsr's default, the VAE factor
    times the UNet's downsampling.
    """

    resize: str = "torch-bicubic"
    pad_multiple: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], vae_factor: int, source: str) -> Preprocess:
        """Checked here, so a bad value fails when the file is read rather than mid-upscale."""
        pre = cls(resize=data.get("resize", cls.resize), pad_multiple=data.get("pad_multiple"))
        if pre.resize not in RESIZES:
            raise ModelFileError(f"{source}: preprocess.resize must be one of {RESIZES}, got {pre.resize!r}")
        m = pre.pad_multiple
        if m is not None and (type(m) is not int or m < 1 or m % vae_factor):
            raise ModelFileError(
                f"{source}: preprocess.pad_multiple must be a multiple of the VAE factor {vae_factor}, got {m!r}"
            )
        return pre


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
    preprocess: Preprocess = field(default_factory=Preprocess)
    # The wavelet colour fix keeps the student's finest ``wavelet_levels`` bands and takes the rest from
    # the bicubic input. A model whose latent loses mid-frequency structure the LR still holds (the tiny
    # VAE) does better with fewer; files written before this field have 5, the usual (StableSR's) value.
    wavelet_levels: int = WAVELET_LEVELS
    # Where the wavelet fix's anti-ringing clamp takes its range (vpdsr.color.RING_CLAMPS): "joint" keeps
    # texture a generative student draws; "input" suits a student that only sharpens. Older files: "joint".
    ring_clamp: str = RING_CLAMP

    @property
    def size_multiple(self) -> int:
        """Pixel sizes are padded up to a multiple of this: ``preprocess.pad_multiple`` (8 for OSEDiff,
        whose script feeds multiples of 8), else the VAE factor times the UNet's own downsampling. The
        VAE needs only its factor: diffusers' UNet, and ``vpdsr.layerwise`` with it, resize each
        upsampling to its skip connection's size, so latents of any size run. From the metadata alone,
        so a front-end can size a request before any model loads."""
        if self.preprocess.pad_multiple:
            return self.preprocess.pad_multiple
        return self.backbone.vae_factor * 2 ** (len(self.backbone.unet["block_out_channels"]) - 1)

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
                "preprocess": {"resize": self.preprocess.resize, "pad_multiple": self.preprocess.pad_multiple},
                "wavelet_levels": self.wavelet_levels,
                "ring_clamp": self.ring_clamp,
            }
        )

    @classmethod
    def from_json(cls, text: str, source: str) -> StudentMeta:
        if len(text) > MAX_META_CHARS:
            raise ModelFileError(
                f"{source}: the vpdsr metadata is {len(text) / 1e6:.0f} MB, above the limit of "
                f"{MAX_META_CHARS / 1e6:.0f} MB; it is not a model file vpdsr wrote"
            )
        too_deep = ModelFileError(f"{source}: the vpdsr metadata nests more than {MAX_META_DEPTH} levels deep")
        try:
            data = json.loads(text)  # far deeper than the limit ends in json's own RecursionError
        except json.JSONDecodeError as err:
            raise ModelFileError(f"{source}: the vpdsr metadata is not valid JSON ({err})") from None
        except RecursionError:
            raise too_deep from None
        if _depth(data, MAX_META_DEPTH) > MAX_META_DEPTH:
            raise too_deep
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ModelFileError(f"{source}: not a vpdsr student file (metadata format is {found!r})")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ModelFileError(
                f"{source}: format version {version!r} is newer than this vpdsr understands ({FORMAT_VERSION}); "
                "upgrade vpdsr"
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
                wavelet_levels=data.get("wavelet_levels", WAVELET_LEVELS),
                ring_clamp=data.get("ring_clamp", RING_CLAMP),
            )
            meta.preprocess = Preprocess.from_dict(dict(data.get("preprocess", {})), meta.backbone.vae_factor, source)
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFileError(f"{source}: invalid vpdsr metadata ({err})") from None
        try:
            check_wavelet_levels(meta.wavelet_levels)
            check_ring_clamp(meta.ring_clamp)
        except ValueError as err:
            raise ModelFileError(f"{source}: {err}") from None
        if meta.weights not in ("full", "lora"):
            raise ModelFileError(f"{source}: weights must be 'full' or 'lora', got {meta.weights!r}")
        if meta.weights == "lora" and not meta.lora:
            raise ModelFileError(f"{source}: a LoRA model file lists no LoRA adapters")
        return meta


def _depth(value: Any, limit: int, level: int = 1) -> int:
    """How deeply parsed JSON nests, counted no further than ``limit`` + 1."""
    if level > limit or not isinstance(value, (dict, list)):
        return level
    children = value.values() if isinstance(value, dict) else value
    return max((_depth(child, limit, level + 1) for child in children), default=level)


def _open(path: Path):
    check_model_file(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelFileError(
            f"{path.name}: vpdsr model files are .safetensors (for OSEDiff .pkl files use `vpdsr convert-osediff`)"
        )
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
    wavelet_levels: int = WAVELET_LEVELS,
    ring_clamp: str = RING_CLAMP,
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
        wavelet_levels=wavelet_levels,
        ring_clamp=ring_clamp,
    )
    if weights == "full" and any("lora_" in n for n, _ in student.named_parameters()):
        raise ValueError("merge the LoRA adapters (vpdsr.lora.merge_lora) before saving full weights")
    tensors = _trained_state(student, weights)
    tensors.update({k: v.float() for k, v in student.stored_conditioning().items()})
    return write_model_file(path, meta, tensors)


def write_model_file(path: str | Path, meta: StudentMeta, tensors: dict[str, torch.Tensor]) -> Path:
    """Write tensors and metadata as a model file; importers use it without building a student.

    The file is written next to its destination under a name of this writer's own and renamed into
    place, so an interrupted save never leaves a truncated model where a good one was, and two
    processes exporting to one path do not take each other's half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_temp_path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    tmp.touch()  # a file made the usual way has the mode the user's umask gives; safetensors' own is 0600,
    mode = tmp.stat().st_mode  # which left trained models unreadable to the rest of a shared machine
    try:
        save_file(tensors, str(tmp), metadata={"vpdsr": meta.to_json()})
        tmp.chmod(mode)
        tmp.replace(path)
    except BaseException:  # a full disk, Ctrl-C: no partial file is left to hold the space
        with suppress(OSError):  # a failed clean-up must not hide why the write failed
            tmp.unlink(missing_ok=True)
        raise
    return path


def _count(n: int) -> str:
    """A weight count as people read it: 2.4 million, 25.6 billion."""
    for size, word in ((1e9, "billion"), (1e6, "million"), (1e3, "thousand")):
        if n >= size:
            return f"{n / size:.1f} {word}"
    return str(n)


@contextmanager
def _module_budget(limit: int, source: str) -> Iterator[None]:
    """Stop building once more than ``limit`` modules are made: even on the meta device each one is
    a Python object, and a config asking for a million layers would take hours and gigabytes."""
    made = 0

    def count(module: torch.nn.Module, name: str, submodule: torch.nn.Module | None) -> None:
        nonlocal made
        made += 1
        if made > limit:
            raise ModelFileError(f"{source}: its backbone config describes more than {limit} layers")

    handle = torch.nn.modules.module.register_module_module_registration_hook(count)
    try:
        yield
    finally:
        handle.remove()


def _meta_parts(meta: StudentMeta, source: str) -> Backbone:
    """The UNet and VAE the metadata describes, adapters included, on the meta device: shapes
    without any memory behind them."""
    try:
        with _module_budget(MAX_MODULES, source):
            parts = build_backbone(meta.backbone, device="meta")
            with torch.device("meta"):
                for spec in meta.lora:
                    add_lora(parts.unet if spec.part == "unet" else parts.vae, spec)
            return parts
    except ModelFileError:
        raise
    except Exception as err:  # diffusers and peft refuse a bad config with many error types
        raise ModelFileError(f"{source}: its backbone config cannot be built ({type(err).__name__}: {err})") from None


def _check_fit(meta: StudentMeta, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Refuse, before any network is built, a file whose tensors are not the ones its metadata implies.

    The metadata decides what gets built, so without this a small file describing a giant UNet
    allocates it (9 GB and more) before its weights are ever compared. The student is built on the
    meta device instead; its names, shapes and weight count are compared with the file's index.
    """
    parts = _meta_parts(meta, source)
    model = {f"{p}.{k}": tuple(v.shape) for p in ("unet", "vae") for k, v in getattr(parts, p).state_dict().items()}
    if meta.weights == "full":
        required, optional = {k: v for k, v in model.items() if "lora_" not in k}, {}
    else:  # the LoRA weights, and the layers trained in full that such files may carry
        required = {k: v for k, v in model.items() if "lora_" in k}
        optional = {k: v for k, v in model.items() if k.startswith("unet.conv_in.")}
    conditioning = {"prompt_embeds", *backbone_family(meta.backbone).extra_embeds()}  # the student checks these
    held = {k: v for k, v in shapes.items() if k not in conditioning}
    unexpected = sorted(k for k in held if k not in model)
    bad_shapes = [f"{k} {held[k]} != {model[k]}" for k in held if k in model and held[k] != model[k]]
    missing = sorted(k for k in required if k not in held)
    problem = ""
    if unexpected:
        problem = f"{len(unexpected)} weights do not fit the {meta.backbone.name} backbone, e.g. {unexpected[:3]}"
    elif bad_shapes:
        problem = f"{len(bad_shapes)} weights have the wrong shape, e.g. {bad_shapes[:3]}"
    elif missing:
        kind = "" if meta.weights == "full" else "LoRA "
        problem = f"{len(missing)} {kind}weights are missing, e.g. {missing[:3]}"
    if problem:
        implied = sum(math.prod(v) for v in required.values())
        implied += sum(math.prod(optional[k]) for k in held if k in optional)
        count = sum(math.prod(v) for v in held.values())
        if implied != count:
            problem = (
                f"its metadata describes a {meta.backbone.name} backbone with {_count(implied)} weights to store, "
                f"but the file holds {_count(count)}: {problem}"
            )
        raise ModelFileError(f"{source}: {problem}")
    if "prompt_embeds" not in shapes and math.prod(meta.backbone.prompt_embed_shape) > MAX_PLACEHOLDER_VALUES:
        raise ModelFileError(
            f"{source}: its prompt_embed_shape {tuple(meta.backbone.prompt_embed_shape)} is too large for an "
            "embedding the file does not store"
        )


# safetensors' names of the floating-point types a student's weights may be stored in; each is
# cast to the pipeline's precision on load. An integer tensor cast like that is not a weight: it
# would be the quantized value without its scale, and every image would come out as noise.
_FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
_INTEGER_DTYPES = {f"{p}{b}": f"{n}{b}" for p, n in (("I", "int"), ("U", "uint")) for b in (8, 16, 32, 64)}


def _check_dtypes(dtypes: dict[str, str], source: str) -> None:
    """Refuse, from the file's index, tensors whose type is not floating point (int8, say)."""
    bad = sorted(k for k, dtype in dtypes.items() if dtype not in _FLOAT_DTYPES)
    if bad:
        names = ", ".join(sorted({_INTEGER_DTYPES.get(dtypes[k], dtypes[k].lower()) for k in bad}))
        raise ModelFileError(
            f"{source}: {len(bad)} tensors are stored as {names}, e.g. {bad[0]}; vpdsr weights are floating point "
            f"({', '.join(_FLOAT_DTYPES.values())}), and a quantized file cannot be read as one"
        )


def _read_tensors(f: Any, source: str) -> dict[str, torch.Tensor]:
    """Every tensor of an open file, each checked once for NaN and infinity.

    A single NaN weight makes every output black (NaN clamps to 0), and the run would still report
    success; the check costs a fraction of the read.
    """
    tensors = {}
    for key in f.keys():
        try:
            tensor = f.get_tensor(key)
        except Exception as err:  # safetensors' own error types
            raise ModelFileError(f"{source}: the file is damaged, a tensor could not be read ({err})") from None
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteWeights(
                f"{source}: {key} holds {bad} NaN or infinite values (of {tensor.numel()}); the file is damaged, "
                "or the training that wrote it diverged",
                tensor=key,
                count=bad,
            )
        tensors[key] = tensor
    return tensors


def load_student(path: str | Path, base: Any = None) -> OneStepStudent:
    """Build the student a file describes, on the CPU in float32.

    ``base`` supplies backbone weights for LoRA files: an object with ``.vae`` and ``.unet``
    (see ``vpdsr.weights.load_base``). Full-weight files need none. Nothing is built until the
    file's tensor index fits its metadata (``_check_fit``) and every weight is finite.
    """
    path = Path(path)
    meta = read_meta(path)
    if meta.weights == "lora" and base is None:
        raise MissingBaseError(
            f"{path.name} is a LoRA student for the {meta.backbone.name} backbone and needs its base weights: "
            "a diffusers folder or a single-file .safetensors checkpoint",
            backbone=meta.backbone.name,
            path=str(path),
        )
    with _open(path) as f:
        try:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as err:
            raise ModelFileError(f"{path.name}: the file is damaged, a tensor could not be read ({err})") from None
        _check_dtypes({k: f.get_slice(k).get_dtype() for k in f.keys()}, path.name)
        _check_fit(meta, shapes, path.name)
        tensors = _read_tensors(f, path.name)
    prompt_embeds = tensors.pop("prompt_embeds", None)
    extras = {k: tensors.pop(k) for k in backbone_family(meta.backbone).extra_embeds() if k in tensors}
    if meta.weights == "lora":
        vae, unet = base.vae, base.unet
    else:
        parts = build_backbone(meta.backbone)
        vae, unet = parts.vae, parts.unet
    for spec in meta.lora:
        add_lora(unet if spec.part == "unet" else vae, spec)
    try:
        student = OneStepStudent(vae, unet, meta.backbone, timestep=meta.timestep, prompt_embeds=prompt_embeds,
                                 extra_embeds=extras)  # fmt: skip
    except ValueError as err:
        raise ModelFileError(f"{path.name}: {err}") from None
    for part in ("unet", "vae"):
        prefix = part + "."
        sub = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        getattr(student, part).load_state_dict(sub, strict=False)
    return student.eval().requires_grad_(False)
