"""vpdsr: one-step diffusion super-resolution (VPD-SR, OSEDiff-style students).

The public API is small on purpose: ``load_pipeline`` and the pipeline call cover the CLI,
the ComfyUI nodes and the Gradio demo; the trainer also uses the model and model-file modules.

The names are imported on first use, not with the package: ``vpdsr --help`` imports ``vpdsr.cli``
and with it this package, and torch plus diffusers take seconds to import.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # what the names are, for type checkers and editors; at run time __getattr__ imports them
    from .backbones import BackboneConfig, available_backbones, build_backbone  # noqa: F401
    from .errors import Cancelled, ImageError, ModelFileError, OutOfMemory, VPDError  # noqa: F401
    from .imageio import load_image, save_image  # noqa: F401
    from .model import OneStepStudent  # noqa: F401
    from .modelfile import load_student, read_meta, save_student  # noqa: F401
    from .paths import default_model_path  # noqa: F401
    from .pipeline import VPDPipeline, load_pipeline  # noqa: F401

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "BackboneConfig": "backbones",
    "available_backbones": "backbones",
    "build_backbone": "backbones",
    "Cancelled": "errors",
    "ImageError": "errors",
    "ModelFileError": "errors",
    "OutOfMemory": "errors",
    "VPDError": "errors",
    "load_image": "imageio",
    "save_image": "imageio",
    "OneStepStudent": "model",
    "load_student": "modelfile",
    "read_meta": "modelfile",
    "save_student": "modelfile",
    "VPDPipeline": "pipeline",
    "default_model_path": "paths",
    "load_pipeline": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name's submodule when the name is first asked for, then keep the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vpdsr' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
