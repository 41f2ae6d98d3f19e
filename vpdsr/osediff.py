"""Import released OSEDiff checkpoints (``osediff.pkl``) as vpdsr LoRA students.

OSEDiff (Wu et al., 2024, github.com/cswry/OSEDiff) fine-tunes SD 2.1-base with peft LoRA and
``torch.save``s one dict:

- ``rank_unet``, ``rank_vae``: the LoRA ranks;
- ``unet_lora_{encoder,decoder,others}_modules``, ``vae_lora_encoder_modules``: full layer names
  of its adapters ``default_encoder``, ``default_decoder``, ``default_others`` (UNet) and
  ``default_encoder`` (VAE);
- ``state_dict_unet``: the UNet's LoRA parameters and ``conv_in`` (named as peft names them after
  injection, so ``conv_in.base_layer.*`` because conv_in is itself an adapter target);
- ``state_dict_vae``: the VAE's LoRA parameters.

Its ``LoraConfig``s never set ``lora_alpha``, so peft's default of 8 applies and every adapter
scales by ``8 / rank``; that number is not in the file, so it is written into ours explicitly.

The imported file records OSEDiff's input preprocessing (``OSEDIFF_PREPROCESS``): its test script
resizes the 8-bit LR with PIL's BICUBIC (``Image.resize``'s default filter) and feeds sides that
are multiples of 8, so the pipeline does the same for this model, and for no other.

What stays different from OSEDiff's own inference: it samples the VAE posterior, vpdsr uses its
mean (deterministic output); it prompts each image with DAPE tags, an imported file keeps one
fixed prompt, embedded at load time with the base's text encoder. The README lists the rest.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbones import BackboneConfig, backbone_config, build_backbone
from .errors import ModelFileError
from .lora import LoraSpec, add_lora
from .modelfile import Preprocess, StudentMeta, write_model_file
from .paths import check_model_file
from .weights import load_torch_checkpoint

__all__ = [
    "OSEDIFF_LORA_ALPHA",
    "OSEDIFF_PREPROCESS",
    "OSEDIFF_TIMESTEP",
    "convert_osediff",
    "osediff_lora_specs",
    "osediff_lora_targets",
]

OSEDIFF_LORA_ALPHA = 8.0  # peft's LoraConfig default, which OSEDiff relies on
OSEDIFF_TIMESTEP = 999
OSEDIFF_SCALE = 4
# test_osediff.py: Image.resize(4x) with PIL's default BICUBIC, then sides brought to multiples of 8
OSEDIFF_PREPROCESS = Preprocess(resize="pil-bicubic-uint8", pad_multiple=8)
# checkpoint key holding each adapter's target list, per part and adapter name
ADAPTERS = {
    ("unet", "default_encoder"): "unet_lora_encoder_modules",
    ("unet", "default_decoder"): "unet_lora_decoder_modules",
    ("unet", "default_others"): "unet_lora_others_modules",
    ("vae", "default_encoder"): "vae_lora_encoder_modules",
}
RANK_KEYS = {"unet": "rank_unet", "vae": "rank_vae"}
STATE_KEYS = {"unet": "state_dict_unet", "vae": "state_dict_vae"}
# OSEDiff picks layers by *substring* of parameter names; "conv" alone already covers conv1,
# conv2, conv_in, conv_out, conv_shortcut and the down/upsamplers' conv.
_UNET_PATTERNS = ("conv", "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
_VAE_PATTERNS = ("conv", "to_q", "to_k", "to_v", "to_out.0")


def osediff_lora_targets(unet: nn.Module, vae: nn.Module) -> dict[str, list[str]]:
    """The layer lists OSEDiff's training puts its adapters on, keyed as in its checkpoints.

    UNet layers are split by position: down blocks and conv_in ("encoder"), up blocks and
    conv_out ("decoder"), the rest, i.e. the mid block ("others"). On the VAE only the encoder
    and ``quant_conv`` are adapted. Norms and biases are never targets. Call it on models without
    adapters.
    """
    lists: dict[str, list[str]] = {key: [] for key in ADAPTERS.values()}
    for name, _ in unet.named_parameters():
        if "bias" in name or "norm" in name or not any(p in name for p in _UNET_PATTERNS):
            continue
        if "down_blocks" in name or "conv_in" in name:
            key = "unet_lora_encoder_modules"
        elif "up_blocks" in name or "conv_out" in name:
            key = "unet_lora_decoder_modules"
        else:
            key = "unet_lora_others_modules"
        lists[key].append(name.replace(".weight", ""))
    for name, _ in vae.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        in_encoder = "encoder" in name and any(p in name for p in _VAE_PATTERNS)
        if in_encoder or ("quant_conv" in name and "post_quant_conv" not in name):
            lists["vae_lora_encoder_modules"].append(name.replace(".weight", ""))
    return lists


def osediff_lora_specs(checkpoint: dict[str, Any]) -> list[LoraSpec]:
    """Our adapter descriptions for an OSEDiff checkpoint dict (already validated)."""
    specs = []
    for (part, name), key in ADAPTERS.items():
        targets = tuple(dict.fromkeys(checkpoint[key]))  # OSEDiff's VAE lists repeat names
        rank = int(checkpoint[RANK_KEYS[part]])
        if targets:
            specs.append(LoraSpec(part=part, name=name, rank=rank, alpha=OSEDIFF_LORA_ALPHA, targets=targets))
    return specs


def convert_osediff(
    checkpoint: str | Path,
    output: str | Path,
    backbone: str | Path | dict[str, Any] | BackboneConfig = "sd21-base",
    prompt: str = "",
) -> Path:
    """Write an OSEDiff checkpoint as a vpdsr LoRA student file; returns the output path.

    ``backbone`` is a bundled name, a backbone JSON file, or a config (see ``backbone_config``).

    Nothing SD-sized is allocated: the names and shapes are checked against the backbone built on
    the meta device, and the file's own tensors are copied over unchanged.
    """
    src, out = Path(checkpoint), Path(output)
    if out.suffix.lower() != ".safetensors":
        raise ModelFileError(
            f"{out.name}: vpdsr model files are .safetensors; name the output e.g. osediff.safetensors"
        )
    data = _read_checkpoint(src)
    config = backbone_config(backbone)
    specs = osediff_lora_specs(data)
    tensors = {f"{part}.{k}": v for part, key in STATE_KEYS.items() for k, v in data[key].items()}
    _check_against_backbone(config, specs, tensors, src.name)
    meta = StudentMeta(
        backbone=config,
        weights="lora",
        lora=specs,
        timestep=OSEDIFF_TIMESTEP,
        scale=OSEDIFF_SCALE,
        prompt=prompt,
        has_prompt_embeds=False,
        name=out.stem,
        preprocess=OSEDIFF_PREPROCESS,
        training={
            "source": "OSEDiff (github.com/cswry/OSEDiff), imported with `vpdsr convert-osediff`",
            "imported_file": src.name,
            "imported_sha256": _sha256(src),
            "lora_alpha": f"{OSEDIFF_LORA_ALPHA:g} (peft's default, which OSEDiff uses)",
            "differences": "vpdsr encodes with the VAE posterior mean (OSEDiff samples it), uses one fixed "
            "prompt (OSEDiff prompts each image with DAPE tags) and defaults to the wavelet colour fix (OSEDiff's "
            "script to AdaIN)",
        },
    )
    return write_model_file(out, meta, tensors)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    check_model_file(path, "OSEDiff checkpoint")
    _check_intact(path)
    data = load_torch_checkpoint(
        path,
        refusal="the file stores Python objects besides tensors, lists and numbers: not a plain OSEDiff checkpoint",
    )
    if not isinstance(data, dict):
        raise ModelFileError(f"{path.name}: not an OSEDiff checkpoint (it holds a {type(data).__name__}, not a dict)")
    missing = sorted({*ADAPTERS.values(), *RANK_KEYS.values(), *STATE_KEYS.values()} - data.keys())
    if missing:
        raise ModelFileError(f"{path.name}: not an OSEDiff checkpoint, it lacks {missing}")
    for key in RANK_KEYS.values():
        if isinstance(data[key], bool) or not isinstance(data[key], int) or data[key] < 1:
            raise ModelFileError(f"{path.name}: {key} must be a positive integer, got {data[key]!r}")
    for key in ADAPTERS.values():
        if not isinstance(data[key], (list, tuple)) or not all(isinstance(n, str) for n in data[key]):
            raise ModelFileError(f"{path.name}: {key} must be a list of layer names")
    for key in STATE_KEYS.values():
        state = data[key]
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise ModelFileError(f"{path.name}: {key} must map parameter names to tensors")
        bad = [k for k, v in state.items() if not v.is_floating_point() or not torch.isfinite(v).all()]
        if bad:
            raise ModelFileError(f"{path.name}: {len(bad)} weights in {key} are not finite floats, e.g. {bad[:3]}")
    return data


def _check_intact(path: Path) -> None:
    """Name a cut-off download or a damaged copy as such before torch reads it.

    ``torch.save`` writes a zip archive with its index at the end and a checksum per member.
    Without this check torch's reader says things like "[Errno 22] Invalid argument" for a
    truncated file, and loads a file with damaged weights without a word.
    """
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        raise ModelFileError(f"{path.name}: not a readable checkpoint: the file is empty; copy or download it again")
    if head != b"PK\x03\x04":
        return  # not torch's zip format (an old-style pickle, or not a checkpoint at all): torch.load judges it
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError):
        damaged = ""
    if damaged is not None:
        where = f" ({damaged} fails its checksum)" if damaged else ""
        raise ModelFileError(
            f"{path.name}: not a readable checkpoint: it is truncated or corrupt{where}; copy or download it again"
        )


def _check_against_backbone(
    config: BackboneConfig, specs: list[LoraSpec], tensors: dict[str, torch.Tensor], source: str
) -> None:
    """Every target must be a layer of the backbone and every tensor a parameter of the adapted model."""
    parts = build_backbone(config, device="meta")
    models = {"unet": parts.unet, "vae": parts.vae}
    for spec in specs:
        model = models[spec.part]
        layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        absent = [t for t in spec.targets if t not in layers]
        if absent:
            raise ModelFileError(
                f"{source}: {len(absent)} layers its {spec.part} adapter {spec.name} targets do not exist in the "
                f"{config.name} backbone, e.g. {absent[:3]} (was it trained on another base model?)"
            )
        add_lora(model, spec)
    expected = {f"{p}.{k}": v for p, m in models.items() for k, v in m.state_dict().items()}
    unexpected = sorted(k for k in tensors if k not in expected)
    if unexpected:
        raise ModelFileError(
            f"{source}: {len(unexpected)} weights are not parameters of the adapted {config.name} backbone, "
            f"e.g. {unexpected[:3]}"
        )
    wrong = [
        f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
        for k, v in tensors.items()
        if v.shape != expected[k].shape
    ]
    if wrong:
        raise ModelFileError(
            f"{source}: {len(wrong)} weights have the wrong shape (another rank or backbone?), e.g. {wrong[:3]}"
        )
    missing = sorted(k for k in expected if "lora_" in k and k not in tensors)
    if missing:
        raise ModelFileError(f"{source}: {len(missing)} LoRA weights are missing, e.g. {missing[:3]}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
