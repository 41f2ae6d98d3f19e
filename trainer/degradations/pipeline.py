"""Real-ESRGAN's second-order degradation, split into sampling and applying.

``sample_degradation`` draws every random choice of a batch from a ``torch.Generator`` into a
:class:`DegradationParams`; ``apply_degradation`` is a deterministic function of the HR batch
and those parameters. ``params.to_dict()`` is plain JSON, so a training batch can be logged and
replayed exactly. ``degrade`` does both, and :class:`RandomDegradation` is its module.

Order: stage 1 (blur, resize, noise, JPEG), stage 2 (blur with p=0.8, resize, noise), then the
final step, [resize to HR/scale + sinc] and JPEG in random order, and rounding to 8-bit levels.

What is drawn per image and what per batch: kernels, noise and JPEG quality differ per image;
resize factors, resize modes and the final order are shared by the batch, because every image of
a batch must keep the same size (Real-ESRGAN makes the same choice).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .config import DegradationConfig, StageConfig
from .kernels import KernelParams, make_kernels, sample_final_sinc, sample_kernels
from .ops import (
    add_gaussian_noise,
    add_poisson_noise,
    apply_blur,
    apply_jpeg,
    apply_resize,
    check_image,
    quantize_8bit,
    split_apply,
)
from .sampling import categorical, choice, draw_seed, uniform


@dataclass
class NoiseParams:
    """The noise of one stage: kind, strength and colour per image, and the seed of the noise itself."""

    gaussian: Tensor
    """(B,) bool: Gaussian noise, else Poisson."""
    sigma: Tensor
    """(B,) Gaussian standard deviation in 8-bit levels."""
    poisson_scale: Tensor
    gray: Tensor
    """(B,) bool: the same noise in every channel."""
    seed: int
    """Seeds a generator on the image's device for the noise itself. The other parameters are
    the same on every device; the noise pixels are the same on every run of one device type."""


@dataclass
class StageParams:
    """Everything drawn for one stage; kernels, noise and quality per image, the resize per batch."""

    kernel: KernelParams
    resize_scale: float
    """Factor applied to the stage's input size (stage 1) or to HR/scale (stage 2)."""
    resize_mode: str
    noise: NoiseParams
    jpeg_quality: Tensor
    """(B,) quality; stage 2's is used by the final step."""


@dataclass
class FinalParams:
    """The last step: per-image sinc (or none), the batch's resize mode and order."""

    sinc: KernelParams
    resize_mode: str
    jpeg_first: bool


@dataclass
class DegradationParams:
    """All random choices of one batch: log ``to_dict()``, replay with ``apply_degradation``."""

    scale: int
    stage1: StageParams
    stage2: StageParams
    final: FinalParams

    @property
    def batch_size(self) -> int:
        return len(self.stage1.kernel.kind)

    def to_dict(self) -> dict:
        """Plain lists and numbers, ready for JSON logs."""
        return _plain(asdict(self))


def _plain(value: object) -> object:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _sample_stage(cfg: StageConfig, n: int, generator: torch.Generator) -> StageParams:
    kernel = sample_kernels(cfg.kernel, n, generator, blur_prob=cfg.blur_prob)
    lo, hi = cfg.resize_range
    up, down, keep = (1.0, hi), (lo, 1.0), (1.0, 1.0)
    bounds = (up, down, keep)[int(categorical(cfg.resize_prob, 1, generator))]
    factor = float(uniform(*bounds, 1, generator))
    mode = choice(cfg.resize_modes, generator)
    noise = NoiseParams(
        gaussian=uniform(0.0, 1.0, n, generator) < cfg.gaussian_noise_prob,
        sigma=uniform(*cfg.noise_sigma, n, generator),
        poisson_scale=uniform(*cfg.poisson_scale, n, generator),
        gray=uniform(0.0, 1.0, n, generator) < cfg.gray_noise_prob,
        seed=draw_seed(generator),
    )
    quality = uniform(*cfg.jpeg_quality, n, generator)
    return StageParams(kernel, factor, mode, noise, quality)


def sample_degradation(
    cfg: DegradationConfig, batch_size: int, generator: torch.Generator, scale: int = 4
) -> DegradationParams:
    """Draw all random choices for a batch; the same generator state always gives the same params."""
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stage1 = _sample_stage(cfg.stage1, batch_size, generator)
    stage2 = _sample_stage(cfg.stage2, batch_size, generator)
    final = FinalParams(
        sinc=sample_final_sinc(cfg.final, batch_size, generator),
        resize_mode=choice(cfg.final.resize_modes, generator),
        jpeg_first=bool(uniform(0.0, 1.0, 1, generator) < cfg.final.jpeg_first_prob),
    )
    return DegradationParams(scale, stage1, stage2, final)


def _apply_noise(x: Tensor, p: NoiseParams) -> Tensor:
    generator = torch.Generator(device=x.device).manual_seed(p.seed)
    return split_apply(
        x,
        p.gaussian,
        lambda part, i: add_gaussian_noise(part, p.sigma[i] / 255.0, p.gray[i], generator),
        lambda part, i: add_poisson_noise(part, p.poisson_scale[i], p.gray[i], generator),
    )


def _blur_resize_noise(x: Tensor, p: StageParams, size: tuple[int, int]) -> Tensor:
    x = apply_blur(x, make_kernels(p.kernel, device=x.device, dtype=x.dtype))
    x = apply_resize(x, size, p.resize_mode)
    return _apply_noise(x, p.noise)


@torch.no_grad()
def apply_degradation(hr: Tensor, params: DegradationParams) -> Tensor:
    """Degrade ``hr`` (B, 3, H, W) in [0, 1] with ``params``: returns (B, 3, H/scale, W/scale)
    in [0, 1], on 8-bit levels, float32 on ``hr``'s device.

    Runs without gradients: the final rounding would stop them anyway, and the pipeline makes
    training inputs, it is not part of a model.
    """
    check_image(hr, "hr")
    s = params.scale
    b, _, h, w = hr.shape
    if b != params.batch_size:
        raise ValueError(f"hr has batch size {b} but params were sampled for batch size {params.batch_size}")
    if h % s or w % s:
        raise ValueError(f"hr height and width must be multiples of scale {s}, got {h}x{w}")
    lr_size = (h // s, w // s)
    x = hr.float().clamp(0.0, 1.0)

    p1 = params.stage1
    x = _blur_resize_noise(x, p1, (max(1, int(h * p1.resize_scale)), max(1, int(w * p1.resize_scale))))
    x = apply_jpeg(x, p1.jpeg_quality)

    p2 = params.stage2
    x = _blur_resize_noise(x, p2, (max(1, int(h / s * p2.resize_scale)), max(1, int(w / s * p2.resize_scale))))

    final = params.final
    if final.jpeg_first:
        x = apply_jpeg(x, p2.jpeg_quality)
    x = apply_resize(x, lr_size, final.resize_mode)
    x = apply_blur(x, make_kernels(final.sinc, device=x.device, dtype=x.dtype))
    if not final.jpeg_first:
        x = apply_jpeg(x, p2.jpeg_quality)
    return quantize_8bit(x)


def degrade(
    hr: Tensor, cfg: DegradationConfig, generator: torch.Generator, scale: int = 4
) -> tuple[Tensor, DegradationParams]:
    """Make the LR twin of an HR batch, (B, 3, H, W) in [0, 1] -> (B, 3, H/scale, W/scale).

    Returns the parameters too, so the batch can be logged and rebuilt with ``apply_degradation``.
    """
    check_image(hr, "hr")
    params = sample_degradation(cfg, hr.shape[0], generator, scale)
    return apply_degradation(hr, params), params


class RandomDegradation(nn.Module):
    """Module form of :func:`degrade`; holds the config and scale, has no weights."""

    def __init__(self, cfg: DegradationConfig | None = None, scale: int = 4) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else DegradationConfig()
        self.scale = scale

    def forward(self, hr: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, DegradationParams]:
        return degrade(hr, self.cfg, generator if generator is not None else torch.default_generator, self.scale)
