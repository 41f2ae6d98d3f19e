"""Every range of the degradation model, as nested dataclasses that a YAML loader can fill.

The defaults are those of Real-ESRGAN's ``train_realesrnet_x4plus.yml`` so that a model trained
with them sees the same family of damage that made RealESRNet robust on real photos. Each class
checks itself on construction, so a bad YAML value fails at start-up with the field's name rather
than at some training step. YAML gives lists, so ranges are accepted as lists and stored as
tuples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

GAUSSIAN_KINDS = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
RESIZE_MODES = ("area", "bilinear", "bicubic")
KERNEL_GRID = 21
"""Every kernel is stored on this odd grid, so one batch can mix kernel sizes (7..21 px)."""


def _as_tuples(obj: object) -> None:
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, list):
            setattr(obj, f.name, tuple(value))


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")


def _check_range(name: str, r: tuple, lo: float = -math.inf, hi: float = math.inf) -> None:
    if len(r) != 2 or not lo <= r[0] <= r[1] <= hi:
        raise ValueError(f"{name} must be a (low, high) pair with {lo} <= low <= high <= {hi}, got {r}")


def _check_distribution(name: str, probs: tuple, n: int) -> None:
    if len(probs) != n or any(p < 0 for p in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
        raise ValueError(f"{name} must be {n} non-negative probabilities summing to 1, got {probs}")


def _check_choices(name: str, chosen: tuple, allowed: tuple) -> None:
    unknown = [c for c in chosen if c not in allowed]
    if not chosen or unknown:
        raise ValueError(f"{name} must be a non-empty list drawn from {allowed}, got {chosen}")


def _check_sizes(name: str, sizes: tuple) -> None:
    _check_range(name, sizes, 1, KERNEL_GRID)
    if sizes[0] % 2 == 0 or sizes[1] % 2 == 0:
        raise ValueError(f"{name} must be odd kernel sizes, got {sizes}")


@dataclass
class KernelConfig:
    """How one blur kernel is drawn: a Gaussian-family kernel or, with ``sinc_prob``, a sinc.

    Sinc kernels of fewer than 13 taps never go below omega = pi/3, because a short kernel cannot
    hold a low cut-off without a truncated, ringing footprint (Real-ESRGAN's rule).
    """

    sizes: tuple[int, int] = (7, 21)
    """Odd kernel sizes, uniformly among the odd numbers in this range."""
    kernel_list: tuple[str, ...] = GAUSSIAN_KINDS
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    sigma: tuple[float, float] = (0.2, 3.0)
    """Standard deviation in pixels along each principal axis."""
    betag: tuple[float, float] = (0.5, 4.0)
    """Shape of generalized Gaussians: < 1 heavy tails, > 1 flat tops; each side drawn half the time."""
    betap: tuple[float, float] = (1.0, 2.0)
    """Shape of plateau kernels, 1 / (1 + d^beta)."""
    sinc_omega: tuple[float, float] = (math.pi / 5, math.pi)
    """Cut-off frequency of sinc kernels, radians per pixel."""

    def __post_init__(self) -> None:
        _as_tuples(self)
        _check_sizes("kernel sizes", self.sizes)
        _check_choices("kernel_list", self.kernel_list, GAUSSIAN_KINDS)
        _check_distribution("kernel_prob", self.kernel_prob, len(self.kernel_list))
        _check_prob("sinc_prob", self.sinc_prob)
        _check_range("sigma", self.sigma, 1e-3)
        _check_range("betag", self.betag, 1e-3)
        _check_range("betap", self.betap, 1e-3)
        _check_range("sinc_omega", self.sinc_omega, 1e-3, math.pi)


@dataclass
class StageConfig:
    """One order of degradation: blur, resize, noise, JPEG.

    In the second stage the JPEG is the one of the final step (see :class:`FinalConfig`), applied
    before or after the last resize.
    """

    blur_prob: float = 1.0
    kernel: KernelConfig = field(default_factory=KernelConfig)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)
    """Probabilities of up, down and keep."""
    resize_range: tuple[float, float] = (0.15, 1.5)
    """Down factors are drawn in [low, 1], up factors in [1, high]."""
    resize_modes: tuple[str, ...] = RESIZE_MODES
    gaussian_noise_prob: float = 0.5
    """Gaussian noise with this probability, Poisson (shot) noise otherwise."""
    noise_sigma: tuple[float, float] = (1.0, 30.0)
    """Gaussian noise standard deviation in 8-bit levels (divided by 255 when applied)."""
    poisson_scale: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    """Probability that the noise is the same in all channels (luminance noise)."""
    jpeg_quality: tuple[float, float] = (30.0, 95.0)

    def __post_init__(self) -> None:
        _as_tuples(self)
        _check_prob("blur_prob", self.blur_prob)
        _check_distribution("resize_prob (up, down, keep)", self.resize_prob, 3)
        _check_range("resize_range", self.resize_range, 1e-3)
        if not self.resize_range[0] <= 1.0 <= self.resize_range[1]:
            raise ValueError(f"resize_range must contain 1 (down below, up above), got {self.resize_range}")
        _check_choices("resize_modes", self.resize_modes, RESIZE_MODES)
        _check_prob("gaussian_noise_prob", self.gaussian_noise_prob)
        _check_range("noise_sigma", self.noise_sigma, 0.0)
        _check_range("poisson_scale", self.poisson_scale, 0.0)
        _check_prob("gray_noise_prob", self.gray_noise_prob)
        _check_range("jpeg_quality", self.jpeg_quality, 1.0, 100.0)


@dataclass
class Stage2KernelConfig(KernelConfig):
    """The second stage's kernels: narrower (sigma up to 1.5), as the image is smaller by then."""

    sigma: tuple[float, float] = (0.2, 1.5)


@dataclass
class Stage2Config(StageConfig):
    """The second stage: milder and less certain than the first.

    Its own class (not a StageConfig instance with other values) so that its defaults live in its
    type: a loader that builds ``stage2`` from a partial YAML section keeps these defaults.
    """

    blur_prob: float = 0.8
    kernel: Stage2KernelConfig = field(default_factory=Stage2KernelConfig)
    resize_prob: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range: tuple[float, float] = (0.3, 1.2)
    noise_sigma: tuple[float, float] = (1.0, 25.0)
    poisson_scale: tuple[float, float] = (0.05, 2.5)


@dataclass
class FinalConfig:
    """The last step: [resize to HR/scale + sinc] and the second stage's JPEG, in random order.

    Real-ESRGAN found that other orders (sinc, JPEG, resize) give twisted lines, so only these two.
    """

    sinc_prob: float = 0.8
    sinc_omega: tuple[float, float] = (math.pi / 3, math.pi)
    sizes: tuple[int, int] = (7, 21)
    resize_modes: tuple[str, ...] = RESIZE_MODES
    jpeg_first_prob: float = 0.5

    def __post_init__(self) -> None:
        _as_tuples(self)
        _check_prob("sinc_prob", self.sinc_prob)
        _check_range("sinc_omega", self.sinc_omega, 1e-3, math.pi)
        _check_sizes("final sinc sizes", self.sizes)
        _check_choices("resize_modes", self.resize_modes, RESIZE_MODES)
        _check_prob("jpeg_first_prob", self.jpeg_first_prob)


@dataclass
class DegradationConfig:
    """Real-ESRGAN's second-order degradation model; the defaults are RealESRNet x4plus's."""

    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    final: FinalConfig = field(default_factory=FinalConfig)
