"""Blur kernels of the degradation model: drawn as a few numbers, then built as pixels.

A batch of kernels is described by :class:`KernelParams` (per-sample kind, size, sigmas, angle,
shape and cut-off), which is small enough to log. :func:`make_kernels` is a pure function of it,
so a logged batch rebuilds the very same kernels. All kernels sit on a 21 x 21 grid
(``KERNEL_GRID``) and are zero outside their own centred size, so one batch mixes sizes freely.

Formulas, with d = x^T Sigma^-1 x and Sigma = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T:
Gaussian exp(-d / 2); generalized Gaussian exp(-d^beta / 2); plateau 1 / (1 + d^beta);
sinc (circular low-pass) omega J1(omega r) / (2 pi r). Every kernel is normalised to sum 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import KERNEL_GRID, FinalConfig, KernelConfig
from .sampling import categorical, uniform

KERNEL_KINDS = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
    "sinc",
    "identity",
)
_SMALL_SINC_SIZE = 13
_SMALL_SINC_MIN_OMEGA = math.pi / 3


@dataclass
class KernelParams:
    """Per-sample description of a batch of kernels; fields a kind does not use hold neutral values."""

    kind: tuple[str, ...]
    """One of ``KERNEL_KINDS`` per sample; "identity" means no blur."""
    size: Tensor
    """(B,) odd sizes; the kernel is zero outside its centred size x size window."""
    sigma_x: Tensor
    sigma_y: Tensor
    theta: Tensor
    """(B,) rotation of the x axis, radians."""
    beta: Tensor
    """(B,) shape exponent; 1 for plain Gaussians."""
    omega: Tensor
    """(B,) sinc cut-off, radians per pixel."""


def _odd_sizes(sizes: tuple[int, int], n: int, generator: torch.Generator) -> Tensor:
    lo, hi = sizes
    steps = (hi - lo) // 2 + 1
    return lo + 2 * categorical((1.0 / steps,) * steps, n, generator)


def _sample_beta(beta_range: tuple[float, float], n: int, generator: torch.Generator) -> Tensor:
    """Below 1 half the time and above 1 otherwise (when the range spans 1), so heavy-tailed and
    flat-topped shapes are equally likely although the range above 1 is wider."""
    lo, hi = beta_range
    u = uniform(0.0, 1.0, n, generator)
    below = uniform(0.0, 1.0, n, generator) < 0.5
    if lo < 1.0 < hi:
        low = torch.where(below, lo, 1.0)
        high = torch.where(below, 1.0, hi)
        return low + (high - low) * u
    return lo + (hi - lo) * u


def _sample_omega(omega_range: tuple[float, float], size: Tensor, generator: torch.Generator) -> Tensor:
    lo, hi = omega_range
    small_lo = max(lo, min(_SMALL_SINC_MIN_OMEGA, hi))
    low = torch.where(size < _SMALL_SINC_SIZE, small_lo, lo)
    return low + (hi - low) * uniform(0.0, 1.0, size.numel(), generator)


def _is_iso(kind: str) -> bool:
    return kind == "iso" or kind.endswith("_iso")


def sample_kernels(
    cfg: KernelConfig, batch_size: int, generator: torch.Generator, blur_prob: float = 1.0
) -> KernelParams:
    """Draw one kernel per sample; with probability ``1 - blur_prob`` a sample gets "identity".

    Every field is drawn for every sample whatever its kind, so the generator advances by the
    same amount for any outcome and the draws after this one do not depend on the kinds chosen.
    """
    n = batch_size
    size = _odd_sizes(cfg.sizes, n, generator)
    choice = categorical(cfg.kernel_prob, n, generator)
    sigma_x = uniform(*cfg.sigma, n, generator)
    sigma_y = uniform(*cfg.sigma, n, generator)
    theta = uniform(-math.pi, math.pi, n, generator)
    beta_g = _sample_beta(cfg.betag, n, generator)
    beta_p = _sample_beta(cfg.betap, n, generator)
    omega = _sample_omega(cfg.sinc_omega, size, generator)
    is_sinc = uniform(0.0, 1.0, n, generator) < cfg.sinc_prob
    is_blurred = uniform(0.0, 1.0, n, generator) < blur_prob

    kind = tuple(
        "identity" if not is_blurred[i] else "sinc" if is_sinc[i] else cfg.kernel_list[int(choice[i])] for i in range(n)
    )
    iso = torch.tensor([_is_iso(k) for k in kind], dtype=torch.bool)
    generalized = torch.tensor([k.startswith("generalized") for k in kind], dtype=torch.bool)
    plateau = torch.tensor([k.startswith("plateau") for k in kind], dtype=torch.bool)
    return KernelParams(
        kind=kind,
        size=size,
        sigma_x=sigma_x,
        sigma_y=torch.where(iso, sigma_x, sigma_y),
        theta=torch.where(iso, 0.0, theta),
        beta=torch.where(generalized, beta_g, torch.where(plateau, beta_p, 1.0)),
        omega=omega,
    )


def sample_final_sinc(cfg: FinalConfig, batch_size: int, generator: torch.Generator) -> KernelParams:
    """The last sinc of the pipeline: "sinc" with probability ``cfg.sinc_prob``, else "identity"."""
    n = batch_size
    size = _odd_sizes(cfg.sizes, n, generator)
    omega = _sample_omega(cfg.sinc_omega, size, generator)
    is_sinc = uniform(0.0, 1.0, n, generator) < cfg.sinc_prob
    ones = torch.ones(n)
    kind = tuple("sinc" if s else "identity" for s in is_sinc.tolist())
    return KernelParams(kind, size, ones, ones.clone(), torch.zeros(n), ones.clone(), omega)


def _check_params(params: KernelParams) -> int:
    n = len(params.kind)
    unknown = sorted(set(params.kind) - set(KERNEL_KINDS))
    if unknown:
        raise ValueError(f"unknown kernel kinds {unknown}; expected some of {KERNEL_KINDS}")
    for name in ("size", "sigma_x", "sigma_y", "theta", "beta", "omega"):
        shape = tuple(getattr(params, name).shape)
        if shape != (n,):
            raise ValueError(f"KernelParams.{name} must have shape ({n},) like kind, got {shape}")
    return n


def make_kernels(
    params: KernelParams, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Build the (B, 21, 21) kernels that ``params`` describes; each sums to 1.

    Built on the CPU in float64 (so the sinc's Bessel function and the normalisation are exact to
    any ``dtype``, and devices without float64 work too), then moved: kernels are tiny.
    """
    n = _check_params(params)
    half = KERNEL_GRID // 2
    axis = torch.arange(-half, half + 1, dtype=torch.float64)
    y, x = torch.meshgrid(axis, axis, indexing="ij")

    def col(t: Tensor) -> Tensor:
        return t.detach().to(device="cpu", dtype=torch.float64).view(n, 1, 1)

    def mask(wanted: Callable[[str], bool]) -> Tensor:
        return torch.tensor([wanted(k) for k in params.kind], dtype=torch.bool).view(n, 1, 1)

    cos, sin = col(params.theta).cos(), col(params.theta).sin()
    u = (x * cos + y * sin) / col(params.sigma_x)
    v = (-x * sin + y * cos) / col(params.sigma_y)
    d_beta = (u * u + v * v).pow(col(params.beta))
    gaussian_family = torch.where(
        mask(lambda k: k.startswith("plateau")), 1.0 / (1.0 + d_beta), torch.exp(-0.5 * d_beta)
    )

    omega = col(params.omega)
    r = torch.sqrt(x * x + y * y)
    r_safe = torch.where(r == 0, 1.0, r)
    sinc = torch.where(
        r == 0, omega * omega / (4 * math.pi), omega * torch.special.bessel_j1(omega * r_safe) / (2 * math.pi * r_safe)
    )
    identity = ((x == 0) & (y == 0)).to(torch.float64).expand(n, -1, -1)

    kernels = torch.where(
        mask(lambda k: k == "identity"), identity, torch.where(mask(lambda k: k == "sinc"), sinc, gaussian_family)
    )
    radius = col(params.size) // 2
    kernels = kernels * ((x.abs() <= radius) & (y.abs() <= radius))
    kernels = kernels / kernels.sum(dim=(-2, -1), keepdim=True)
    return kernels.to(device=device, dtype=dtype)
