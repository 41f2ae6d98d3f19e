"""OpenCLIP models from configs and weight files on disk, and our own CLIP export format.

Nothing here downloads. open_clip's ``create_model(name, pretrained=...)`` treats a string it
knows as a hub tag and fetches it, so we never hand it a ``pretrained`` value: we build the
architecture from its config (offline: the named configs ship inside the open_clip wheel) and load
the state dict ourselves, which also lets us say exactly what does not fit when a file is wrong.
Configs whose text tower or tokenizer lives on the Hugging Face hub (SigLIP, XLM-R, ...) are
refused for that reason.

Our export format (``save_clip``) is one ``.safetensors`` file whose metadata holds the full model
config as JSON, so a degradation-aware CLIP written by the trainer loads with no config argument
and keeps working if open_clip renames or edits its built-in configs.
"""

import copy
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.coca_model import CoCa
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.tokenizer import SimpleTokenizer
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vpdsr.errors import ModelFileError
from vpdsr.paths import check_model_file

from . import layouts

FORMAT = "vpdsr-clip"
FORMAT_VERSION = "1"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
_HF_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")  # a Hugging Face folder's weights
TINY_CONFIG = "vpdsr-tiny-clip"

_CONFIG_DIR = Path(__file__).parent / "configs"
# CLIP's published normalisation; almost every OpenCLIP checkpoint (OpenAI, LAION, DataComp,
# MetaCLIP) was trained with it. A config can override it under "preprocess_cfg".
_OPENAI_MEAN = tuple(open_clip.OPENAI_DATASET_MEAN)
_OPENAI_STD = tuple(open_clip.OPENAI_DATASET_STD)
_STRIPPED_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrappers
_SHOWN = 5  # how many offending keys an error message lists


class MissingTextTower(ModelFileError):
    """A lone image tower (a clip_vision file): the front-end names its setting for the text tower."""


@dataclass(frozen=True)
class ClipSpec:
    """What a built CLIP needs besides its weights: config, preprocessing and provenance.

    ``config`` is a complete open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``,
    ...) plus an optional ``preprocess_cfg`` with ``mean``/``std``; it is what ``save_clip``
    stores, so a spec round-trips through our files unchanged.
    """

    config: dict[str, Any]
    name: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.config["vision_cfg"].get("image_size", 224)
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(self.config.get("preprocess_cfg", {}).get("mean", _OPENAI_MEAN))

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.config.get("preprocess_cfg", {}).get("std", _OPENAI_STD))

    @property
    def context_length(self) -> int:
        return int(self.config["text_cfg"].get("context_length", 77))


def list_configs() -> list[str]:
    """Config names ``build_clip``/``load_clip`` accept: ours first, then open_clip's built-ins."""
    ours = sorted(p.stem for p in _CONFIG_DIR.glob("*.json"))
    return ours + [name for name in open_clip.list_models() if name not in ours]


def resolve_config(config: str | os.PathLike | Mapping[str, Any]) -> ClipSpec:
    """Turn a config name, a JSON file or a dict into a checked ``ClipSpec``.

    A JSON file may be a bare model config or an ``open_clip_config.json`` as found beside hub
    checkpoints (``{"model_cfg": ..., "preprocess_cfg": ...}``), so a repository copied to disk
    by hand can be used as it is.
    """
    name = None
    if isinstance(config, Mapping):
        raw = copy.deepcopy(dict(config))
    elif str(config).endswith(".json"):
        raw = _read_json_config(Path(config))
    else:
        name = str(config)
        ours = _CONFIG_DIR / f"{name}.json"
        raw = _read_json_config(ours) if ours.is_file() else open_clip.get_model_config(name)
        if raw is None:
            raise ModelFileError(
                f"Unknown OpenCLIP config {name!r}. Use one of {', '.join(list_configs()[:12])}, ... "
                "(see vpdsr.semantics.list_configs()), a .json config file, or a dict."
            )
    if "model_cfg" in raw:  # open_clip_config.json layout
        raw = {**raw["model_cfg"], "preprocess_cfg": raw.get("preprocess_cfg", {})}
    _check_config(raw, name)
    return ClipSpec(config=raw, name=name)


def build_clip(config: str | os.PathLike | Mapping[str, Any] = TINY_CONFIG) -> tuple[nn.Module, ClipSpec]:
    """A randomly initialised CLIP on the CPU in float32, for tests and for training from scratch."""
    spec = resolve_config(config)
    return _instantiate(spec), spec


def load_clip(
    path: str | os.PathLike,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    text_path: str | os.PathLike | None = None,
) -> tuple[nn.Module, ClipSpec]:
    """Load a CLIP from disk onto the CPU in float32 (the caller moves it).

    ``path`` is a whole CLIP, or its image tower when ``text_path`` names a file with the text
    tower. Besides open_clip checkpoints this reads the layouts in ``layouts``: Hugging Face
    ``CLIPModel`` files and folders, ``CLIPTextModelWithProjection`` / ``CLIPVisionModelWithProjection``
    files (ComfyUI's text_encoders and clip_vision) and SD 2.x / SDXL single-file checkpoints' text
    towers. Two towers whose embedding sizes differ are refused.

    ``config`` names the architecture ("ViT-B-32", "ViT-H-14", a JSON file or a dict). Without
    it: a plain open_clip file needs its metadata (``save_clip``) or an ``open_clip_config.json``
    beside it; every other layout, and any pair, is read from the tensor shapes (a Hugging Face
    ``config.json`` beside the weights gives the heads and activation). ``.pt``/``.pth``/``.bin``/
    ``.ckpt`` files are read with ``torch.load(weights_only=True)``: tensors only, never pickled code.
    """
    first = _WeightFile(path)
    second = _WeightFile(text_path) if text_path is not None else None
    sources = layouts.find_sources(first.keys)
    if second is None and not _foreign(first.keys, sources):
        state_dict, label = first.load(), str(first.path)
        spec = _spec_for_open_clip_file(first, config)
    else:
        state_dict, label, spec = _join_towers(first, second, sources, config)
    model = _instantiate(spec)
    state_dict = _adapt_to_model(state_dict, model)
    _check_state_dict(model, state_dict, label, spec)
    model.load_state_dict(state_dict, strict=True)
    return model, spec


def save_clip(
    path: str | os.PathLike,
    model: nn.Module,
    config: str | os.PathLike | Mapping[str, Any] | ClipSpec,
    info: Mapping[str, Any] | None = None,
) -> None:
    """Write ``model`` as a self-describing ``.safetensors`` file that ``load_clip(path)`` reads.

    The metadata holds the full config as JSON (not just its name), ``info`` as JSON (training
    run, degradation settings, ... anything JSON-serialisable), and the config name when there is
    one. The weights are checked against the config first so a bad export fails at save time, not
    when someone tries to use it; the file is written beside the target and renamed into place
    so an interrupted save never leaves a truncated file under the real name.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_clip writes .safetensors files; got {path.name!r}.")
    spec = config if isinstance(config, ClipSpec) else resolve_config(config)
    state_dict = {
        key: tensor.detach().to("cpu").contiguous() for key, tensor in _strip_prefixes(model.state_dict()).items()
    }
    _check_state_dict(_instantiate(spec, device="meta"), state_dict, path, spec)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "clip_config": json.dumps(spec.config),
        "info": json.dumps(dict(info if info is not None else spec.info)),
    }
    if spec.name:
        metadata["clip_config_name"] = spec.name
    tmp = path.with_name(path.name + ".partial")
    save_file(state_dict, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def build_tokenizer(spec: ClipSpec) -> SimpleTokenizer:
    """open_clip's BPE tokenizer; its vocabulary ships inside the wheel, so it works offline."""
    kwargs = spec.config["text_cfg"].get("tokenizer_kwargs") or {}
    return SimpleTokenizer(context_length=spec.context_length, **kwargs)


def _foreign(keys: Mapping[str, str], sources: Mapping[str, layouts.Source]) -> bool:
    """Whether a lone file needs the tower reading: not a whole CLIP in open_clip's own keys."""
    whole_open_clip = "token_embedding.weight" in keys or not sources
    return not whole_open_clip or any(s.layout != "open_clip" or s.prefix for s in sources.values())


def _spec_for_open_clip_file(weights: "_WeightFile", config: str | os.PathLike | Mapping[str, Any] | None) -> ClipSpec:
    if config is not None:
        return resolve_config(config)
    if weights.metadata.get("format") == FORMAT:
        return _spec_from_metadata(weights.metadata, weights.path)
    if (weights.path.parent / "open_clip_config.json").is_file():
        return resolve_config(weights.path.parent / "open_clip_config.json")
    raise ModelFileError(
        f"{weights.path} is a plain CLIP checkpoint with no config inside; pass the OpenCLIP config it was "
        "trained with, e.g. load_clip(path, config='ViT-B-32') (OpenAI weights need the "
        "'-quickgelu' variant, e.g. 'ViT-B-32-quickgelu')."
    )


def _join_towers(
    first: "_WeightFile",
    second: "_WeightFile | None",
    sources: Mapping[str, layouts.Source],
    config: str | os.PathLike | Mapping[str, Any] | None,
) -> tuple[dict[str, torch.Tensor], str, ClipSpec]:
    """The image tower of ``first`` and the text tower of ``second`` (or of ``first``), in open_clip keys."""
    text_file = second or first
    text_sources = layouts.find_sources(text_file.keys) if second is not None else sources
    if layouts.IMAGE not in sources:
        raise ModelFileError(f"{first.path} holds no CLIP image tower (found: {_describe(sources)}).")
    if layouts.TEXT not in text_sources:
        if second is None:
            raise MissingTextTower(
                f"{first.path} holds no CLIP text tower (found: {_describe(sources)}); load it together with a "
                "file holding the matching text tower"
            )
        raise ModelFileError(f"{text_file.path} holds no CLIP text tower (found: {_describe(text_sources)}).")
    labels = (str(first.path), str(text_file.path))
    image_source, text_source = sources[layouts.IMAGE], text_sources[layouts.TEXT]
    image_tensors = first.load(image_source.prefix)
    same = text_file is first and text_source.prefix == image_source.prefix  # a whole CLIP: read it once
    text_tensors = image_tensors if same else text_file.load(text_source.prefix)
    image = layouts.to_open_clip(image_source, image_tensors, labels[0])
    text = layouts.to_open_clip(text_source, text_tensors, labels[1])
    state_dict = layouts.join(image, text, labels)
    label = labels[0] if second is None else f"{labels[0]} + {labels[1]}"
    if config is not None:
        return state_dict, label, resolve_config(config)
    hints = {}
    for kind, weights in ((layouts.IMAGE, first), (layouts.TEXT, text_file)):
        if kind in (found := weights.hf_hints()):
            hints[kind] = found[kind]
    return state_dict, label, ClipSpec(config=layouts.infer_config(state_dict, hints, labels))


def _describe(sources: Mapping[str, layouts.Source]) -> str:
    return ", ".join(f"a {kind} tower" for kind in sources) or "no CLIP tower"


class _WeightFile:
    """A weights file whose key names are read first and whose tensors are read only when asked.

    A single-file SD checkpoint is gigabytes of UNet around a text tower; with ``.safetensors``
    only the tower's tensors are read. A Hugging Face folder stands for the weights inside it.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.is_dir():
            inside = [path / name for name in _HF_WEIGHT_NAMES if (path / name).is_file()]
            if not inside:
                raise ModelFileError(f"{path} is a folder without {' or '.join(_HF_WEIGHT_NAMES)}; it holds no CLIP.")
            path = inside[0]
        check_model_file(path, "CLIP checkpoint")
        if path.suffix.lower() not in SUFFIXES:
            raise ModelFileError(
                f"{path.name}: unsupported CLIP checkpoint type {path.suffix!r}; use one of {', '.join(SUFFIXES)}."
            )
        self.path = path
        self._tensors: dict[str, torch.Tensor] | None = None
        if path.suffix.lower() == ".safetensors":
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    self.metadata = f.metadata() or {}
                    names = list(f.keys())  # a safe_open handle is not iterable itself
            except Exception as err:  # safetensors raises its own error types for every kind of damage
                raise ModelFileError(
                    f"{path} is not a readable .safetensors file (corrupt or truncated?): {err}"
                ) from None
            # stripped name -> stored name, with the same unwrapping as torch files get
            self.keys: dict[str, str] = _strip_prefixes(dict(zip(names, names, strict=True)))
        else:
            self.metadata = {}
            self._tensors = _read_torch_weights(path)
            self.keys = {key: key for key in self._tensors}

    def load(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors whose (unwrapped) keys start with ``prefix``, the prefix removed."""
        wanted = {key: stored for key, stored in self.keys.items() if key.startswith(prefix)}
        if self._tensors is not None:
            tensors = {key: self._tensors[stored] for key, stored in wanted.items()}
        else:
            try:
                with safe_open(str(self.path), framework="pt", device="cpu") as f:
                    tensors = {key: f.get_tensor(stored) for key, stored in wanted.items()}
            except Exception as err:  # a file truncated after its header fails only here
                raise ModelFileError(f"{self.path} could not be read (corrupt or truncated?): {err}") from None
        if not prefix:
            return _extract_state_dict(tensors, self.path)
        return {key[len(prefix) :]: value for key, value in tensors.items()}

    def hf_hints(self) -> dict[str, dict[str, Any]]:
        """Heads and activations from a Hugging Face ``config.json`` beside the weights, if it is one."""
        config_path = self.path.parent / "config.json"
        if not config_path.is_file():
            return {}
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return {}  # someone else's config.json; the shapes still tell the rest
        return layouts.hf_config_hints(config) if isinstance(config, dict) else {}


def _read_json_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"CLIP config file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFileError(f"CLIP config file {path} is not valid JSON: {err}") from None


def _check_config(config: dict[str, Any], name: str | None) -> None:
    label = repr(name) if name else "the given CLIP config"
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in config]
    if missing:
        raise ModelFileError(f"{label} is not an OpenCLIP model config: it lacks {', '.join(missing)}.")
    text_cfg = config["text_cfg"]
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise ModelFileError(
            f"{label} uses a Hugging Face text model or tokenizer "
            f"({text_cfg.get('hf_model_name') or text_cfg.get('hf_tokenizer_name')}), which would be "
            "downloaded from the hub; vpdsr only loads CLIPs that work offline (OpenAI-style text towers)."
        )


def _instantiate(spec: ClipSpec, device: str = "cpu") -> nn.Module:
    """Build the architecture; ``device="meta"`` gives the shapes without allocating memory."""
    config = copy.deepcopy(spec.config)
    config.pop("preprocess_cfg", None)
    custom_text = config.pop("custom_text", False)
    if "multimodal_cfg" in config:
        model_class = CoCa
    elif custom_text:
        model_class = CustomTextCLIP
    else:
        model_class = CLIP
    try:
        with torch.device(device):
            return model_class(**config)
    except (TypeError, ValueError, KeyError, AssertionError, ZeroDivisionError) as err:
        label = repr(spec.name) if spec.name else "the given CLIP config"
        raise ModelFileError(f"Could not build a CLIP from {label}: {err}") from None


def _read_torch_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling failures come as many exception types
        raise ModelFileError(
            f"{path} could not be read as a PyTorch weights file with weights_only=True "
            f"(corrupt, truncated, TorchScript, or containing pickled code): {err}"
        ) from None
    return _extract_state_dict(raw, path)


def _extract_state_dict(raw: Any, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap the layouts training scripts save: bare, under "state_dict"/"model", "module." keys."""
    for wrapper in ("state_dict", "model"):
        if isinstance(raw, Mapping) and isinstance(raw.get(wrapper), Mapping):
            raw = raw[wrapper]
            break
    if not isinstance(raw, Mapping):
        raise ModelFileError(f"{path} holds a {type(raw).__name__}, not a CLIP state dict.")
    tensors = {key: value for key, value in raw.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ModelFileError(f"{path} holds no tensors; it is not a CLIP checkpoint.")
    return _strip_prefixes(tensors)


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state_dict = dict(state_dict)
    changed = True
    while changed:
        changed = False
        for prefix in _STRIPPED_PREFIXES:
            if state_dict and all(key.startswith(prefix) for key in state_dict):
                state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
                changed = True
    return state_dict


def _adapt_to_model(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Reconcile harmless layout differences: logit_scale saved as a scalar or as a 1-vector."""
    own = model.state_dict()
    for key in ("logit_scale", "logit_bias"):
        if key in state_dict and key in own and state_dict[key].numel() == own[key].numel():
            state_dict[key] = state_dict[key].reshape(own[key].shape)
    return state_dict


def _check_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path | str, spec: ClipSpec
) -> None:
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{key}: file {tuple(state_dict[key].shape)} vs config {expected[key]}"
        for key in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[key].shape) != expected[key]
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
            problems.append(f"{len(items)} {label} ({'; '.join(items[:_SHOWN])}{more})")
    label = repr(spec.name) if spec.name else "the given config"
    raise ModelFileError(
        f"{path} does not match CLIP config {label}: {', '.join(problems)}. "
        "Pass the config the checkpoint was trained with (config=...)."
    )


def _spec_from_metadata(metadata: dict[str, str], path: Path) -> ClipSpec:
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{path} is a vpdsr CLIP file of format version {metadata.get('format_version')!r}; "
            f"this vpdsr reads version {FORMAT_VERSION}. Update vpdsr or re-export the file."
        )
    try:
        config = json.loads(metadata["clip_config"])
        info = json.loads(metadata.get("info", "{}"))
    except (KeyError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{path} has damaged vpdsr CLIP metadata: {err}") from None
    spec = resolve_config(config)
    return ClipSpec(config=spec.config, name=metadata.get("clip_config_name"), info=info)
