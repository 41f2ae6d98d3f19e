"""CLIP towers in the layouts ComfyUI installs hold, mapped to open_clip's keys.

A whole CLIP is an image tower and a text tower whose projections end in one embedding space.
ComfyUI users rarely have a file with both, but often have the halves:

- ``models/text_encoders/clip_l.safetensors`` (SD3, Flux): OpenAI ViT-L/14's text tower in Hugging
  Face ``CLIPTextModelWithProjection`` keys (``clip_g.safetensors``: OpenCLIP ViT-bigG/14's);
- ``models/clip_vision/*.safetensors`` (IP-Adapter, Redux, unCLIP): image towers in
  ``CLIPVisionModelWithProjection`` keys;
- SD 2.x single-file checkpoints, whose ``cond_stage_model.model.*`` is OpenCLIP ViT-H/14's whole
  text tower in open_clip's own keys, ``text_projection`` included (SDXL's
  ``conditioner.embedders.1.model.*`` is ViT-bigG/14's);
- Hugging Face ``CLIPModel`` files and folders, with both towers.

Everything is mapped to open_clip's keys, so one model class serves the inspector, the ESS loss
and the DAPE stage (whose LoRA targets open_clip's module names). Hugging Face keeps q, k and v
apart and stores projections as ``nn.Linear`` weights (out, in); open_clip fuses them into
``in_proj`` and multiplies by ``proj`` (in, out), so they are concatenated and transposed. The
functions here work on key lists and tensors; ``loading.load_clip`` reads the files.
"""

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vpdsr.errors import ModelFileError

IMAGE = "image"
TEXT = "text"
# Trained CLIPs all end at the clamp of their learned temperature, exp(logit_scale) = 100; tower
# files (clip_l, clip_vision) leave the scale out, since neither tower alone uses it.
TRAINED_LOGIT_SCALE = math.log(100.0)


@dataclass(frozen=True)
class Source:
    """Where one tower sits in a file: its key prefix, its key layout and a marker key."""

    kind: str
    prefix: str
    layout: str  # "open_clip" or "hf"
    marker: str

    def present(self, keys: Iterable[str]) -> bool:
        return self.prefix + self.marker in keys


_OPEN_IMAGE = "visual.conv1.weight"
_OPEN_TEXT = "token_embedding.weight"
_HF_IMAGE = "vision_model.embeddings.patch_embedding.weight"
_HF_TEXT = "text_model.embeddings.token_embedding.weight"
# In the order tried: a file's own tower first, then SD checkpoints' (SDXL holds two text towers;
# the OpenCLIP one, which keeps its projection, comes first).
SOURCES = (
    Source(IMAGE, "", "open_clip", _OPEN_IMAGE),
    Source(IMAGE, "", "hf", _HF_IMAGE),
    Source(IMAGE, "embedder.model.", "open_clip", _OPEN_IMAGE),  # SD 2.1 unCLIP's image embedder
    Source(TEXT, "", "open_clip", _OPEN_TEXT),
    Source(TEXT, "", "hf", _HF_TEXT),
    Source(TEXT, "cond_stage_model.model.", "open_clip", _OPEN_TEXT),  # SD 2.x
    Source(TEXT, "conditioner.embedders.1.model.", "open_clip", _OPEN_TEXT),  # SDXL's ViT-bigG/14
    Source(TEXT, "cond_stage_model.transformer.", "hf", _HF_TEXT),  # SD 1.x: no projection
    Source(TEXT, "conditioner.embedders.0.transformer.", "hf", _HF_TEXT),  # SDXL's CLIP-L: no projection
)

_OPEN_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
_HF_DIRECT = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic: Hugging Face's spelling
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}
_HF_PROJECTIONS = {
    IMAGE: ("visual_projection.weight", "visual.proj"),
    TEXT: ("text_projection.weight", "text_projection"),
}
_HF_TOWERS = {"vision_model": "visual.transformer", "text_model": "transformer"}
_HF_BLOCK = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_LAYER = re.compile(r"(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_BLOCKS = re.compile(r"(visual\.transformer|transformer)\.resblocks\.(\d+)\.")

# Attention heads are not in the weights. Text towers use 64-wide heads throughout; image towers
# too, except OpenCLIP's big ones (ViT-H/14, ViT-g/14, ViT-bigG/14: 16 heads of these widths).
_HEAD_WIDTH = 64
_IMAGE_HEAD_WIDTHS = {1280: 80, 1408: 88, 1664: 104}
# OpenAI's CLIPs use quick GELU, OpenCLIP's plain GELU; only the shapes can tell them apart.
# (image width, layers, patch) and (text width, layers) of OpenAI's ViT-B/32, B/16, L/14(-336).
_OPENAI_IMAGE = {(768, 12, 32), (768, 12, 16), (1024, 24, 14)}
_OPENAI_TEXT = {(512, 12), (768, 12)}
# Hugging Face's CLIP config defaults: what a config.json saved with only its non-defaults means.
_HF_DEFAULT_HEADS = {IMAGE: 12, TEXT: 8}
_HF_DEFAULT_ACT = "quick_gelu"


def find_sources(keys: Iterable[str]) -> dict[str, Source]:
    """The first tower of each kind found among ``keys``: {"image": ..., "text": ...}, either may lack."""
    keys = set(keys)
    found: dict[str, Source] = {}
    for source in SOURCES:
        if source.kind not in found and source.present(keys):
            found[source.kind] = source
    return found


def to_open_clip(source: Source, tensors: Mapping[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
    """One tower's tensors (``source.prefix`` already removed) in open_clip's keys.

    Keys of the other tower and of anything else in the file are dropped. A tower without its
    projection is refused: its embeddings live in a space the other tower's do not reach.
    """
    if source.layout == "open_clip":
        if source.kind == IMAGE:
            state = {k: v for k, v in tensors.items() if k.startswith("visual.")}
        else:
            state = {k: v for k, v in tensors.items() if k.startswith(_OPEN_TEXT_KEYS) or k == "logit_scale"}
    else:
        state = _hf_to_open_clip(source.kind, tensors)
    projection = "visual.proj" if source.kind == IMAGE else "text_projection"
    if projection not in state and (source.kind == TEXT or source.layout == "hf"):
        hf_class = "CLIPTextModelWithProjection" if source.kind == TEXT else "CLIPVisionModelWithProjection"
        raise ModelFileError(
            f"{label}: its {source.kind} tower has no projection into CLIP's shared embedding space, so it cannot "
            f"be compared with {'images' if source.kind == TEXT else 'text'} (SD 1.x checkpoints and SDXL's CLIP-L "
            f"keep none); use a file with one, such as a {hf_class} export."
        )
    return state


def _hf_to_open_clip(kind: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    root = "vision_model." if kind == IMAGE else "text_model."
    state: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key in _HF_DIRECT and (key.startswith(root) or (key == "logit_scale" and kind == TEXT)):
            state[_HF_DIRECT[key]] = value
            continue
        match = _HF_LAYER.fullmatch(key)
        if match is None or not key.startswith(root):
            continue
        tower, index, module, param = match.groups()
        block = f"{_HF_TOWERS[tower]}.resblocks.{index}."
        if module in _QKV:
            qkv.setdefault((block, param, tower), {})[module] = value
        elif module in _HF_BLOCK:
            state[f"{block}{_HF_BLOCK[module]}.{param}"] = value
    for (block, param, _), parts in qkv.items():
        if len(parts) == len(_QKV):
            state[f"{block}attn.in_proj_{param}"] = torch.cat([parts[name] for name in _QKV])
    source_key, target = _HF_PROJECTIONS[kind]
    if source_key in tensors:
        state[target] = tensors[source_key].T.contiguous()
    return state


def join(image: Mapping[str, torch.Tensor], text: Mapping[str, torch.Tensor], labels: tuple[str, str]) -> dict:
    """One open_clip state dict from two towers; refused when their embedding spaces differ in size.

    Two towers of the same size from different CLIPs cannot be told apart by their weights: they
    load, and their scores mean nothing. Only the sizes are checked here.
    """
    image_dim = image["visual.proj"].shape[-1] if "visual.proj" in image else None
    text_dim = text["text_projection"].shape[-1] if "text_projection" in text else None
    if image_dim is not None and text_dim is not None and image_dim != text_dim:
        raise ModelFileError(
            f"The image tower of {labels[0]} ({image_dim}-wide embeddings) and the text tower of {labels[1]} "
            f"({text_dim}-wide embeddings) cannot belong to the same CLIP; pick the two halves of one model "
            "(e.g. clip_l with a ViT-L/14 image tower, an SD 2.x text tower with OpenCLIP ViT-H/14's)."
        )
    state = {**image, **text}
    state.setdefault("logit_scale", torch.tensor(TRAINED_LOGIT_SCALE))
    return state


def hf_config_hints(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Heads and activation per tower from a Hugging Face CLIP ``config.json``, by tower kind.

    ``save_pretrained`` writes only the values that differ from the defaults, so a missing entry
    means Hugging Face's default, not "unknown". Not a CLIP config: no hints.
    """
    model_type = config.get("model_type")
    if model_type == "clip":
        parts = {IMAGE: config.get("vision_config") or {}, TEXT: config.get("text_config") or {}}
    elif model_type == "clip_vision_model":
        parts = {IMAGE: config}
    elif model_type == "clip_text_model":
        parts = {TEXT: config}
    else:
        return {}
    hints = {}
    for kind, part in parts.items():
        act = part.get("hidden_act", _HF_DEFAULT_ACT)
        if act not in ("gelu", "quick_gelu"):
            raise ModelFileError(f"a CLIP {kind} tower with activation {act!r} is not supported (gelu, quick_gelu)")
        heads = int(part.get("num_attention_heads", _HF_DEFAULT_HEADS[kind]))
        hints[kind] = {"heads": heads, "quick_gelu": act == "quick_gelu"}
    return hints


def infer_config(
    state: Mapping[str, torch.Tensor], hints: Mapping[str, Mapping[str, Any]], labels: tuple[str, str]
) -> dict[str, Any]:
    """An open_clip config for a ViT CLIP from its open_clip-keyed weights (``labels``: image, text file).

    Widths, depths, patch and image size, context length and vocabulary are in the shapes. Heads
    and the activation are not: they come from ``hints`` (a config.json) where there is one, else
    from the rules that hold for the published CLIPs (64-wide heads but for OpenCLIP's big image
    towers; quick GELU when both towers have the shapes of one of OpenAI's CLIPs).
    """
    if "visual.conv1.weight" not in state or "visual.class_embedding" not in state:
        raise ModelFileError(
            f"{labels[0]}: only ViT image towers can be read without a config; pass the architecture (config=...)."
        )
    needed = (
        "visual.positional_embedding",
        "visual.transformer.resblocks.0.mlp.c_fc.weight",
        "visual.proj",
        "positional_embedding",
        "transformer.resblocks.0.mlp.c_fc.weight",
    )
    missing = [key for key in needed if key not in state]
    if missing:
        files = " + ".join(dict.fromkeys(labels))
        raise ModelFileError(f"{files}: incomplete CLIP towers, {', '.join(missing)} missing.")
    image_width, _, patch, _ = state["visual.conv1.weight"].shape
    tokens = state["visual.positional_embedding"].shape[0] - 1
    grid = math.isqrt(tokens)
    image_layers = _depth(state, "visual.transformer")
    text_vocab, text_width = state["token_embedding.weight"].shape
    text_layers = _depth(state, "transformer")
    image_hints, text_hints = hints.get(IMAGE, {}), hints.get(TEXT, {})
    image_heads = image_hints.get("heads") or image_width // _IMAGE_HEAD_WIDTHS.get(image_width, _HEAD_WIDTH)
    text_heads = text_hints.get("heads") or text_width // _HEAD_WIDTH
    towers = ((IMAGE, image_width, image_heads, labels[0]), (TEXT, text_width, text_heads, labels[1]))
    for kind, width, heads, label in towers:
        if heads < 1 or width % heads:
            raise ModelFileError(
                f"{label}: the number of attention heads of its {width}-wide {kind} tower is not in its weights and "
                "follows no published CLIP; put its config.json beside it or pass the architecture (config=...)."
            )
    acts = {h["quick_gelu"] for h in (image_hints, text_hints) if "quick_gelu" in h}
    if len(acts) > 1:
        raise ModelFileError(
            f"{labels[0]} and {labels[1]}: their configs give the two towers different activations "
            "(gelu and quick_gelu), which no CLIP has."
        )
    quick_gelu = (
        acts.pop()
        if acts
        else (image_width, image_layers, patch) in _OPENAI_IMAGE and (text_width, text_layers) in _OPENAI_TEXT
    )
    return {
        "embed_dim": int(state["visual.proj"].shape[-1]),
        "quick_gelu": bool(quick_gelu),
        "vision_cfg": {
            "image_size": int(grid * patch),
            "layers": image_layers,
            "width": int(image_width),
            "head_width": int(image_width // image_heads),
            "patch_size": int(patch),
            "mlp_ratio": _mlp_ratio(state, "visual.transformer", image_width),
        },
        "text_cfg": {
            "context_length": int(state["positional_embedding"].shape[0]),
            "vocab_size": int(text_vocab),
            "width": int(text_width),
            "heads": int(text_heads),
            "layers": text_layers,
            "mlp_ratio": _mlp_ratio(state, "transformer", text_width),
        },
    }


def _depth(state: Mapping[str, torch.Tensor], tower: str) -> int:
    indices = {int(m.group(2)) for key in state if (m := _BLOCKS.match(key)) and m.group(1) == tower}
    return max(indices, default=-1) + 1


def _mlp_ratio(state: Mapping[str, torch.Tensor], tower: str, width: int) -> float:
    """The ratio open_clip turns back into exactly this hidden size (it takes ``int(width * ratio)``)."""
    hidden = state[f"{tower}.resblocks.0.mlp.c_fc.weight"].shape[0]
    ratio = hidden / width
    while int(width * ratio) < hidden:  # float rounding, e.g. ViT-bigG's 8192 / 1664
        ratio = math.nextafter(ratio, math.inf)
    return ratio
