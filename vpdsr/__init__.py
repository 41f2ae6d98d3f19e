"""vpdsr: one-step diffusion super-resolution (VPD-SR, OSEDiff-style students).

The public API is small on purpose: ``load_pipeline`` and the pipeline call cover the CLI,
the ComfyUI nodes and the Gradio demo; the trainer also uses the model and model-file modules.
"""

from .backbones import BackboneConfig, available_backbones, build_backbone
from .errors import Cancelled, ImageError, ModelFileError, OutOfMemory, VPDError
from .imageio import load_image, save_image
from .model import OneStepStudent
from .modelfile import load_student, read_meta, save_student
from .pipeline import VPDPipeline, default_model_path, load_pipeline

__version__ = "0.1.0"

__all__ = [
    "BackboneConfig",
    "Cancelled",
    "ImageError",
    "ModelFileError",
    "OneStepStudent",
    "OutOfMemory",
    "VPDError",
    "VPDPipeline",
    "available_backbones",
    "build_backbone",
    "default_model_path",
    "load_image",
    "load_pipeline",
    "load_student",
    "read_meta",
    "save_image",
    "save_student",
]
