"""LoRA adapters on the student's UNet and VAE encoder, through peft.

Adapters are described by plain dicts (``LoraSpec.to_dict``) so that they can be written into a
model file's metadata and rebuilt exactly, including OSEDiff's three UNet adapters.

peft (which imports transformers) loads only when an adapter is added or merged: the embedded default
and the tiny students have none, and every model file and backbone imports this module.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

__all__ = ["LoraSpec", "add_lora", "default_lora_targets", "merge_lora", "lora_parameter_names"]

# Layer-name suffixes that carry most of a UNet's or VAE's capacity: attention projections, the
# feed-forward and every convolution. Norms and biases are left alone.
UNET_TARGET_SUFFIXES = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "conv", "conv_in", "conv_out",
)  # fmt: skip
VAE_ENCODER_TARGET_SUFFIXES = ("conv1", "conv2", "conv_shortcut", "conv", "conv_in", "conv_out", "to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class LoraSpec:
    """One peft adapter: which part of the student it sits on and exactly which layers."""

    part: str  # "unet" or "vae"
    name: str
    rank: int
    alpha: float
    targets: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["targets"] = list(self.targets)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraSpec:
        if data.get("part") not in ("unet", "vae"):
            raise ValueError(f"LoRA part must be 'unet' or 'vae', got {data.get('part')!r}")
        return cls(
            part=str(data["part"]),
            name=str(data["name"]),
            rank=int(data["rank"]),
            alpha=float(data["alpha"]),
            targets=tuple(str(t) for t in data["targets"]),
        )


def default_lora_targets(model: nn.Module, suffixes: tuple[str, ...], prefix: str = "") -> tuple[str, ...]:
    """Full names of the Linear/Conv2d layers whose name ends in one of ``suffixes``.

    Full names (not suffixes) go into the spec so that a file means the same layers even if
    peft's suffix matching changes.
    """
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or not name.startswith(prefix):
            continue
        if any(name == s or name.endswith("." + s) for s in suffixes):
            names.append(name)
    return tuple(names)


def add_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Inject an adapter and make it active alongside any adapters already there."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, init_lora_weights="gaussian", target_modules=list(spec.targets))
    with warnings.catch_warnings():  # several adapters on one model is what we want (OSEDiff has three)
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, model, adapter_name=spec.name)
    names = sorted({n for m in model.modules() if isinstance(m, BaseTunerLayer) for n in m.lora_A.keys()})
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(names)
    return model


def lora_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if "lora_" in n]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weights and drop the peft wrappers, for fast inference."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if not isinstance(module, BaseTunerLayer):
            continue
        module.merge(adapter_names=list(module.lora_A.keys()))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    return model
