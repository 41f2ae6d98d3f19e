"""Every option of a training run, as nested dataclasses: the YAML files mirror this layout.

Defaults are for the tiny backbone on a small machine; the committed configs in
``trainer/configs/`` set what differs. A loss is switched on by giving it a weight above zero;
each loss's section is the dataclass in its own module (``trainer/losses/<key>.py``), and
``losses:`` accepts exactly the registered ones (``trainer.losses.LossesConfig``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vpdsr.color import COLOR_FIXES, RING_CLAMP, WAVELET_LEVELS, check_ring_clamp, check_wavelet_levels

from .config_loading import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from .data import DataConfig
from .degradations import DegradationConfig
from .losses import LossesConfig

__all__ = [
    "CheckpointConfig",
    "ClipConfig",
    "ConfigError",
    "DapeConfig",
    "LossesConfig",
    "OptimConfig",
    "StudentConfig",
    "TeacherConfig",
    "TrainConfig",
    "ValidationConfig",
    "load_config",
]


def _check_nonnegative(section: object, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(section, name)}")


@dataclass
class OptimConfig:
    """The main optimizer (AdamW) and the loop around it."""

    steps: int = 1000
    lr: float = 1e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    """Max global gradient norm per optimizer; 0 turns clipping off."""
    ema_decay: float = 0.0
    """0 = no EMA; else the exported and validated weights are the EMA of the trained ones."""
    gradient_checkpointing: bool = False
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Passed to accelerate (GPU runs; bf16 where the GPU has it)."""
    cpu: bool = False
    """Train on the CPU even when a GPU is present."""
    threads: int = 0
    """torch CPU threads; 0 keeps torch's default (one per core). On a CPU shared with other
    work (or with data-loader workers), fewer threads can be much faster: OpenMP threads
    spin while they wait for a core."""
    max_bad_steps: int = 5
    """Stop after this many steps in a row whose loss was NaN or infinite (each is skipped)."""
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.max_bad_steps < 1 or self.log_every < 1:
            raise ValueError("max_bad_steps and log_every must be >= 1")
        _check_nonnegative(self, "warmup_steps", "weight_decay", "grad_clip", "threads")


@dataclass
class CheckpointConfig:
    every: int = 500
    """Write a resumable checkpoint every this many steps (and when interrupted)."""
    keep: int = 2
    """How many recent checkpoints to keep; older ones are deleted."""

    def __post_init__(self) -> None:
        if self.every < 1 or self.keep < 1:
            raise ValueError("checkpoint.every and checkpoint.keep must be >= 1")


@dataclass
class ValidationConfig:
    every: int = 500
    """Validate (PSNR/SSIM on data.val_hr_dir, image grid) every this many steps and at the end."""
    grid_images: int = 4
    max_images: int = 16
    """Validation images used per run, the first ones of the folder, to keep it quick."""

    def __post_init__(self) -> None:
        if self.every < 1 or self.grid_images < 0 or self.max_images < 1:
            raise ValueError("validation.every and max_images must be >= 1, grid_images >= 0")


@dataclass
class ClipConfig:
    """A real CLIP checkpoint for the semantic losses and the DAPE stage (never downloaded)."""

    path: str | None = None
    """A whole CLIP, or its image tower when ``text_path`` is set (e.g. a ComfyUI clip_vision file)."""
    text_path: str | None = None
    """The matching text tower: clip_l.safetensors for a ViT-L/14 image tower, an SD 2.x checkpoint for
    OpenCLIP ViT-H/14's (see vpdsr.semantics.load_clip)."""
    config: str | None = None
    """OpenCLIP architecture of a plain checkpoint (e.g. ViT-B-32); not needed for our own files, Hugging
    Face layouts, SD checkpoints or pairs, whose shapes give it."""
    tags: str | None = None
    """Tag vocabulary file (one tag per line); None = vpdsr's default vocabulary."""


@dataclass
class TeacherConfig:
    """The multi-step SR teacher: the backbone's UNet conditioned on the LR latent.

    For the tiny backbone, whose VAE starts random, the first ``vae_steps`` steps train the VAE
    alone (reconstruction), then the VAE is frozen and the UNet learns the diffusion loss on its
    latents. Training both at once would move the latent space under the UNet's feet.
    """

    vae_steps: int = 0
    vae_lr: float = 2e-4
    vae_kl_weight: float = 1e-6
    vae_hfp_weight: float = 0.0
    """Weight of the pixel high-frequency loss on VAE reconstructions (sharper decodes)."""
    vae_sample: bool = True
    """Decode posterior samples (SD's recipe). False decodes the posterior mean, which is all
    inference ever decodes, and from scratch it converges several times faster on a CPU budget."""
    vae_lr_fraction: float = 0.25
    """Share of each VAE batch taken by upscaled LR images: the student's encoder sees those."""
    cond_dropout: float = 0.1
    """Probability of blanking the LR condition, so the teacher also learns the unconditional
    score that classifier-free guidance (the VSD loss's real branch) needs."""
    sampling_steps: int = 20
    """DDIM steps when the teacher super-resolves (validation, regression targets)."""
    base: str | None = None
    """Base weights (SD backbones) to initialise from; the tiny backbone starts random."""
    prompt: str = ""

    def __post_init__(self) -> None:
        _check_nonnegative(self, "vae_steps", "vae_kl_weight", "vae_hfp_weight")
        for name in ("vae_lr_fraction", "cond_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.sampling_steps < 1:
            raise ValueError(f"sampling_steps must be >= 1, got {self.sampling_steps}")


@dataclass
class StudentConfig:
    """The one-step student (VPD-SR / OSEDiff form) and where its initial weights come from."""

    teacher: str | None = None
    """Teacher file written by the teacher stage (tiny: the student's initial VAE and UNet)."""
    base: str | None = None
    """Base weights for SD backbones (diffusers folder or single .safetensors)."""
    init_from: Literal["teacher", "base", "student"] = "teacher"
    """Where the initial weights come from: the teacher file, the base weights, or
    ``init_student``, a student model file to train further."""
    init_student: str | None = None
    """A student model file of ours (e.g. the embedded default) for ``init_from: student``. Its
    backbone must be the config's, or the config's plus a refiner, which then starts at zero."""
    prior: Literal["teacher", "base"] = "teacher"
    """The frozen diffusion model scoring the student for VSD, DiffLoss and feature GAN heads:
    the LR-conditioned teacher or the text-conditioned base UNet."""
    timestep: int = 999
    prompt: str = ""
    negative_prompt: str = ""
    lora_rank: int = 0
    """0 trains the UNet in full (tiny); > 0 trains LoRA adapters plus conv_in (SD)."""
    lora_alpha: float = 0.0
    """0 means alpha = rank."""
    train_vae_encoder: bool = False
    """Also train the VAE encoder (LoRA when lora_rank > 0)."""
    color_fix: str = "none"
    """The inference colour fix to train under: the pixel losses and validation see the fixed
    output, as users will, so the student spends no capacity on the low band the fix replaces."""
    wavelet_levels: int = WAVELET_LEVELS
    """The wavelet fix's bands kept from the student (the rest come from the bicubic input); the
    exported file records it, so inference applies the same fix."""
    ring_clamp: str = RING_CLAMP
    """Where the wavelet fix's anti-ringing clamp takes its range: "joint" (the output's and the
    input's 3x3 range, which keeps drawn texture) or "input" (the input's 5x5 range, for students
    that only sharpen); recorded in the exported file like ``wavelet_levels``."""
    train_vae_decoder: bool = False
    """Also train the VAE decoder in full (only with lora_rank 0). OSEDiff keeps it frozen so the
    student's latents stay those the prior scores; a small backbone whose VAE had only minutes of
    training gains far more fidelity from it than it loses, since the pixel losses still tie the
    decoder to the HR images."""
    sr_teacher: str | None = None
    """A pretrained pixel-space SR network that spandrel loads (.pth or .safetensors: ESRGAN,
    Real-ESRGAN, SwinIR, HAT...); ``losses.sr_teacher`` regresses the student onto its output."""
    sr_teacher_dtype: Literal["fp32", "bf16"] = "fp32"
    """The SR teacher's precision. bf16 halves its CPU time (Real-ESRGAN x4plus on one core: 0.2 s
    against 0.41 s per 32 px LR crop); its 8-bit targets then differ from fp32's by a level here
    and there, so each precision caches in its own folder."""
    sr_teacher_cache: str | None = None
    """Folder caching the teacher's outputs by teacher file and LR pixels (see data.fixed_batches)."""

    def __post_init__(self) -> None:
        if not 0 <= self.timestep <= 999:
            raise ValueError(f"timestep must be in [0, 999], got {self.timestep}")
        _check_nonnegative(self, "lora_rank", "lora_alpha")
        if self.color_fix not in COLOR_FIXES:
            raise ValueError(f"color_fix must be one of {COLOR_FIXES}, got {self.color_fix!r}")
        check_wavelet_levels(self.wavelet_levels)
        check_ring_clamp(self.ring_clamp)
        if self.train_vae_decoder and self.lora_rank > 0:
            raise ValueError("train_vae_decoder needs lora_rank 0 (the decoder has no LoRA targets)")


@dataclass
class DapeConfig:
    """Degradation-aware CLIP: LoRA on the image tower so degraded images embed like clean ones."""

    lora_rank: int = 8
    lora_alpha: float = 0.0
    embed_weight: float = 1.0
    """MSE between the LoRA CLIP's embedding of the LR and the frozen CLIP's of the HR."""
    kl_weight: float = 1.0
    """KL between their zero-shot tag distributions."""

    def __post_init__(self) -> None:
        if self.lora_rank < 1:
            raise ValueError(f"dape.lora_rank must be >= 1, got {self.lora_rank}")
        _check_nonnegative(self, "lora_alpha", "embed_weight", "kl_weight")


@dataclass
class TrainConfig:
    stage: Literal["teacher", "student", "dape"]
    name: str | None = None
    """The exported model's name and file name (without suffix); unset, the output folder's name,
    so that a model trained on your photos is not named like another (the embedded default)."""
    output_dir: str = "runs/vpdsr"
    seed: int = 0
    scale: int = 4
    backbone: str = "tiny"
    """A bundled backbone name (tiny, sd21-base, sd-turbo) or a backbone JSON file."""
    data: DataConfig = field(default_factory=DataConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    dape: DapeConfig = field(default_factory=DapeConfig)
    losses: LossesConfig = field(default_factory=LossesConfig)

    def __post_init__(self) -> None:
        if not 1 <= self.scale <= 8:
            raise ValueError(f"scale must be in 1..8, got {self.scale}")
        if not self.name:
            self.name = Path(self.output_dir).resolve().name or "vpdsr-model"

    def to_dict(self) -> dict:
        return to_dict(self)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config, apply ``section.key=value`` overrides, and check everything."""
    data = load_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides))
    if "stage" not in data:
        raise ConfigError("the config must name a stage: teacher, student or dape")
    return from_dict(TrainConfig, data)
