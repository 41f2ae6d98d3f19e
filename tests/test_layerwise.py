"""The layer-by-layer runner equals the untiled diffusers forward at any tile size, with device
memory bounded by the tile (vpdsr/layerwise.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests.sd_fixtures import TINY_SD2
from vpdsr import layerwise as lw
from vpdsr.backbones import build_backbone
from vpdsr.errors import Cancelled
from vpdsr.lora import UNET_TARGET_SUFFIXES, LoraSpec, add_lora, default_lora_targets
from vpdsr.model import OneStepStudent, predicted_x0

# an SD-style f8 VAE at toy width: four DownEncoderBlock2D/UpDecoderBlock2D and mid-block attention
TOY_F8_VAE = {
    "act_fn": "silu", "block_out_channels": [8, 16, 16, 16], "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 64,
}  # fmt: skip


def _randomise(*modules: torch.nn.Module) -> None:
    """Perturb every weight, zero-initialised ones (the refiner's last conv, LoRA B) included."""
    with torch.no_grad():
        for p in (p for m in modules for p in m.parameters()):
            p.add_(torch.randn_like(p) * 0.05)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    parts = build_backbone("tiny-v3")  # tiny-v2 plus the refiner: the same VAE and UNet
    _randomise(parts.vae, parts.unet)
    return parts.vae.eval(), parts.unet.eval(), parts.config


@pytest.fixture(scope="module")
def toy_sd():
    torch.manual_seed(1)
    vae, unet = AutoencoderKL(**TOY_F8_VAE), UNet2DConditionModel(**TINY_SD2["unet"])
    _randomise(vae, unet)
    return vae.eval(), unet.eval()


def _check(out: torch.Tensor, ref: torch.Tensor, tile: int, size: int) -> None:
    """One tile reproduces the untiled call bit for bit; more agree to float32 rounding."""
    if tile <= 0 or tile >= size:
        assert torch.equal(out, ref)
    err, scale = (out - ref).abs().max().item(), max(1.0, ref.abs().max().item())
    assert err <= 1e-5 * scale, f"tile {tile}: max abs error {err:.3g} at output scale {scale:.3g}"


# sizes: a 252x188 output (1000x744 at a quarter of the side, odd latents 63x47) for the f4 tiny
# VAE; 248x184 (latent 31x23) for the f8 toy. Tiles include one tile and ones dividing nothing.


@pytest.mark.parametrize("tile", [0, 64, 100, 252])
def test_tiny_encode(tiny, tile):
    vae = tiny[0]
    x = torch.rand(1, 3, 252, 188, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        _check(lw.encode_mean(vae, x, tile=tile), vae.encode(x).latent_dist.mean, tile, 252)


@pytest.mark.parametrize("tile", [0, 16, 25])
def test_tiny_decode_and_unet(tiny, tile):
    vae, unet, _ = tiny
    z = torch.randn(1, 16, 63, 47, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _check(lw.decode(vae, z, tile=tile), vae.decode(z).sample, tile, 63)
        _check(lw.unet_forward(unet, z, 999, ctx, tile=tile), unet(z, 999, encoder_hidden_states=ctx).sample, tile, 63)


@pytest.mark.parametrize("tile", [0, 64, 100])
def test_refiner(tiny, tile):
    refiner = tiny[0].refiner
    y, x = torch.rand(2, 1, 3, 252, 188, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        _check(lw.refine(refiner, y, x, tile=tile), refiner(y, x), tile, 252)


def test_whole_student_tiled(tiny):
    """The four entry points chained as the pipeline would, against OneStepStudent.forward."""
    vae, unet, config = tiny
    student = OneStepStudent(vae, unet, config, prompt_embeds=torch.randn(8, 64)).eval()
    x = torch.rand(1, 3, 128, 96, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        z = lw.encode_mean(vae, x, tile=48) * config.scaling_factor
        t = torch.full((1,), student.timestep, dtype=torch.long)
        pred = lw.unet_forward(unet, z, t, student.prompt_embeds[None], tile=12)
        x0 = predicted_x0(z, pred, student.abar_t, config.prediction_type)
        y = lw.refine(vae.refiner, lw.decode(vae, x0 / config.scaling_factor, tile=12), x, tile=48)
        _check(y, student(x), 48, 128)


@pytest.mark.parametrize("tile", [0, 8, 13])
def test_toy_sd_vae_and_unet(toy_sd, tile):
    """f8 VAE with mid-block self-attention; UNet with self- and cross-attention and linear projections.
    The odd latent also makes the UNet upsample to a size that is not 2x (31 -> 16 -> 31)."""
    vae, unet = toy_sd
    x = torch.rand(1, 3, 248, 184, generator=torch.Generator().manual_seed(5)) * 2 - 1
    ctx = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        _check(lw.encode_mean(vae, x, tile=8 * tile), z, 8 * tile, 248)
        _check(lw.decode(vae, z, tile=tile), vae.decode(z).sample, tile, 31)
        _check(lw.unet_forward(unet, z, 500, ctx, tile=tile), unet(z, 500, encoder_hidden_states=ctx).sample, tile, 31)


def test_float64_is_exact_to_rounding(toy_sd):
    """In float64 the tiled result matches to ~1e-14: what is left in float32 is rounding, not method."""
    vae, unet = (copy.deepcopy(m).double() for m in toy_sd)
    x = torch.rand(1, 3, 120, 88, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 2 - 1
    ctx = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        assert (lw.encode_mean(vae, x, tile=40) - z).abs().max() < 1e-11
        assert (lw.decode(vae, z, tile=6) - vae.decode(z).sample).abs().max() < 1e-11
        ref = unet(z, 999, encoder_hidden_states=ctx).sample
        assert (lw.unet_forward(unet, z, 999, ctx, tile=6) - ref).abs().max() < 1e-11


def test_a_batch_of_two_is_each_image_alone(tiny):
    """Each sample's GroupNorm uses its own whole-image moments (the batch-of-one path differs)."""
    vae, unet, _ = tiny
    z = torch.randn(2, 16, 40, 30, generator=torch.Generator().manual_seed(10))
    z[1] = z[1] * 3 + 1  # the second sample's statistics are far from the first's
    ctx = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        _check(lw.decode(vae, z, tile=16), vae.decode(z).sample, 16, 40)
        _check(lw.unet_forward(unet, z, 999, ctx, tile=16), unet(z, 999, encoder_hidden_states=ctx).sample, 16, 40)


def test_channels_last_bf16_tiles_stay_channels_last(tiny, monkeypatch):
    """The CPU's bf16 mode (channels-last weights): tiles are stored and fetched channels-last, not
    transposed on every pass (which made 512 px tiles 75% slower than untiled at 2048 px output),
    and the tiled result agrees with the untiled one to bf16 rounding."""
    vae, unet = (copy.deepcopy(m).to(torch.bfloat16, memory_format=torch.channels_last) for m in tiny[:2])
    z = torch.randn(1, 16, 48, 40, generator=torch.Generator().manual_seed(12))
    z = z.to(torch.bfloat16, memory_format=torch.channels_last)  # as the encoder's tiles hand it on
    ctx = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(13)).to(torch.bfloat16)
    layouts = set()
    run_tile = lw._run_tile

    def watched(body, region, box):  # noqa: ANN001
        layouts.add(region.stride(1) < region.stride(3))
        return run_tile(body, region, box)

    monkeypatch.setattr(lw, "_run_tile", watched)
    with torch.no_grad():
        lw.unet_forward(unet, z, 999, ctx, tile=16)  # its attention blocks turn tokens back into pixels
        ref, out = vae.decode(z).sample.float(), lw.decode(vae, z, tile=16).float()
    assert layouts == {True}
    psnr = 10 * torch.log10(4 / (out - ref).pow(2).mean()).item()  # outputs in [-1, 1]
    assert psnr > 40, psnr


def test_group_norm_statistics_must_be_whole_image(tiny):
    """Half flat, half noise: each tile's GroupNorm statistics are far from the image's, so tiles
    normalised on their own come out wrong; the whole-image moments make the tiled run exact."""
    vae = tiny[0]
    x = torch.zeros(1, 3, 64, 128)
    x[..., 64:] = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        h = vae.encoder.conv_in(x)  # what the first GroupNorm normalises
        var_flat, var_noise, var_all = h[..., :64].var().item(), h[..., 64:].var().item(), h.var().item()
        assert var_noise > 10 * var_flat and var_noise > 1.5 * var_all
        ref = vae.encode(x).latent_dist.mean
        per_tile = torch.cat([vae.encode(x[..., :64]).latent_dist.mean, vae.encode(x[..., 64:]).latent_dist.mean], -1)
        # per-tile statistics (even with no tile-border error: each half is encoded whole) are far off
        assert (per_tile - ref)[..., 2:-2].abs().max() > 0.05
        _check(lw.encode_mean(vae, x, tile=64), ref, 64, 128)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op allocates (views share memory and are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.largest = max([self.largest, *sizes])
        return out


def _device_peak(monkeypatch: pytest.MonkeyPatch, run) -> int:  # noqa: ANN001
    """The largest tensor the compute device receives or makes: every move to it goes through
    ``_to_device`` and all its work through ``_run_tile``, so both are watched."""
    peak = 0
    move, tile = lw._to_device, lw._run_tile

    def watched_move(t: torch.Tensor, device: torch.device) -> torch.Tensor:
        nonlocal peak
        peak = max(peak, t.numel())
        return move(t, device)

    def watched_tile(body, region, box):  # noqa: ANN001
        nonlocal peak
        with _LargestAllocation() as mode:
            out = tile(body, region, box)
        peak = max(peak, mode.largest)
        return out

    monkeypatch.setattr(lw, "_to_device", watched_move)
    monkeypatch.setattr(lw, "_run_tile", watched_tile)
    with torch.no_grad():
        run()
    monkeypatch.undo()
    return peak


def test_device_memory_is_bounded_by_the_tile(tiny, monkeypatch):
    vae = tiny[0]

    def stages(side: int, tile: int) -> None:
        x = torch.rand(1, 3, side, side) * 2 - 1
        z = lw.encode_mean(vae, x, tile=tile)
        lw.refine(vae.refiner, lw.decode(vae, z, tile=tile // 4), x, tile=tile)

    # 3x3 and 6x6 tiles: both have interior tiles, whose halos reach out on every side
    small, large = (_device_peak(monkeypatch, lambda s=s: stages(s, 64)) for s in (192, 384))
    untiled = _device_peak(monkeypatch, lambda: stages(384, 0))
    assert large == small  # 4x the pixels, the same largest device tensor
    assert untiled > 10 * large  # while untiled it grows with the image
    assert large < 24 * 96 * 96  # a tile's refiner activation with its halo: 24 channels, 64 px + 4 + 4


def test_count_steps_and_cancel(tiny, toy_sd):
    vae, unet, _ = tiny
    z, ctx = torch.randn(1, 16, 40, 30), torch.randn(1, 8, 64)
    for stage, model, args, tile in [("decode", vae, (z,), 16), ("unet", toy_sd[1], (z[:, :4], 999, ctx[..., :32]), 9)]:
        calls = []
        run = lw.decode if stage == "decode" else lw.unet_forward
        with torch.no_grad():
            run(model, *args, tile=tile, step=lambda: calls.append(1))
        tiles = ((40 + tile - 1) // tile) * ((30 + tile - 1) // tile)
        passes = lw.count_steps(stage, model, 40, 30, 0)  # one tile: one step per pass
        assert len(calls) == lw.count_steps(stage, model, 40, 30, tile) == tiles * passes
    calls = []
    with pytest.raises(Cancelled), torch.no_grad():
        lw.unet_forward(unet, z, 999, ctx, tile=16, should_stop=lambda: len(calls) >= 3, step=lambda: calls.append(1))
    assert len(calls) == 3


def test_lora_wrapped_layers(tiny):
    """peft's LoRA wrappers (convs and linears) run as modules: their adapters take part per tile."""
    unet = copy.deepcopy(tiny[1])
    add_lora(unet, LoraSpec("unet", "a", 4, 4.0, default_lora_targets(unet, UNET_TARGET_SUFFIXES)))
    _randomise(*(m for n, m in unet.named_modules() if n.endswith("lora_B")))
    z, ctx = torch.randn(1, 16, 32, 24), torch.randn(1, 8, 64)
    with torch.no_grad():
        ref = unet(z, 999, encoder_hidden_states=ctx).sample
        assert (ref - tiny[1](z, 999, encoder_hidden_states=ctx).sample).abs().max() > 1e-3  # the adapter acts
        _check(lw.unet_forward(unet.eval(), z, 999, ctx, tile=10), ref, 10, 32)


def test_unsupported_modules_are_named(toy_sd):
    vae = AutoencoderKL(**{**TOY_F8_VAE, "down_block_types": ["AttnDownEncoderBlock2D"] + ["DownEncoderBlock2D"] * 3})
    with pytest.raises(lw.UnsupportedModule, match="AttnDownEncoderBlock2D"), torch.no_grad():
        lw.encode_mean(vae.eval(), torch.zeros(1, 3, 16, 16))
    unet = copy.deepcopy(toy_sd[1])
    unet.set_attn_processor(AttnProcessor())
    with pytest.raises(lw.UnsupportedModule, match="AttnProcessor"), torch.no_grad():
        lw.unet_forward(unet, torch.zeros(1, 4, 8, 8), 999, torch.zeros(1, 77, 32))
    with pytest.raises(ValueError, match="eval"):
        lw.unet_forward(unet.train(), torch.zeros(1, 4, 8, 8), 999, torch.zeros(1, 77, 32))
