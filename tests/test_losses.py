"""Tests of trainer.losses on tiny random models: values, and where gradients go (and do not go)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from trainer.diffusion import LatentDiffusion, conditional_unet_config
from trainer.losses import (
    LOSSES,
    AdversarialLoss,
    DiffLoss,
    HFPLoss,
    ReconstructionLoss,
    SemanticLoss,
    StudentLoss,
    TeacherRegressionLoss,
    UNetDiscriminator,
    VSDLoss,
    discriminator_loss,
    generator_loss,
    grid_loss,
    hfp_loss,
    laplacian_bands,
    load_lpips,
    load_semantic_model,
    reconstruction_loss,
    vsd_target,
    wavelet_bands,
)
from trainer.losses.hfp import band_energy_loss
from trainer.losses.lpips import LPIPS
from vpdsr.backbones import build_backbone
from vpdsr.errors import ModelFileError
from vpdsr.semantics import SemanticModel


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from threads, and on a busy CPU spinning OpenMP threads make
    these tests many times slower; restored afterwards for the rest of the session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _f(t: torch.Tensor) -> float:
    return float(t.detach())


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _no_grads(module: torch.nn.Module) -> bool:
    return all(p.grad is None or not p.grad.any() for p in module.parameters())


def _has_grad(t: torch.Tensor) -> bool:
    return t.grad is not None and bool(t.grad.abs().sum() > 0)


@pytest.fixture(scope="module")
def sr_prior() -> LatentDiffusion:
    """An LR-conditioned tiny diffusion model (the teacher's shape), frozen."""
    torch.manual_seed(0)
    parts = build_backbone("tiny")
    unet = UNet2DConditionModel(**conditional_unet_config(parts.config))
    cond = torch.zeros(parts.config.prompt_embed_shape)
    return LatentDiffusion(parts.vae, unet, parts.config, lr_conditioned=True, cond=cond).requires_grad_(False).eval()


@pytest.fixture(scope="module")
def text_prior() -> LatentDiffusion:
    """A text-conditioned tiny diffusion model (the SD base's shape), frozen."""
    torch.manual_seed(1)
    parts = build_backbone("tiny")
    cond = torch.randn(parts.config.prompt_embed_shape)
    return (
        LatentDiffusion(
            parts.vae, parts.unet, parts.config, lr_conditioned=False, cond=cond, uncond=torch.zeros_like(cond)
        )
        .requires_grad_(False)
        .eval()
    )


@pytest.fixture(scope="module")
def semantic() -> SemanticModel:
    torch.manual_seed(0)
    return SemanticModel.from_config(tags=["dog", "cat", "tree", "car", "house"])


def _latents(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 8, 8, 8, generator=_gen(seed))


# ----------------------------------------------------------------------------- reconstruction, LPIPS


def test_reconstruction_values_and_module():
    a, b = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    assert reconstruction_loss(a, b, "l1") == pytest.approx(0.5)
    assert reconstruction_loss(a, b, "mse") == pytest.approx(0.25)
    assert ReconstructionLoss("mse")(a, b) == reconstruction_loss(a, b, "mse")
    sr = a.clone().requires_grad_()
    reconstruction_loss(sr, b).backward()
    assert _has_grad(sr)
    with pytest.raises(ValueError, match="same shape"):
        reconstruction_loss(a, b[..., :2])
    with pytest.raises(ValueError, match="kind"):
        reconstruction_loss(a, b, "l3")


def test_lpips_needs_user_weights():
    with pytest.raises(ModelFileError, match="lpips_vgg_path"):
        load_lpips(None, None)


def test_lpips_loads_weight_files_and_flows_gradients(tmp_path):
    torch.manual_seed(0)
    reference = LPIPS()
    vgg = {f"features.{k}": v for k, v in reference.features.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(1)  # a full torchvision file also has the classifier
    lins = {f"lin{i}.model.1.weight": lin.weight.abs().detach() for i, lin in enumerate(reference.lins)}
    save_file(vgg, str(tmp_path / "vgg16.safetensors"))
    torch.save(lins, tmp_path / "vgg.pth")
    model = load_lpips(tmp_path / "vgg16.safetensors", tmp_path / "vgg.pth")
    assert torch.equal(model.features[0].weight, reference.features[0].weight)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    assert _f(model(x, x)) == pytest.approx(0.0, abs=1e-6)
    d = model(x, y)
    assert d.shape == (1,) and _f(d) > 0
    d.sum().backward()
    assert _has_grad(y) and _no_grads(model)
    torch.save({"lin0.model.1.weight": torch.zeros(1, 3, 1, 1)}, tmp_path / "bad.pth")
    with pytest.raises(ModelFileError, match="bad.pth"):
        load_lpips(tmp_path / "vgg16.safetensors", tmp_path / "bad.pth")


# ----------------------------------------------------------------------------- HFP


@pytest.mark.parametrize("split", [laplacian_bands, wavelet_bands])
def test_bands_ignore_flat_offsets_and_see_fine_detail(split):
    x = torch.rand(2, 3, 32, 32, generator=_gen())
    bands = split(x, 3)
    assert len(bands) == 3
    assert bands[0].shape[-1] in (32, 16) and bands[1].shape[-1] < bands[0].shape[-1]
    offset = [b1 - b0 for b0, b1 in zip(bands, split(x + 0.1, 3), strict=True)]
    assert max(_f(b.abs().max()) for b in offset) < 1e-5


def test_hfp_loss_weights_high_frequencies():
    x = torch.rand(1, 3, 32, 32, generator=_gen())
    assert _f(hfp_loss(x + 0.1, x)) < 1e-5  # same detail, other brightness: nothing to fix
    noisy = x + 0.1 * torch.randn(x.shape, generator=_gen(1))
    for bands in ("laplacian", "wavelet", "both"):
        assert _f(hfp_loss(noisy, x, bands)) > 0.01
    with pytest.raises(ValueError, match="too small"):
        hfp_loss(x[..., :4, :4], x[..., :4, :4], levels=3)
    with pytest.raises(ValueError, match="bands"):
        hfp_loss(x, x, "fourier")


def test_band_energy_loss_asks_for_detail_not_its_exact_phase():
    hr = torch.rand(1, 1, 64, 64, generator=_gen()) * 2 - 1  # white-noise texture, all detail
    shifted = torch.roll(hr, shifts=(3, 5), dims=(2, 3))  # the same texture, out of place
    blurred = torch.nn.functional.avg_pool2d(hr, 5, stride=1, padding=2).requires_grad_()
    assert _f(band_energy_loss(shifted, hr)) < 0.02 < _f(hfp_loss(shifted, hr))
    assert _f(band_energy_loss(blurred, hr)) > 5 * _f(band_energy_loss(shifted, hr))
    band_energy_loss(blurred, hr).backward()  # a step down the gradient sharpens the blur
    sharper = blurred.detach() - 0.5 * blurred.grad / blurred.grad.abs().max()
    assert _f(band_energy_loss(sharper, hr)) < _f(band_energy_loss(blurred, hr))
    plain, with_energy = HFPLoss("laplacian", 3), HFPLoss("laplacian", 3, energy_weight=2.0)
    assert _f(with_energy(blurred, hr)) == pytest.approx(
        _f(plain(blurred, hr)) + 2.0 * _f(band_energy_loss(blurred, hr)), rel=1e-5
    )


def test_hfp_module_pixel_and_clip_terms(semantic):
    hr = torch.rand(2, 3, 32, 32, generator=_gen()) * 2 - 1
    sr = (hr + 0.2 * torch.randn(hr.shape, generator=_gen(1))).requires_grad_()
    pixel_only = HFPLoss("laplacian", 3)
    with_clip = HFPLoss("laplacian", 3, semantic=semantic, clip_weight=1.0)
    assert _f(with_clip(sr, hr)) > _f(pixel_only(sr, hr))
    with_clip(sr, hr).backward()
    assert _has_grad(sr) and _no_grads(semantic)
    with pytest.raises(ValueError, match="clip.path"):
        HFPLoss(clip_weight=1.0)


# ----------------------------------------------------------------------------- ESS


def test_ess_needs_a_real_clip_path():
    with pytest.raises(ModelFileError, match="clip.path"):
        load_semantic_model(None, None, None, "the ESS loss")


def test_ess_terms_and_gradients(semantic):
    hr = torch.rand(2, 3, 32, 32, generator=_gen()) * 2 - 1
    loss = SemanticLoss(semantic)
    same = loss(hr, hr)
    assert _f(same["cosine"]) == pytest.approx(0.0, abs=1e-5)
    assert _f(same["kl"]) == pytest.approx(0.0, abs=1e-5)
    sr = torch.rand(2, 3, 32, 32, generator=_gen(5)).mul(2).sub(1).requires_grad_()
    terms = loss(sr, hr)
    assert _f(terms["cosine"]) > 0
    (terms["cosine"] + terms["kl"]).backward()
    assert _has_grad(sr) and _no_grads(semantic)


# ----------------------------------------------------------------------------- VSD


def test_vsd_target_steps_from_fake_towards_real():
    z = torch.zeros(1, 1, 2, 2)
    real, fake = torch.ones_like(z), torch.full_like(z, 3.0)
    target = vsd_target(z, real, fake)
    # normalised by |z - real| = 1: one step of (fake - real) = 2, taken away from fake
    assert torch.allclose(target, torch.full_like(z, -2.0))


@pytest.mark.parametrize("prior_name", ["sr_prior", "text_prior"])
def test_vsd_starts_at_zero_and_then_pulls_the_student(prior_name, request):
    prior = request.getfixturevalue(prior_name)
    torch.manual_seed(0)
    vsd = VSDLoss(prior, guidance=1.0, lora_rank=2)
    z_lr = _latents(seed=1) if prior.lr_conditioned else None
    z = _latents().requires_grad_()
    # the fake adapter starts as a no-op: fake == real, nothing to distil yet...
    assert _f(vsd(z, z_lr, _gen())) < 1e-10
    # ...unless guidance sharpens the real branch (the fake model is never guided)
    vsd.guidance = 3.0
    assert _f(vsd(z, z_lr, _gen())) > 0
    assert all("lora_" in n for n, p in vsd.fake_unet.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for p in vsd.fake_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=_gen(2)))
    loss = vsd(z, z_lr, _gen())
    assert _f(loss) > 0
    loss.backward()
    assert _has_grad(z)
    assert _no_grads(prior) and _no_grads(vsd.fake_unet)  # the student's term never trains the fake


def test_vsd_fake_loss_trains_only_the_fake_adapter(sr_prior):
    torch.manual_seed(0)
    vsd = VSDLoss(sr_prior, lora_rank=2)
    z = _latents().requires_grad_()
    loss = vsd.fake_loss(z, _latents(seed=1), _gen())
    assert math.isfinite(_f(loss))
    loss.backward()
    assert z.grad is None  # the student's latents are detached for the fake's own loss
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vsd.fake_parameters())
    assert _no_grads(sr_prior)


# ----------------------------------------------------------------------------- regression


def test_regression_onto_teacher_output(sr_prior, text_prior):
    loss_fn = TeacherRegressionLoss(sr_prior, steps=2)
    z_lr = _latents(seed=1)
    target = sr_prior.sample(z_lr, 2, _gen(7))
    assert _f(loss_fn(target, z_lr, _gen(7))) == pytest.approx(0.0, abs=1e-10)  # same draw, same target
    z = _latents().requires_grad_()
    loss = loss_fn(z, z_lr, _gen(7))
    assert _f(loss) > 0
    loss.backward()
    assert _has_grad(z) and _no_grads(sr_prior)
    with pytest.raises(ValueError, match="LR-conditioned"):
        TeacherRegressionLoss(text_prior)


# ----------------------------------------------------------------------------- DiffLoss


@pytest.mark.parametrize("prior_name", ["sr_prior", "text_prior"])
def test_diffloss_gradients_flow_through_the_frozen_unet(prior_name, request):
    prior = request.getfixturevalue(prior_name)
    loss_fn = DiffLoss(prior, t_min=50, t_max=500, feature_weight=1.0)
    z_lr = _latents(seed=1) if prior.lr_conditioned else None
    z_hr = _latents(seed=2)
    assert _f(loss_fn(z_hr.clone(), z_hr, z_lr, _gen())) == pytest.approx(0.0, abs=1e-10)
    z_sr = _latents().requires_grad_()
    hr = z_hr.clone().requires_grad_()
    loss = loss_fn(z_sr, hr, z_lr, _gen())
    assert _f(loss) > 0
    loss.backward()
    assert _has_grad(z_sr)  # the whole point: no no_grad on the SR branch
    assert hr.grad is None  # HR is a fixed target
    assert _no_grads(prior)


# ----------------------------------------------------------------------------- adversarial


def test_adversarial_objectives():
    real, fake = [torch.full((1, 1, 2, 2), 2.0)], [torch.full((1, 1, 2, 2), -2.0)]
    assert _f(discriminator_loss(real, fake, "hinge")) == 0.0
    assert _f(generator_loss(fake, "hinge")) == 2.0
    ns = _f(discriminator_loss(real, fake, "non_saturating"))
    assert ns == pytest.approx(2 * math.log1p(math.exp(-2.0)))
    assert _f(generator_loss(fake, "non_saturating")) == pytest.approx(math.log1p(math.exp(2.0)))
    with pytest.raises(ValueError):
        generator_loss(fake, "wasserstein")


def test_unet_discriminator_is_spectral_normed_and_per_pixel():
    d = UNetDiscriminator(3, 8)
    assert any("parametrizations" in n for n, _ in d.named_parameters())
    assert d(torch.rand(2, 3, 40, 24)).shape == (2, 1, 40, 24)


@pytest.mark.parametrize("kind", ["pixel_unet", "prior_features"])
def test_adversarial_gradients_go_to_the_right_side(kind, sr_prior):
    torch.manual_seed(0)
    adv = AdversarialLoss(kind, "hinge", channels=8, prior=sr_prior, t_min=0, t_max=500)
    sr = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    z_sr = _latents().requires_grad_()
    z_lr = _latents(seed=1)
    g = adv.generator_loss(sr, z_sr, z_lr, _gen())
    g.backward()
    student_input = sr if kind == "pixel_unet" else z_sr
    assert _has_grad(student_input)
    assert _no_grads(adv.discriminator) and _no_grads(sr_prior)
    assert all(p.requires_grad for p in adv.discriminator.parameters())  # unfrozen again afterwards
    sr.grad = z_sr.grad = None
    d = adv.discriminator_loss(sr, torch.rand(2, 3, 32, 32) * 2 - 1, z_sr, _latents(seed=3), z_lr, _gen())
    d.backward()
    assert sr.grad is None and z_sr.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adv.discriminator.parameters())
    assert _no_grads(sr_prior)


def test_prior_features_discriminator_needs_a_prior():
    with pytest.raises(ValueError, match="prior"):
        AdversarialLoss("prior_features")


# ----------------------------------------------------------------------------- registry


def test_losses_register_in_the_order_the_student_builds_them():
    """The import list of trainer/losses/__init__.py is the build and sum order: building draws random
    numbers, so reordering it would train the committed configs differently."""
    builtin = ["reconstruction", "hfp", "sr_teacher", "semantic", "regression", "vsd", "diffloss", "adversarial", "grid"]
    assert list(LOSSES)[: len(builtin)] == builtin
    assert all(LOSSES[key].__module__ == f"trainer.losses.{key}" for key in builtin)  # <key>.py holds loss <key>


def test_a_loss_key_registers_once_and_needs_a_dataclass_config():
    with pytest.raises(TypeError, match="two losses register as 'vsd'"):

        class Again(StudentLoss, key="vsd", config=LOSSES["vsd"].config_class):
            pass

    with pytest.raises(TypeError, match="must be a dataclass"):

        class Untyped(StudentLoss, key="untyped", config=dict):
            pass

    assert "untyped" not in LOSSES and LOSSES["vsd"].__name__ == "VSDTerm"


def test_grid_loss_sees_a_fixed_4px_pattern_and_training_on_it_removes_it():
    """The grid loss is zero when the output's 4 px phase pattern is the target's, rises with an
    added fixed pattern, and its gradient alone removes that pattern; a flat crop stays finite."""
    from vpdsr.metrics import grid_p

    torch.manual_seed(0)
    target = torch.rand(2, 3, 64, 64) * 2 - 1
    assert grid_loss(target, target).item() < 1e-5
    grid = torch.zeros(1, 1, 4, 4)
    grid[..., 0, :] = -0.1  # the decoder's darker first row of every 4x4 cell
    sr = (target + grid.repeat(1, 1, 16, 16)).requires_grad_(True)
    before = grid_loss(sr, target)
    assert before.item() > 0.05
    optimizer = torch.optim.SGD([sr], lr=20.0)
    for _ in range(50):
        optimizer.zero_grad()
        grid_loss(sr, target).backward()
        optimizer.step()
    assert grid_loss(sr, target).item() < before.item() / 4
    assert grid_p((sr.detach() + 1) / 2).mean() < grid_p((target + grid.repeat(1, 1, 16, 16) + 1) / 2).mean()
    flat = torch.zeros(1, 3, 32, 32)
    assert torch.isfinite(grid_loss(flat + 1e-4 * torch.randn_like(flat), flat))
    with pytest.raises(ValueError, match="same shape"):
        grid_loss(flat, target)
