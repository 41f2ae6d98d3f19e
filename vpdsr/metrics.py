"""Image metrics for super-resolution: PSNR-Y, SSIM-Y and LSD-HF (full-reference), grid_p (none).

PSNR and SSIM follow the conventions behind the published tables of one-step diffusion SR
(OSEDiff, VPD-SR, ...), which were computed with pyiqa's ``psnr``/``ssim`` and
``test_y_channel=True, color_space='ycbcr'``:

* luma is ITU-R BT.601 "studio" Y, ``(16 + 65.481 R + 128.553 G + 24.966 B) / 255`` for RGB
  in [0, 1], so Y spans [16/255, 235/255];
* PSNR uses that Y unrounded, with a peak of 1;
* SSIM rounds Y to integer 8-bit levels first (as MATLAB's uint8 images would be), uses a peak of
  255, an 11x11 Gaussian window with sigma 1.5, only "valid" window positions (no padding), no
  downsampling of large images, and clamps the contrast-structure term at zero.

Matching them to the digit matters: a 0.1 dB change in convention is as large as the gap between
some published methods. ``bench/quality.py`` cross-checks these against a pyiqa log.

LSD-HF (high-band log-spectral distance) measures detail rather than fidelity: a blurry
upscale loses high-frequency power and a generative one may invent too much, and neither shows
in PSNR. It compares radially averaged power spectra of the luma, so it rewards the right
*amount* of detail at each scale, not its exact placement.

grid_p needs no reference: it measures a fixed pattern that repeats every p pixels, the faint
grid a VAE decoder or a patch-wise network can print over flat areas. LSD-HF cannot see it (a
grid adds high-band power, which can even *improve* a blurry image's LSD-HF) and PSNR barely
does, but the eye finds it at once.

All functions take batches of images, BCHW float tensors in [0, 1] with C = 3 (RGB) or C = 1
(already luma), and return one score per image, shape (B,), float64. Nothing here clamps: pass
images that are already in [0, 1], as a saved PNG would be.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["rgb_to_y", "psnr_y", "ssim_y", "radial_power_spectrum", "lsd_hf", "grid_p", "grid_pattern"]

_BT601_Y_WEIGHTS = (65.481, 128.553, 24.966)  # per unit of R, G, B in [0, 1], out of 255
_BT601_Y_OFFSET = 16.0

_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_K1, _SSIM_K2 = 0.01, 0.03

_GRID_BLUR_SIZE = 7  # 7x7 holds +-3 sigma of the sigma-1 Gaussian whose residual is the high band
_GRID_BLUR_SIGMA = 1.0

_POWER_FLOOR = 1e-20  # keeps log10 finite for flat images; far below any real image's power


def _check_image(image: Tensor, name: str) -> None:
    if not isinstance(image, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(image).__name__}")
    if image.ndim != 4 or image.shape[1] not in (1, 3):
        raise ValueError(
            f"{name} must be a BCHW batch with 1 (luma) or 3 (RGB) channels, got shape {tuple(image.shape)}"
        )
    if not image.is_floating_point():
        raise TypeError(f"{name} must be a float tensor in [0, 1], got dtype {image.dtype}")


def _check_pair(sr: Tensor, hr: Tensor, min_side: int) -> None:
    _check_image(sr, "sr")
    _check_image(hr, "hr")
    if sr.shape != hr.shape:
        raise ValueError(f"sr and hr must have the same shape, got {tuple(sr.shape)} and {tuple(hr.shape)}")
    if min(sr.shape[-2:]) < min_side:
        raise ValueError(
            f"images must be at least {min_side}x{min_side} pixels for this metric, got {sr.shape[-2]}x{sr.shape[-1]}"
        )


def rgb_to_y(image: Tensor) -> Tensor:
    """BT.601 studio-range luma of RGB images in [0, 1], as B1HW in [16/255, 235/255].

    This is MATLAB's ``rgb2ycbcr`` Y (the convention of SR papers since SRCNN), not the
    full-range Y of JPEG. A single-channel input is taken to be luma already and returned as is.
    """
    _check_image(image, "image")
    if image.shape[1] == 1:
        return image
    weights = torch.tensor(_BT601_Y_WEIGHTS, dtype=image.dtype, device=image.device)
    y = torch.einsum("bchw,c->bhw", image, weights) + _BT601_Y_OFFSET
    return (y / 255.0).unsqueeze(1)


def psnr_y(sr: Tensor, hr: Tensor) -> Tensor:
    """PSNR in dB on unrounded BT.601 luma with a peak of 1; ``inf`` for identical images.

    pyiqa adds 1e-8 to the MSE, which only matters for near-identical images (it caps PSNR at
    80 dB); we keep the exact value so that identical images read as infinitely close.
    """
    _check_pair(sr, hr, min_side=1)
    y_sr = rgb_to_y(sr.double())
    y_hr = rgb_to_y(hr.double())
    mse = (y_sr - y_hr).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(1.0 / mse)


def _gaussian_kernel_1d(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    offsets = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    kernel = torch.exp(-offsets.pow(2) / (2.0 * sigma**2))
    return kernel / kernel.sum()


def _valid_gaussian_filter(image: Tensor, kernel: Tensor) -> Tensor:
    """Gaussian-weighted local mean at every position where the whole window fits.

    The 2-D Gaussian is separable, so two 1-D passes give the same result as MATLAB's
    ``filter2(fspecial('gaussian', 11, 1.5), x, 'valid')`` at a fraction of the cost.
    """
    size = kernel.numel()
    image = F.conv2d(image, kernel.view(1, 1, size, 1))
    return F.conv2d(image, kernel.view(1, 1, 1, size))


def ssim_y(sr: Tensor, hr: Tensor) -> Tensor:
    """SSIM on BT.601 luma rounded to 8-bit levels; 1.0 for identical images."""
    _check_pair(sr, hr, min_side=_SSIM_WINDOW)
    x = (rgb_to_y(sr.double()) * 255.0).round()
    y = (rgb_to_y(hr.double()) * 255.0).round()
    c1 = (_SSIM_K1 * 255.0) ** 2
    c2 = (_SSIM_K2 * 255.0) ** 2
    kernel = _gaussian_kernel_1d(_SSIM_WINDOW, _SSIM_SIGMA, x.dtype, x.device)

    # One filtering pass over the five maps stacked along the batch axis.
    stacked = torch.cat([x, y, x * x, y * y, x * y], dim=1).flatten(0, 1).unsqueeze(1)
    filtered = _valid_gaussian_filter(stacked, kernel)
    moments = filtered.view(x.shape[0], 5, *filtered.shape[-2:])
    mu_x, mu_y, mean_xx, mean_yy, mean_xy = moments.unbind(dim=1)
    var_x = mean_xx - mu_x.pow(2)
    var_y = mean_yy - mu_y.pow(2)
    cov_xy = mean_xy - mu_x * mu_y

    luminance = (2.0 * mu_x * mu_y + c1) / (mu_x.pow(2) + mu_y.pow(2) + c1)
    contrast_structure = ((2.0 * cov_xy + c2) / (var_x + var_y + c2)).clamp(min=0.0)
    return (luminance * contrast_structure).mean(dim=(1, 2))


def radial_power_spectrum(luma: Tensor) -> Tensor:
    """Power spectrum of each B1HW luma image, averaged over rings of equal frequency.

    Returns (B, K + 1) with K = min(H, W) // 2: entry k is the mean power at radial frequency
    k / K of Nyquist, so entry K is Nyquist itself (corners beyond it are dropped). Frequencies
    are in cycles per pixel on both axes, so rings are true circles for non-square images too,
    and each frequency goes to the nearest ring. The image mean is removed first (ring 0 is 0).
    """
    _check_image(luma, "luma")
    if luma.shape[1] != 1:
        raise ValueError(f"luma must have 1 channel, got {luma.shape[1]}; use rgb_to_y first")
    batch, _, height, width = luma.shape
    rings = min(height, width) // 2
    luma = luma.double()
    centred = luma - luma.mean(dim=(2, 3), keepdim=True)
    power = torch.fft.fft2(centred[:, 0]).abs().pow(2) / (height * width)

    fy = torch.fft.fftfreq(height, dtype=torch.float64, device=luma.device).view(-1, 1)
    fx = torch.fft.fftfreq(width, dtype=torch.float64, device=luma.device).view(1, -1)
    radius = torch.sqrt(fy.pow(2) + fx.pow(2)) / 0.5  # 1.0 at Nyquist
    ring = torch.round(radius * rings).long().flatten()
    inside = ring <= rings
    ring = ring[inside]

    totals = torch.zeros(batch, rings + 1, dtype=torch.float64, device=luma.device)
    totals.index_add_(1, ring, power.flatten(1)[:, inside])
    counts = torch.bincount(ring, minlength=rings + 1).to(totals)
    return totals / counts


def lsd_hf(sr: Tensor, hr: Tensor, low: float = 1.0 / 8.0) -> Tensor:
    """High-band log-spectral distance of SR to ground truth; 0 is perfect, lower is better.

    Mean over rings from ``low`` x Nyquist up to Nyquist of
    ``|log10 P_sr(k) - log10 P_hr(k)|``, with P the radially averaged luma power spectrum. A
    value of 0.3 means the SR has, on average, twice or half the ground truth's power in a band.
    """
    _check_pair(sr, hr, min_side=16)
    if not 0.0 <= low < 1.0:
        raise ValueError(f"low must be a fraction of Nyquist in [0, 1), got {low}")
    p_sr = radial_power_spectrum(rgb_to_y(sr.double()))
    p_hr = radial_power_spectrum(rgb_to_y(hr.double()))
    rings = p_sr.shape[1] - 1
    first = max(1, math.ceil(low * rings))  # ring 0 is the removed mean
    log_sr = torch.log10(p_sr[:, first:] + _POWER_FLOOR)
    log_hr = torch.log10(p_hr[:, first:] + _POWER_FLOOR)
    return (log_sr - log_hr).abs().mean(dim=1)


def _reflect_gaussian_blur(luma: Tensor, size: int, sigma: float) -> Tensor:
    """Same-size Gaussian blur with reflect padding, so a constant image stays exactly constant."""
    kernel = _gaussian_kernel_1d(size, sigma, luma.dtype, luma.device)
    half = size // 2
    padded = F.pad(luma, (half, half, half, half), mode="reflect")
    return _valid_gaussian_filter(padded, kernel)


def grid_pattern(image: Tensor, p: int) -> tuple[Tensor, Tensor]:
    """The parts of ``grid_p`` per image: the mean-free p x p phase pattern of the luma's high band
    (B, p, p) and the band's RMS (B,). Unchecked and differentiable, so that the trainer's grid loss
    (``trainer/losses/grid.py``) penalises exactly what the benchmark measures."""
    batch, _, height, width = image.shape
    luma = rgb_to_y(image)[:, :, : height - height % p, : width - width % p]
    residual = luma - _reflect_gaussian_blur(luma, _GRID_BLUR_SIZE, _GRID_BLUR_SIGMA)
    rows, cols = residual.shape[-2] // p, residual.shape[-1] // p
    pattern = residual.reshape(batch, rows, p, cols, p).mean(dim=(1, 3))
    return pattern - pattern.mean(dim=(1, 2), keepdim=True), residual.pow(2).mean(dim=(1, 2, 3)).sqrt()


def grid_p(image: Tensor, p: int = 4) -> Tensor:
    """Strength of a p-periodic pattern in the luma's high band; about 0 for natural images.

    The high band r is luma minus its Gaussian blur (sigma 1). Averaging r over the p x p phase
    cells (pixel (i, j) goes to cell (i mod p, j mod p), after cropping H and W down to multiples
    of p) cancels everything that is not locked to the p-pixel grid, and leaves the pattern that
    is. The score is the RMS of that pattern (its mean removed) over the RMS of r, so it reads as
    the share of the high band that is grid, whatever the image's contrast or brightness.

    The pattern is signed: a fixed additive grid scores high, but blocks whose edges go up in one
    place and down in another (a nearest-neighbour upscale) average out and score low. Image
    content alone leaves a floor of about p / sqrt(H W), 0.008 for p = 4 on 512x512. A pattern
    of period q also shows at every multiple p of q (a 4 px grid scores the same at p = 8). A
    flat image has no high band and scores 0, but a nearly flat 8-bit one can score high: when
    the high band is a fraction of a grey level (a very blurry x4 upscale of a smooth photo), the
    rounding of its interpolated values is itself locked to the 4 px grid.
    """
    _check_image(image, "image")
    if not isinstance(p, int) or p < 2:
        raise ValueError(f"p must be an integer period of at least 2 pixels, got {p!r}")
    min_side = max(2 * p, _GRID_BLUR_SIZE)
    if min(image.shape[-2:]) < min_side:
        raise ValueError(
            f"images must be at least {min_side}x{min_side} pixels for grid_p with p={p}, "
            f"got {image.shape[-2]}x{image.shape[-1]}"
        )
    pattern, residual_rms = grid_pattern(image.double(), p)
    pattern_rms = pattern.pow(2).mean(dim=(1, 2)).sqrt()
    # Exactly flat images have r = 0 up to rounding; anything below 1e-12 of a unit is no band.
    has_band = residual_rms > 1e-12
    return torch.where(has_band, pattern_rms / residual_rms.where(has_band, torch.ones_like(residual_rms)), 0.0)
