"""Tests of trainer.degradations: each op, the kernels, the full pipeline and the preview."""

from __future__ import annotations

import json
import math
import typing

import pytest
import torch
from PIL import Image

from trainer.degradations import (
    KERNEL_KINDS,
    DegradationConfig,
    FinalConfig,
    KernelConfig,
    KernelParams,
    RandomDegradation,
    Stage2Config,
    StageConfig,
    add_gaussian_noise,
    add_poisson_noise,
    apply_blur,
    apply_degradation,
    apply_jpeg,
    apply_resize,
    degrade,
    make_kernels,
    quantize_8bit,
    sample_degradation,
    sample_final_sinc,
    sample_kernels,
    write_degrade_preview,
)

FIELDS = ("size", "sigma_x", "sigma_y", "theta", "beta", "omega")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def image(b: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random images: a blurred noise field, so blur and JPEG have something to change."""
    x = torch.rand(b, 3, size // 8, size // 8, generator=gen(seed))
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic").clamp(0, 1)


def kernel_params(
    kind: str,
    n: int = 1,
    size: int = 21,
    sx: float = 1.5,
    sy: float = 1.5,
    theta: float = 0.0,
    beta: float = 1.0,
    omega: float = 1.0,
) -> KernelParams:
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    return KernelParams((kind,) * n, torch.full((n,), size), full(sx), full(sy), full(theta), full(beta), full(omega))


def second_moments(k: torch.Tensor) -> torch.Tensor:
    half = k.shape[-1] // 2
    axis = torch.arange(-half, half + 1, dtype=k.dtype)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([(k * x * x).sum(), (k * y * y).sum(), (k * x * y).sum()])


# ----------------------------------------------------------------------------- config


def test_default_config_matches_realesrnet_x4plus():
    cfg = DegradationConfig()
    s1, s2 = cfg.stage1, cfg.stage2
    assert s1.kernel.kernel_prob == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert (s1.kernel.sinc_prob, s1.kernel.betag, s1.kernel.betap) == (0.1, (0.5, 4.0), (1.0, 2.0))
    assert (s1.blur_prob, s1.kernel.sigma, s2.blur_prob, s2.kernel.sigma) == (1.0, (0.2, 3.0), 0.8, (0.2, 1.5))
    assert (s1.resize_prob, s1.resize_range, s2.resize_prob, s2.resize_range) == (
        (0.2, 0.7, 0.1),
        (0.15, 1.5),
        (0.3, 0.4, 0.3),
        (0.3, 1.2),
    )
    assert (s1.noise_sigma, s2.noise_sigma, s1.poisson_scale, s2.poisson_scale) == (
        (1.0, 30.0),
        (1.0, 25.0),
        (0.05, 3.0),
        (0.05, 2.5),
    )
    assert s1.gray_noise_prob == s2.gray_noise_prob == 0.4
    assert s1.jpeg_quality == s2.jpeg_quality == (30.0, 95.0)
    assert cfg.final.sinc_prob == 0.8


def test_stage2_defaults_live_in_its_type():
    # A loader that builds stage2 from a partial YAML section must keep the stage-2 defaults.
    hints = typing.get_type_hints(DegradationConfig)
    partial = hints["stage2"](blur_prob=0.5, kernel=typing.get_type_hints(hints["stage2"])["kernel"](sinc_prob=0.2))
    assert partial.noise_sigma == (1.0, 25.0) and partial.kernel.sigma == (0.2, 1.5)
    assert DegradationConfig().stage2 == Stage2Config()


def test_config_accepts_yaml_lists_and_rejects_bad_values():
    assert KernelConfig(sigma=[0.5, 1.0]).sigma == (0.5, 1.0)
    with pytest.raises(ValueError, match="sigma"):
        KernelConfig(sigma=(2.0, 1.0))
    with pytest.raises(ValueError, match="kernel_prob"):
        KernelConfig(kernel_prob=(0.5, 0.5))
    with pytest.raises(ValueError, match="kernel_list"):
        KernelConfig(kernel_list=("gauss",), kernel_prob=(1.0,))
    with pytest.raises(ValueError, match="odd"):
        KernelConfig(sizes=(7, 20))
    with pytest.raises(ValueError, match="resize_prob"):
        StageConfig(resize_prob=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="resize_modes"):
        StageConfig(resize_modes=("lanczos",))
    with pytest.raises(ValueError, match="jpeg_quality"):
        StageConfig(jpeg_quality=(0.0, 120.0))
    with pytest.raises(ValueError, match="sinc_prob"):
        FinalConfig(sinc_prob=1.5)


# ----------------------------------------------------------------------------- kernels


def test_sampled_kernels_sum_to_one_and_stay_in_their_window():
    params = sample_kernels(KernelConfig(sinc_prob=0.3), 64, gen(1))
    k = make_kernels(params)
    assert k.shape == (64, 21, 21) and k.dtype == torch.float32
    torch.testing.assert_close(k.sum(dim=(-2, -1)), torch.ones(64), atol=1e-5, rtol=0)
    for i in range(64):
        r = (21 - int(params.size[i])) // 2
        if r:
            assert k[i, :r].abs().sum() == 0 and k[i, :, -r:].abs().sum() == 0
    assert set(params.kind) <= set(KERNEL_KINDS) and len(set(params.kind)) >= 4


def test_isotropic_gaussian_has_its_sigma():
    k = make_kernels(kernel_params("iso", sx=1.5, sy=1.5), dtype=torch.float64)[0]
    mxx, myy, mxy = second_moments(k)
    assert mxx == pytest.approx(1.5**2, rel=1e-3) and myy == pytest.approx(1.5**2, rel=1e-3)
    assert mxy == pytest.approx(0.0, abs=1e-9)


def test_anisotropic_gaussian_is_rotated():
    # sigma 3 along an axis at 90 degrees: the long axis becomes vertical.
    k = make_kernels(kernel_params("aniso", sx=3.0, sy=1.0, theta=math.pi / 2), dtype=torch.float64)[0]
    mxx, myy, mxy = second_moments(k)
    assert myy == pytest.approx(9.0, rel=0.05) and mxx == pytest.approx(1.0, rel=0.05)
    k45 = make_kernels(kernel_params("aniso", sx=3.0, sy=1.0, theta=math.pi / 4), dtype=torch.float64)[0]
    assert second_moments(k45)[2] > 1.0  # positive x-y covariance on the diagonal


def test_plateau_and_generalized_shapes():
    g = make_kernels(kernel_params("iso"))[0]
    flat = make_kernels(kernel_params("generalized_iso", beta=4.0))[0]
    heavy = make_kernels(kernel_params("generalized_iso", beta=0.5))[0]
    plateau = make_kernels(kernel_params("plateau_iso", beta=2.0))[0]

    def rel(k, col):  # value at (10, col) relative to the centre
        return k[10, col] / k[10, 10]

    assert rel(flat, 11) > rel(g, 11)  # flat top: the neighbour is nearly as high as the centre
    assert rel(heavy, 0) > rel(g, 0) and rel(plateau, 0) > rel(g, 0)  # heavier tails than a Gaussian
    assert plateau[10, 10] == plateau.max()


def test_sinc_and_identity_kernels():
    sinc = make_kernels(kernel_params("sinc", omega=math.pi / 4), dtype=torch.float64)[0]
    assert sinc[10, 10] == sinc.max()
    torch.testing.assert_close(sinc, sinc.T)
    torch.testing.assert_close(sinc, sinc.flip(0))
    assert (sinc < 0).any()  # the ringing lobes that make sinc kernels model overshoot artifacts
    ident = make_kernels(kernel_params("identity"))[0]
    assert ident[10, 10] == 1 and ident.sum() == 1


def test_kernel_sampling_is_seeded_and_follows_probabilities():
    cfg = KernelConfig()
    a, b, c = sample_kernels(cfg, 16, gen(5)), sample_kernels(cfg, 16, gen(5)), sample_kernels(cfg, 16, gen(6))
    assert a.kind == b.kind and all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)
    assert not all(torch.equal(getattr(a, f), getattr(c, f)) for f in FIELDS)
    assert all(k == "identity" for k in sample_kernels(cfg, 8, gen(), blur_prob=0.0).kind)
    sinc = sample_kernels(KernelConfig(sinc_prob=1.0), 200, gen())
    assert all(k == "sinc" for k in sinc.kind)
    small = sinc.size < 13
    assert (sinc.omega[small] >= math.pi / 3 - 1e-6).all() and (sinc.omega[~small] >= math.pi / 5 - 1e-6).all()
    assert set(sinc.size.tolist()) == set(range(7, 22, 2))
    iso = sample_kernels(KernelConfig(kernel_list=("iso",), kernel_prob=(1.0,), sinc_prob=0.0), 8, gen())
    assert torch.equal(iso.sigma_x, iso.sigma_y) and (iso.theta == 0).all()


def test_final_sinc_sampling():
    p = sample_final_sinc(FinalConfig(sinc_prob=0.5), 200, gen())
    assert set(p.kind) == {"sinc", "identity"}
    assert (p.omega >= math.pi / 3 - 1e-6).all() and (p.omega <= math.pi).all()


def test_make_kernels_rejects_inconsistent_params():
    p = kernel_params("iso", n=2)
    p.sigma_x = torch.ones(3)
    with pytest.raises(ValueError, match=r"sigma_x must have shape \(2,\)"):
        make_kernels(p)
    with pytest.raises(ValueError, match="unknown kernel kinds"):
        make_kernels(kernel_params("box"))


# ----------------------------------------------------------------------------- ops


def test_blur_per_sample_kernels():
    x = image()
    kernels = torch.stack([make_kernels(kernel_params("identity"))[0], make_kernels(kernel_params("iso", sx=3.0))[0]])
    out = apply_blur(x, kernels)
    assert out.shape == x.shape
    torch.testing.assert_close(out[0], x[0])
    assert (out[1] - x[1]).abs().mean() > 1e-3
    flat = torch.full((1, 3, 8, 8), 0.3)  # smaller than the kernel's half-width: edge replication path
    torch.testing.assert_close(apply_blur(flat, kernels[1]), flat)


def test_blur_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\), got \(3, 64, 64\)"):
        apply_blur(torch.rand(3, 64, 64), torch.ones(1, 3, 3) / 9)
    with pytest.raises(ValueError, match=r"kernels must have shape \(2, k, k\)"):
        apply_blur(image(), torch.ones(3, 5, 5) / 25)


def test_resize():
    x = image()
    for mode in ("area", "bilinear", "bicubic"):
        assert apply_resize(x, (16, 24), mode).shape == (2, 3, 16, 24)
    with pytest.raises(ValueError, match="resize mode"):
        apply_resize(x, (16, 16), "lanczos")


def test_gaussian_noise():
    x = torch.full((2, 3, 64, 64), 0.5)
    sigma = torch.tensor([10 / 255, 20 / 255])
    out = add_gaussian_noise(x, sigma, torch.tensor([False, True]), gen(1))
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert (out[0] - x[0]).std().item() == pytest.approx(10 / 255, rel=0.05)
    assert (out[1] - x[1]).std().item() == pytest.approx(20 / 255, rel=0.05)
    assert torch.equal(out[1, 0], out[1, 2]) and not torch.equal(out[0, 0], out[0, 2])
    again = add_gaussian_noise(x, sigma, torch.tensor([False, True]), gen(1))
    other = add_gaussian_noise(x, sigma, torch.tensor([False, True]), gen(2))
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_poisson_noise():
    x = torch.full((2, 3, 64, 64), 0.5)
    scale = torch.tensor([1.0, 2.0])
    out = add_poisson_noise(x, scale, torch.tensor([False, True]), gen(1))
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    shot = math.sqrt(0.5 * 255) / 255  # std of a count with mean 127.5, in [0, 1] units
    assert (out[0] - 0.5).std().item() == pytest.approx(shot, rel=0.05)
    assert (out[1] - 0.5).std().item() == pytest.approx(2 * shot, rel=0.05)
    assert torch.equal(out[1, 0], out[1, 1]) and not torch.equal(out[0, 0], out[0, 1])
    black = add_poisson_noise(torch.zeros(2, 3, 8, 8), scale, torch.tensor([False, False]), gen())
    assert black.abs().max() == 0  # shot noise vanishes where no light falls
    assert torch.equal(out, add_poisson_noise(x, scale, torch.tensor([False, True]), gen(1)))


def test_noise_rejects_wrong_parameter_count():
    with pytest.raises(ValueError, match=r"sigma must have shape \(2,\)"):
        add_gaussian_noise(image(), torch.ones(3), torch.zeros(2, dtype=torch.bool), gen())


def test_jpeg_quality_orders_damage():
    x = image(2, 64)
    out = apply_jpeg(x, torch.tensor([95.0, 10.0]))
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    err = (out - x).abs().mean(dim=(1, 2, 3))
    assert 0 < err[0] < err[1]
    odd = apply_jpeg(torch.rand(1, 3, 13, 21), torch.tensor([50.0]))  # sizes off the 8/16 grid
    assert odd.shape == (1, 3, 13, 21)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        apply_jpeg(torch.rand(1, 1, 16, 16), torch.tensor([50.0]))


def test_quantize_8bit():
    q = quantize_8bit(torch.tensor([-0.2, 0.1234, 0.5, 1.3]))
    torch.testing.assert_close(q * 255, (q * 255).round())
    assert q.min() == 0 and q.max() == 1


# ----------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("scale", [4, 2])
def test_degrade_shape_range_and_8bit_levels(scale):
    hr = image(2, 64)
    lr, params = degrade(hr, DegradationConfig(), gen(), scale=scale)
    assert lr.shape == (2, 3, 64 // scale, 64 // scale) and lr.dtype == torch.float32
    assert 0 <= lr.min() and lr.max() <= 1
    torch.testing.assert_close(lr * 255, (lr * 255).round())
    assert params.batch_size == 2 and params.scale == scale


def test_degrade_non_square():
    lr, _ = degrade(image(1, 64)[..., :48], DegradationConfig(), gen())
    assert lr.shape == (1, 3, 16, 12)


def test_degrade_is_reproducible_from_seed_and_params():
    hr, cfg = image(2, 64), DegradationConfig()
    lr_a, params_a = degrade(hr, cfg, gen(7))
    lr_b, params_b = degrade(hr, cfg, gen(7))
    lr_c, _ = degrade(hr, cfg, gen(8))
    assert torch.equal(lr_a, lr_b) and params_a.to_dict() == params_b.to_dict()
    assert not torch.equal(lr_a, lr_c)
    assert torch.equal(apply_degradation(hr, params_a), lr_a)
    json.dumps(params_a.to_dict())  # loggable as is


def test_strong_downscale_path_on_tiny_images():
    # Always the strongest first-stage downscale: 64 px -> 9 px, smaller than a 21-tap kernel.
    params = sample_degradation(DegradationConfig(), 2, gen())
    params.stage1.resize_scale = 0.15
    params.stage2.kernel = sample_kernels(KernelConfig(sizes=(21, 21)), 2, gen())
    lr = apply_degradation(image(2, 64), params)
    assert lr.shape == (2, 3, 16, 16) and 0 <= lr.min() and lr.max() <= 1


def test_module_equals_function():
    hr, cfg = image(2, 64), DegradationConfig()
    lr_m, params_m = RandomDegradation(cfg, scale=4)(hr, gen(3))
    lr_f, params_f = degrade(hr, cfg, gen(3), scale=4)
    assert torch.equal(lr_m, lr_f) and params_m.to_dict() == params_f.to_dict()


def test_degrade_input_errors():
    cfg = DegradationConfig()
    with pytest.raises(ValueError, match=r"hr must have shape \(B, 3, H, W\), got \(2, 1, 64, 64\)"):
        degrade(torch.rand(2, 1, 64, 64), cfg, gen())
    with pytest.raises(ValueError, match="multiples of scale 4, got 62x64"):
        degrade(torch.rand(1, 3, 62, 64), cfg, gen())
    with pytest.raises(TypeError, match="float tensor"):
        degrade(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), cfg, gen())
    with pytest.raises(ValueError, match="scale must be an integer"):
        degrade(image(1), cfg, gen(), scale=0)
    params = sample_degradation(cfg, 3, gen())
    with pytest.raises(ValueError, match="batch size 2 but params were sampled for batch size 3"):
        apply_degradation(image(2), params)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_degrade_other_input_dtypes(dtype):
    # Computed in float32 whatever comes in; half inputs differ only by their own rounding.
    hr = image(1, 64)
    lr, params = degrade(hr.to(dtype), DegradationConfig(), gen(4))
    assert lr.dtype == torch.float32
    assert (lr - apply_degradation(hr.to(dtype).float(), params)).abs().max() == 0


def test_kernels_in_requested_dtype():
    k = make_kernels(kernel_params("sinc", n=2), device="cpu", dtype=torch.float16)
    assert k.dtype == torch.float16 and k.shape == (2, 21, 21)


def test_params_are_device_independent_draws():
    # Parameters always come back on the CPU, whatever device the batch will run on.
    params = sample_degradation(DegradationConfig(), 2, gen())
    assert params.stage1.kernel.sigma_x.device.type == "cpu"


# ----------------------------------------------------------------------------- preview


def test_preview_from_tensors_and_files(tmp_path):
    src = tmp_path / "photo.png"
    Image.fromarray((image(1, 80)[0].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(src)
    out = write_degrade_preview(
        [image(1, 64)[0], src], DegradationConfig(), tmp_path / "p" / "prev.png", seed=1, crop_size=64
    )
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width == 3 * 64 + 8 and img.height > 2 * 64
    with pytest.raises(ValueError, match="multiple of scale"):
        write_degrade_preview([src], DegradationConfig(), tmp_path / "x.png", crop_size=66)
