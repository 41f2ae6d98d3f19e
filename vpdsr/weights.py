"""Base weights for LoRA students: the SD UNet, VAE and text encoder, from files the user has.

A LoRA student file holds only what training changed, so at load time the backbone's own
weights come from one of:

- a diffusers folder (``unet/``, ``vae/``, optionally ``text_encoder/`` + ``tokenizer/``), read
  with ``local_files_only=True``;
- a single-file SD checkpoint (``.safetensors``, or ``.ckpt`` read with
  ``torch.load(weights_only=True)``), converted with diffusers' LDM conversion functions and the
  backbone's *bundled* configs: ``from_single_file`` would fetch configs from the hub;
- a Hugging Face repo id, but only when the caller explicitly allows downloading.

Every route checks the weights against the backbone config first, so an SD 1.5 or SDXL file given
for an SD 2 student fails with a sentence saying so rather than a wall of shape errors. What differs
between backbone families (the single-file key layout and how to recognise it, the text encoder)
is asked of the backbone's family (``vpdsr.backbones.family``).
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors import safe_open
from torch import nn

from .backbones import FAMILIES, BackboneConfig, BackboneFamily, backbone_config, backbone_family, detect_family
from .errors import DownloadNotAllowed, MissingBaseError, ModelFileError
from .paths import check_model_file

__all__ = ["SINGLE_FILE_SUFFIXES", "BaseWeights", "load_base", "load_torch_checkpoint"]

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

# Config entries that decide the weights' shapes or what the network computes; anything else
# (sample_size, version strings, ...) may differ between copies of the same model.
UNET_ESSENTIALS = (
    "in_channels", "out_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
    "down_block_types", "up_block_types", "mid_block_type", "attention_head_dim", "num_attention_heads",
    "use_linear_projection", "transformer_layers_per_block", "only_cross_attention", "class_embed_type",
    "addition_embed_type", "time_cond_proj_dim", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
)  # fmt: skip
VAE_ESSENTIALS = (
    "in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
    "down_block_types", "up_block_types", "norm_num_groups", "mid_block_add_attention", "scaling_factor",
)  # fmt: skip
# What a download fetches: the parts vpdsr uses, in safetensors, without the fp16/.bin duplicates.
HUB_PATTERNS = (
    "model_index.json", "scheduler/*.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
    "text_encoder/model.safetensors", "tokenizer/*",
)  # fmt: skip
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PARTS = {"unet": (UNet2DConditionModel, UNET_ESSENTIALS), "vae": (AutoencoderKL, VAE_ESSENTIALS)}
# what a checkpoint is called by its UNet's cross-attention width, from every family
_CHECKPOINT_KINDS = {width: kind for family in FAMILIES.values() for width, kind in family.checkpoint_kinds.items()}


@dataclass
class BaseWeights:
    """The backbone parts a LoRA student is applied to, on the CPU in float32.

    ``text_encoder`` maps a prompt to the UNet's conditioning, ``(1, tokens, dim)``; it is None
    when the source has none (or one vpdsr cannot use), which only matters for prompts.
    """

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: nn.Module | None
    source: str


def load_base(
    config: BackboneConfig | str | dict[str, Any], source: str | Path | None, allow_download: bool = False
) -> BaseWeights:
    """Load a backbone's weights from a diffusers folder, a single-file checkpoint or (if allowed) the hub.

    No ``source`` raises :class:`MissingBaseError` and an absent one :class:`DownloadNotAllowed`, so
    each caller (the trainer's YAML, a front-end) can name its own setting in the message.
    """
    config = backbone_config(config)
    if not source:
        raise MissingBaseError(
            f"the {config.name} backbone needs its base weights: a diffusers folder or a single-file .safetensors "
            "checkpoint",
            backbone=config.name,
        )
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(config, path, str(path))
    if path.is_file():
        return _load_single_file(config, path)
    if os.path.lexists(path):  # a pipe, a device, a dangling link: say what it is, not "not found"
        check_model_file(path, "base checkpoint")
    text = str(source)
    if not allow_download:
        raise DownloadNotAllowed(
            f"base weights not found: {text!r} is not an existing folder or file, and vpdsr downloads nothing unless "
            "asked: give a diffusers folder or a single-file .safetensors checkpoint, or allow downloads to fetch a "
            "Hugging Face repo such as stabilityai/stable-diffusion-2-1-base",
            source=text,
        )
    if not _REPO_ID.match(text):
        raise ModelFileError(
            f"base weights: {text!r} is neither an existing folder or file nor a Hugging Face repo id (owner/name)"
        )
    return _load_folder(config, _download(text), text)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=list(HUB_PATTERNS)))
    except Exception as err:  # network, auth, missing repo: all end the same way for the user
        raise ModelFileError(f"could not download {repo_id} from the Hugging Face hub ({err})") from None


# --- diffusers folders -------------------------------------------------------------------------


def _load_folder(config: BackboneConfig, folder: Path, source: str) -> BaseWeights:
    missing = [sub for sub in ("unet", "vae") if not (folder / sub / "config.json").is_file()]
    if missing:
        raise ModelFileError(
            f"{source}: not a diffusers model folder, it has no {' or '.join(f'{m}/config.json' for m in missing)} "
            "(expected the layout of e.g. stabilityai/stable-diffusion-2-1-base)"
        )
    # configs first: refusing a wrong model must not cost loading gigabytes of it
    for sub, (cls, keys) in _PARTS.items():
        theirs = _read_json(folder / sub / "config.json")
        _check_config(config, getattr(config, sub), theirs, cls, keys, f"{source}: its {sub}")
    _check_scheduler(config, folder, source)
    unet = _from_pretrained(UNet2DConditionModel, folder, "unet", source)
    vae = _from_pretrained(AutoencoderKL, folder, "vae", source)
    text_encoder = backbone_family(config).text_encoder_from_folder(folder)
    return BaseWeights(vae=vae, unet=unet, text_encoder=text_encoder, source=source)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{path}: not a readable config ({err})") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: not a model config (a JSON object was expected)")
    return data


def _normalise(value: Any) -> Any:
    return [_normalise(v) for v in value] if isinstance(value, (list, tuple)) else value


def _check_config(
    config: BackboneConfig, ours: dict, theirs: dict, cls: type, keys: tuple[str, ...], what: str
) -> None:
    defaults = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items() if p.default is not p.empty}
    expected, actual = {**defaults, **ours}, {**defaults, **theirs}
    wrong = [
        f"{k} is {actual.get(k)!r}, expected {expected.get(k)!r}"
        for k in keys
        if _normalise(actual.get(k)) != _normalise(expected.get(k))
    ]
    if wrong:
        hint = _family_hint(config, actual.get("cross_attention_dim"))
        raise ModelFileError(f"{what} does not match the {config.name} backbone{hint}: {'; '.join(wrong[:3])}")


def _family_hint(config: BackboneConfig, cross_attention_dim: Any) -> str:
    """Names the SD family a cross-attention width belongs to, when it is not the backbone's."""
    expected = config.unet.get("cross_attention_dim")
    if cross_attention_dim not in _CHECKPOINT_KINDS or cross_attention_dim == expected:
        return ""
    needed = _CHECKPOINT_KINDS.get(expected, "another family")
    return f" (it looks like {_CHECKPOINT_KINDS[cross_attention_dim]}; {config.name} needs {needed})"


def _check_scheduler(config: BackboneConfig, folder: Path, source: str) -> None:
    """Same shapes, other meaning: SD 2.1 (768 px) predicts v, SD 2.1-base predicts noise."""
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return
    theirs = _read_json(path).get("prediction_type", "epsilon")
    if theirs != config.prediction_type:
        raise ModelFileError(
            f"{source}: its scheduler uses {theirs} prediction, the {config.name} backbone uses "
            f"{config.prediction_type} (e.g. SD 2.1 at 768 px is a v-prediction model, SD 2.1-base is not)"
        )


def _from_pretrained(cls: type, folder: Path, sub: str, source: str) -> nn.Module:
    names = {p.name for p in (folder / sub).iterdir()}
    plain = {"diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"}
    variant = "fp16" if not names & plain and any(".fp16." in n for n in names) else None
    try:
        model = cls.from_pretrained(
            str(folder), subfolder=sub, local_files_only=True, variant=variant, torch_dtype=torch.float32
        )
    except Exception as err:  # diffusers raises OSError/ValueError/EnvironmentError for missing or bad files
        raise ModelFileError(f"{source}: could not load its {sub} ({err})") from None
    return model.float().eval()


# --- single-file checkpoints -------------------------------------------------------------------


def _load_single_file(config: BackboneConfig, path: Path) -> BaseWeights:
    suffix = path.suffix.lower()
    if suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelFileError(
            f"{path.name}: unsupported base checkpoint type {suffix!r}; use a single-file .safetensors (or .ckpt) "
            "Stable Diffusion checkpoint, or a diffusers folder"
        )
    family = backbone_family(config)
    prefixes = (family.unet_prefix, family.vae_prefix, family.text_prefix)
    state, keys = _read_safetensors(path, prefixes) if suffix == ".safetensors" else _read_ckpt(path)
    unet_state = {k: v for k, v in state.items() if k.startswith(family.unet_prefix)}
    vae_state = {k: v for k, v in state.items() if k.startswith(family.vae_prefix)}
    if not unet_state:
        raise ModelFileError(f"{path.name}: {_not_a_checkpoint(keys, family)}")
    if not vae_state:
        raise ModelFileError(
            f"{path.name}: this file holds no VAE weights (no '{family.vae_prefix}*' keys); use a full Stable "
            "Diffusion checkpoint or a diffusers folder"
        )
    _check_ldm_family(config, family, unet_state, keys, path.name)
    try:
        unet_sd = convert_ldm_unet_checkpoint(unet_state, config.unet)
        vae_sd = convert_ldm_vae_checkpoint(vae_state, config.vae)
    except (KeyError, IndexError, AttributeError, RuntimeError) as err:
        raise ModelFileError(
            f"{path.name}: its weights could not be converted for the {config.name} backbone ({err})"
        ) from None
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**config.unet), AutoencoderKL(**config.vae)
    _assign(unet, unet_sd, f"{path.name}: its UNet", config)
    _assign(vae, vae_sd, f"{path.name}: its VAE", config)
    cut = len(family.text_prefix)
    text_state = {k[cut:]: v for k, v in state.items() if k.startswith(family.text_prefix)}
    text_encoder = family.text_encoder_from_checkpoint(text_state, path.name)
    return BaseWeights(vae=vae.eval(), unet=unet.eval(), text_encoder=text_encoder, source=str(path))


def _read_safetensors(path: Path, prefixes: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors under ``prefixes`` (SD files also carry EMA copies, ...) and every key, for diagnosis."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            state = {k: f.get_tensor(k) for k in keys if k.startswith(prefixes)}
    except Exception as err:  # safetensors raises its own error types for truncated or garbled files
        raise ModelFileError(
            f"{path.name}: not a readable safetensors file, it may be damaged or incomplete ({err})"
        ) from None
    return state, keys


def _read_ckpt(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    data = load_torch_checkpoint(
        path, refusal="this .ckpt stores Python objects besides tensors; use the model's .safetensors release instead"
    )
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelFileError(
            f"{path.name}: not a Stable Diffusion checkpoint (it holds a {type(data).__name__}, not a state dict)"
        )
    state = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return state, list(state)


def load_torch_checkpoint(path: Path, refusal: str) -> Any:
    """``torch.load`` limited to tensors, containers and numbers; never runs code from the file.

    ``refusal`` says what to do instead when the file needs more than that to be unpickled.
    """
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "unsupported global" in str(err).lower():  # torch's refusal of a class, as opposed to a garbled file
            raise ModelFileError(
                f"{path.name}: {refusal} (vpdsr will not unpickle arbitrary objects: that could run code)"
            ) from None
        raise ModelFileError(f"{path.name}: not a readable checkpoint, it may be damaged ({err})") from None
    except Exception as err:  # truncated zip, not a torch file at all, ...
        raise ModelFileError(f"{path.name}: not a readable checkpoint, it may be damaged ({err})") from None


def _not_a_checkpoint(keys: list[str], family: BackboneFamily) -> str:
    if any("lora" in k.lower() for k in keys):
        return "this looks like a LoRA file, not a base model; base weights are a full Stable Diffusion checkpoint"
    if any(k.startswith(("conv_in.", "down_blocks.", "encoder.down_blocks.")) for k in keys):
        return (
            "this holds a single diffusers component (UNet or VAE), not a full checkpoint; pass the diffusers folder "
            "it came from (the one with unet/ and vae/)"
        )
    return (
        f"this file holds no UNet weights (no '{family.unet_prefix}*' keys), so it is not a Stable Diffusion "
        "checkpoint"
    )


def _check_ldm_family(
    config: BackboneConfig, family: BackboneFamily, unet_state: dict[str, torch.Tensor], keys: list[str], name: str
) -> None:
    """Name the model family before comparing hundreds of shapes: the usual mistake is SD 1.5 or SDXL."""
    needed = _CHECKPOINT_KINDS.get(config.unet.get("cross_attention_dim"), "another model family")
    found = detect_family(keys)
    if found is not None and found.name != family.name:
        raise ModelFileError(
            f"{name}: this is a checkpoint of the {found.checkpoint_name()} family; the {config.name} backbone "
            f"needs {needed}"
        )
    to_k = next((v for k, v in unet_state.items() if k.endswith("attn2.to_k.weight") and v.dim() == 2), None)
    if to_k is not None and to_k.shape[1] != config.unet.get("cross_attention_dim"):
        raise ModelFileError(
            f"{name}: its UNet cross-attends to {to_k.shape[1]}-wide text features, the {config.name} backbone to "
            f"{config.unet.get('cross_attention_dim')}{_family_hint(config, int(to_k.shape[1]))}"
        )


def _assign(model: nn.Module, state: dict[str, torch.Tensor], what: str, config: BackboneConfig) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"missing e.g. {missing[:3]}" if missing else f"unexpected e.g. {unexpected[:3]}"
        counts = f"{len(missing)} weights missing, {len(unexpected)} unexpected"
        raise ModelFileError(f"{what} does not fit the {config.name} backbone ({counts}; {detail})")
    bad = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise ModelFileError(f"{what} has another architecture than the {config.name} backbone, e.g. {bad[:2]}")
    # cast to float below, a quantized tensor would lose its scale and give noise, not an error
    integer = sorted(k for k, v in state.items() if not v.is_floating_point())
    if integer:
        kinds = ", ".join(sorted({str(state[k].dtype).removeprefix("torch.") for k in integer}))
        raise ModelFileError(
            f"{what} has {len(integer)} tensors stored as {kinds}, e.g. {integer[0]}; base weights are floating "
            "point, and a quantized checkpoint cannot be read as one"
        )
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
