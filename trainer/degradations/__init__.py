"""Real-ESRGAN-style synthetic degradation (HR -> realistic LR), batched on any device.

Public API::

    cfg = DegradationConfig()                           # nested dataclasses, Real-ESRGAN defaults
    lr, params = degrade(hr, cfg, generator, scale=4)   # hr (B,3,H,W) in [0,1]
    lr_again = apply_degradation(hr, params)            # replay from logged params
    params.to_dict()                                    # JSON-ready log entry
    RandomDegradation(cfg, scale)                       # the same as an nn.Module
    write_degrade_preview(images, cfg, "preview.png", seed=0)

The single operations (``make_kernels``, ``apply_blur``, ``add_gaussian_noise``...) are public
too, for tests and for anyone composing a different pipeline.
"""

from .config import DegradationConfig, FinalConfig, KernelConfig, Stage2Config, Stage2KernelConfig, StageConfig
from .kernels import KERNEL_KINDS, KernelParams, make_kernels, sample_final_sinc, sample_kernels
from .ops import (
    add_gaussian_noise,
    add_poisson_noise,
    apply_blur,
    apply_jpeg,
    apply_resize,
    quantize_8bit,
)
from .pipeline import (
    DegradationParams,
    FinalParams,
    NoiseParams,
    RandomDegradation,
    StageParams,
    apply_degradation,
    degrade,
    sample_degradation,
)
from .preview import write_degrade_preview

__all__ = [
    "KERNEL_KINDS",
    "DegradationConfig",
    "DegradationParams",
    "FinalConfig",
    "FinalParams",
    "KernelConfig",
    "KernelParams",
    "NoiseParams",
    "RandomDegradation",
    "Stage2Config",
    "Stage2KernelConfig",
    "StageConfig",
    "StageParams",
    "add_gaussian_noise",
    "add_poisson_noise",
    "apply_blur",
    "apply_degradation",
    "apply_jpeg",
    "apply_resize",
    "degrade",
    "make_kernels",
    "quantize_8bit",
    "sample_degradation",
    "sample_final_sinc",
    "sample_kernels",
    "write_degrade_preview",
]
