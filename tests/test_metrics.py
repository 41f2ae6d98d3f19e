"""vpdsr.metrics: PSNR-Y / SSIM-Y conventions (pyiqa's), LSD-HF, grid_p, and input checks."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vpdsr.metrics import grid_p, lsd_hf, psnr_y, radial_power_spectrum, rgb_to_y, ssim_y


def textured(seed: int, size: int = 48, channels: int = 3) -> torch.Tensor:
    """A smooth random image in [0.1, 0.9]: noise, blurred, so SSIM windows see structure."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, channels, size + 4, size + 4, generator=gen)
    smooth = F.avg_pool2d(noise, 5, stride=1)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return 0.1 + 0.8 * smooth


def blurred(image: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(F.pad(image, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def test_y_is_bt601_studio_range() -> None:
    colours = torch.tensor([[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    y = rgb_to_y(colours.view(5, 3, 1, 1)).flatten()
    expected = torch.tensor([16, 235, 16 + 65.481, 16 + 128.553, 16 + 24.966], dtype=torch.float64) / 255
    assert torch.allclose(y, expected, atol=1e-12)


def test_y_passes_single_channel_through() -> None:
    luma = textured(0, channels=1)
    assert rgb_to_y(luma) is luma


def test_identical_images_score_perfectly() -> None:
    image = textured(1)
    assert math.isinf(psnr_y(image, image).item())
    assert ssim_y(image, image).item() == pytest.approx(1.0, abs=1e-12)
    assert lsd_hf(image, image).item() == 0.0


def test_psnr_of_a_known_mse() -> None:
    hr = torch.full((1, 1, 8, 8), 0.5, dtype=torch.float64)
    assert psnr_y(hr + 0.1, hr).item() == pytest.approx(20.0, abs=1e-6)  # MSE 0.01
    # A grey offset d in RGB moves studio Y by d * 219/255, which is what PSNR-Y sees.
    rgb = torch.full((1, 3, 8, 8), 0.5, dtype=torch.float64)
    expected = -20 * math.log10(0.1 * 219 / 255)
    assert psnr_y(rgb + 0.1, rgb).item() == pytest.approx(expected, abs=1e-9)


def test_ssim_rounds_luma_to_8_bit_levels() -> None:
    hr = torch.round(textured(2, channels=1) * 255) / 255
    sr = hr + 0.3 / 255  # under half a level: same uint8 image
    assert ssim_y(sr, hr).item() == 1.0
    assert math.isfinite(psnr_y(sr, hr).item())  # PSNR uses unrounded Y


@pytest.mark.parametrize("related", [True, False])
def test_ssim_matches_an_independent_implementation(related: bool) -> None:
    skimage_metrics = pytest.importorskip("skimage.metrics")
    hr = textured(3)
    gen = torch.Generator().manual_seed(2)
    sr = blurred(hr) + 0.03 * torch.randn(hr.shape, generator=gen) if related else textured(4)
    y_sr = np.round(rgb_to_y(sr.double())[0, 0].numpy() * 255)
    y_hr = np.round(rgb_to_y(hr.double())[0, 0].numpy() * 255)
    # Gaussian 11x11, sigma 1.5, population statistics; the mean is over the valid region (5 px
    # in from each side) and negative local scores count as 0, as in pyiqa.
    _, ssim_map = skimage_metrics.structural_similarity(
        y_sr, y_hr, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, full=True
    )
    reference = np.maximum(ssim_map[5:-5, 5:-5], 0.0).mean()
    assert ssim_map.min() < 0 or related  # the unrelated pair does exercise the clamp
    assert ssim_y(sr, hr).item() == pytest.approx(reference, abs=1e-9)


def test_ssim_is_symmetric_and_drops_with_noise() -> None:
    hr = textured(5)
    gen = torch.Generator().manual_seed(0)
    slightly = (hr + 0.02 * torch.randn(hr.shape, generator=gen)).clamp(0, 1)
    very = (hr + 0.2 * torch.randn(hr.shape, generator=gen)).clamp(0, 1)
    assert ssim_y(slightly, hr).item() == pytest.approx(ssim_y(hr, slightly).item(), abs=1e-12)
    assert 1.0 > ssim_y(slightly, hr).item() > ssim_y(very, hr).item() > 0.0


def test_metrics_score_each_image_of_a_batch() -> None:
    sr = torch.cat([textured(6), textured(7)])
    hr = torch.cat([textured(8), textured(9)])
    for metric in (psnr_y, ssim_y, lsd_hf):
        batch = metric(sr, hr)
        assert batch.shape == (2,) and batch.dtype == torch.float64
        singles = torch.cat([metric(sr[i : i + 1], hr[i : i + 1]) for i in range(2)])
        assert torch.allclose(batch, singles)


def test_lsd_hf_sees_lost_detail() -> None:
    hr = textured(10, size=64)
    assert lsd_hf(blurred(hr), hr).item() > 0.1


def test_lsd_hf_of_doubled_contrast_is_log10_of_4() -> None:
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 1, 64, 64, generator=gen, dtype=torch.float64)
    # Twice the amplitude is four times the power in every band.
    assert lsd_hf(0.5 + 0.2 * noise, 0.5 + 0.1 * noise).item() == pytest.approx(math.log10(4), abs=1e-9)


def test_radial_spectrum_puts_a_cosine_in_its_ring() -> None:
    x = torch.arange(64, dtype=torch.float64)
    stripes = (0.5 + 0.25 * torch.cos(2 * math.pi * 10 * x / 64)).expand(64, 64).reshape(1, 1, 64, 64)
    spectrum = radial_power_spectrum(stripes)
    assert spectrum.shape == (1, 33)
    assert spectrum[0].argmax().item() == 10
    assert spectrum[0, 0].item() == pytest.approx(0.0, abs=1e-20)  # mean removed


@pytest.mark.parametrize("metric", [psnr_y, ssim_y, lsd_hf])
def test_mismatched_shapes_are_named(metric: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    with pytest.raises(ValueError, match=r"same shape.*\(1, 3, 32, 32\).*\(1, 3, 32, 48\)"):
        metric(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 48))


def test_bad_inputs_are_explained() -> None:
    with pytest.raises(ValueError, match="1 \\(luma\\) or 3 \\(RGB\\) channels"):
        psnr_y(torch.rand(1, 4, 16, 16), torch.rand(1, 4, 16, 16))
    with pytest.raises(TypeError, match="float tensor"):
        psnr_y(torch.zeros(1, 3, 16, 16, dtype=torch.uint8), torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim_y(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="fraction of Nyquist"):
        lsd_hf(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32), low=1.5)


def test_psnr_and_ssim_agree_with_pyiqa_when_installed() -> None:
    pyiqa = pytest.importorskip("pyiqa")
    sr = torch.round(textured(11, size=64) * 255) / 255  # 8-bit images, as files give
    hr = torch.round(blurred(sr) * 255) / 255
    options = {"test_y_channel": True, "color_space": "ycbcr", "device": "cpu"}
    psnr_ref = pyiqa.create_metric("psnr", **options)(sr, hr).item()
    ssim_ref = pyiqa.create_metric("ssim", **options)(sr, hr).item()
    assert psnr_y(sr, hr).item() == pytest.approx(psnr_ref, abs=1e-3)  # pyiqa adds 1e-8 to the MSE
    # Luma exactly half-way between two levels rounds by float32 noise in pyiqa: a pixel or two.
    assert ssim_y(sr, hr).item() == pytest.approx(ssim_ref, abs=1e-4)


def periodic(period: int, size: int = 128, amplitude: float = 0.03) -> torch.Tensor:
    """A zero-mean pattern repeating every ``period`` pixels in both directions, 11HW."""
    gen = torch.Generator().manual_seed(period)
    cell = torch.randn(period, period, generator=gen, dtype=torch.float64)
    cell = amplitude * (cell - cell.mean()) / cell.std()
    reps = -(-size // period)
    return cell.repeat(reps, reps)[:size, :size].view(1, 1, size, size)


def noise_floor(p: int, size: int) -> float:
    """grid_p of content not locked to the grid: p x p cell means of N / p^2 samples each."""
    return p / size


@pytest.mark.parametrize("p", [4, 8])
def test_grid_of_random_noise_is_at_the_noise_floor(p: int) -> None:
    noise = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(p), dtype=torch.float64)
    score = grid_p(noise, p).item()
    assert 0.3 * noise_floor(p, 128) < score < 2.0 * noise_floor(p, 128)


def test_grid_sees_a_4_pixel_pattern_at_4_and_8_but_not_a_3_pixel_one() -> None:
    smooth = textured(20, size=128)
    with_4 = (smooth + periodic(4)).clamp(0, 1)
    with_3 = (smooth + periodic(3)).clamp(0, 1)
    # Smooth content has fewer independent samples than white noise, so a higher floor than p / N.
    assert grid_p(smooth, 4).item() < 0.15
    assert grid_p(with_4, 4).item() > 0.5
    assert grid_p(with_4, 8).item() > 0.5  # 8 is a multiple of 4: the pattern repeats in the 8x8 cells
    assert grid_p(with_3, 3).item() > 0.5
    assert grid_p(with_3, 4).item() < 0.15  # 3 and 4 are coprime: the pattern averages out


def test_grid_ignores_blocks_whose_edges_change_sign() -> None:
    # A nearest-neighbour x4 upscale is blocky, but its block edges step up as often as down, so
    # the signed 4x4 mean pattern cancels: grid_p flags a fixed pattern, not blockiness.
    small = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    blocky = F.interpolate(small, scale_factor=4, mode="nearest")
    for p in (4, 8):
        assert grid_p(blocky, p).item() < 2.0 * noise_floor(p, 128)


def test_grid_ignores_brightness_and_contrast() -> None:
    image = 0.2 + 0.5 * (textured(21, size=64) + periodic(4, size=64))
    base = grid_p(image, 4).item()
    assert grid_p(image + 0.15, 4).item() == pytest.approx(base, abs=1e-9)
    assert grid_p(0.5 * image, 4).item() == pytest.approx(base, abs=1e-9)


def test_grid_of_grey_rgb_equals_grid_of_its_luma() -> None:
    grey = textured(22, size=64, channels=1) + periodic(4, size=64)
    assert grid_p(grey.expand(1, 3, 64, 64), 4).item() == pytest.approx(grid_p(grey, 4).item(), abs=1e-9)


def test_grid_crops_to_whole_periods_first() -> None:
    image = textured(23, size=70)[:, :, :70, :67]
    assert grid_p(image, 4).item() == pytest.approx(grid_p(image[:, :, :68, :64], 4).item(), abs=1e-12)


def test_grid_of_a_flat_image_is_zero() -> None:
    assert grid_p(torch.full((2, 3, 16, 16), 0.4), 4).tolist() == [0.0, 0.0]


def test_grid_scores_each_image_of_a_batch() -> None:
    batch = torch.cat([textured(24, size=32), textured(25, size=32) + periodic(4, size=32)])
    scores = grid_p(batch, 4)
    assert scores.shape == (2,) and scores.dtype == torch.float64
    assert torch.allclose(scores, torch.cat([grid_p(batch[i : i + 1], 4) for i in range(2)]))


def test_grid_inputs_are_explained() -> None:
    with pytest.raises(ValueError, match="at least 2 pixels"):
        grid_p(torch.rand(1, 3, 16, 16), 1)
    with pytest.raises(ValueError, match="at least 16x16 pixels for grid_p with p=8"):
        grid_p(torch.rand(1, 3, 12, 32), 8)
    with pytest.raises(ValueError, match="1 \\(luma\\) or 3 \\(RGB\\) channels"):
        grid_p(torch.rand(1, 2, 16, 16))
