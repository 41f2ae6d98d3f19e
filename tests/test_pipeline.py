import pytest
import skimage.data
import torch

from conftest import photo_like
from vpdsr import Cancelled, VPDError, load_pipeline
from vpdsr.color import adain_color_fix, apply_color_fix, wavelet_color_fix
from vpdsr.errors import NoDefaultModel, OutOfMemory


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(photo_like(h, w, seed)).permute(2, 0, 1)[None].float() / 255


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


@pytest.fixture(scope="module")
def pipe():
    """The embedded default: a trained tiny model, which is what the tiling bound is about."""
    return load_pipeline(device="cpu")


def test_output_size_batches_and_odd_sizes(pipe):
    batch = torch.cat([_image(37, 53, 0), _image(37, 53, 1)])
    out = pipe(batch, scale=4)
    assert out.shape == (2, 3, 148, 212) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    assert not torch.equal(out[0], out[1])
    assert pipe(_image(20, 30), scale=1.5).shape == (1, 3, 30, 45)


def test_deterministic_for_a_fixed_thread_count(pipe):
    """Bit-identical reruns need one thread count (conftest's ``one_thread_count`` keeps it fixed)."""
    x = _image(32, 32)
    assert torch.equal(pipe(x), pipe(x))


def _texture(name: str, size: int = 256) -> torch.Tensor:
    """A centre crop of one of scikit-image's bundled texture photos (grayscale, as RGB)."""
    gray = torch.from_numpy(getattr(skimage.data, name)()).float() / 255
    top, left = (gray.shape[0] - size) // 2, (gray.shape[1] - size) // 2
    return gray[top : top + size, left : left + size].expand(1, 3, size, size).contiguous()


# Layer by layer with whole-image statistics (vpdsr.layerwise), tiles give the untiled result. Before
# it, tiles normalised with statistics of a shrunk copy: 31.7 dB here on bark at 1024 px.
@pytest.mark.parametrize("texture", ["grass", "gravel"])  # foliage and a bark-like grain: high-variance detail
def test_tiled_matches_untiled_above_60db_at_1024px(pipe, texture: str):
    x = _texture(texture)  # 256 px in, 1024 px out: 4x4 tiles of 256 px
    whole = pipe(x, tile=0, color_fix="none")
    calls = []
    tiled = pipe(x, tile=256, color_fix="none", progress=lambda d, t: calls.append((d, t)))
    assert whole.shape == tiled.shape == (1, 3, 1024, 1024)
    assert _psnr(whole, tiled) >= 60
    assert len(calls) > 16 and calls[-1][0] == calls[-1][1]  # per tile, and the bar reaches its total


def test_odd_size_tiled_matches_untiled(pipe):
    """250x186 in, 1000x744 out: the padded network size divides by no tile, and the last tiles are partial."""
    x = _texture("brick")[..., :186, :250]
    whole = pipe(x, tile=0, color_fix="none")
    tiled = pipe(x, tile=300, color_fix="none")
    assert whole.shape == tiled.shape == (1, 3, 744, 1000)
    assert _psnr(whole, tiled) >= 60


def test_cancel_hook_stops_the_work(pipe):
    with pytest.raises(Cancelled):
        pipe(_image(64, 64), tile=128, should_stop=lambda: True)


def test_mask_sets_per_pixel_strength(pipe):
    x = _image(32, 32)
    full = pipe(x, color_fix="none")
    none = pipe(x, color_fix="none", mask=torch.zeros(1, 32, 32))
    half = torch.zeros(1, 32, 32)
    half[:, :, 16:] = 1
    mixed = pipe(x, color_fix="none", mask=half)
    # left half follows the mask-0 result, right half the full-strength one (away from the seam)
    left, right = (..., slice(0, 40)), (..., slice(88, 128))
    assert _psnr(mixed[left], none[left]) > _psnr(mixed[left], full[left]) + 3
    assert _psnr(mixed[right], full[right]) > _psnr(mixed[right], none[right]) + 3


def test_bad_arguments_are_clear(pipe):
    with pytest.raises(VPDError, match="scale"):
        pipe(_image(8, 8), scale=9)
    with pytest.raises(VPDError, match="color_fix"):
        pipe(_image(8, 8), color_fix="sepia")
    with pytest.raises(VPDError, match="shape"):
        pipe(torch.rand(1, 4, 8, 8))
    with pytest.raises(VPDError, match="no text encoder"):
        pipe(_image(8, 8), prompt="a cat")
    with pytest.raises(VPDError, match="NaN"):
        pipe(torch.full((1, 3, 8, 8), float("nan")))


def test_out_of_memory_halves_the_tile(pipe, monkeypatch):
    seen = []

    def small_memory(module, args):  # a device that holds a 40x40 latent tile (with its halo) at most
        seen.append(args[0].shape[-1] * args[0].shape[-2])
        if seen[-1] > 40 * 40:
            raise torch.OutOfMemoryError("simulated")

    hook = pipe.student.vae.decoder.conv_in.register_forward_pre_hook(small_memory)
    try:
        out = pipe(_image(64, 64), tile=0)
    finally:
        hook.remove()
    assert out.shape == (1, 3, 256, 256)
    assert seen[0] == 64 * 64 and seen[-1] <= 40 * 40


def test_out_of_memory_at_the_smallest_tile_is_reported(pipe, monkeypatch):
    def no_memory(module, args):
        raise torch.OutOfMemoryError("simulated")

    hook = pipe.student.vae.decoder.conv_in.register_forward_pre_hook(no_memory)
    try:
        with pytest.raises(OutOfMemory, match="memory"):
            pipe(_image(32, 32))
    finally:
        hook.remove()


def test_missing_default_model_is_explained(monkeypatch):
    import vpdsr.paths
    import vpdsr.pipeline as pipeline

    monkeypatch.setattr(vpdsr.paths, "default_model_path", lambda: None)
    with pytest.raises(NoDefaultModel, match="no embedded default model") as caught:
        pipeline.load_pipeline()
    assert "--" not in str(caught.value)  # the CLI, the node and the demo each say how to give one


def test_wavelet_fix_clamps_the_ring_that_sharp_bands_on_a_soft_low_band_draw():
    """A dark stroke the student draws sharp, on an input that has it blurred: the student's bands
    on the input's low band overshoot past the light ground (the halo beside Canon_10's strokes);
    the clamp keeps every pixel within what either image shows within a pixel of it."""
    x = torch.arange(64.0)
    sharp = torch.where((x - 32).abs() < 2, 0.1, 0.8).expand(1, 3, 16, 64).clone()
    soft = torch.nn.functional.avg_pool1d(sharp.reshape(-1, 1, 64), 9, 1, 4, count_include_pad=False).reshape(sharp.shape)
    from vpdsr.color import _low_frequency

    unclamped = sharp + _low_frequency(soft - sharp, 3)
    assert unclamped.max() > 0.81  # the ring exists without the clamp
    fixed = wavelet_color_fix(sharp, soft, levels=3)
    assert fixed.max() <= 0.8 + 1e-6 and fixed.min() >= 0.1 - 1e-6
    ramp = torch.linspace(0.2, 0.7, 32).expand(1, 3, 32, 32)  # a colour cast on a smooth ramp: no
    cast = ramp + torch.tensor([0.05, -0.03, 0.0]).view(1, 3, 1, 1)  # ring, so the clamp leaves it alone
    assert torch.allclose(wavelet_color_fix(cast, ramp, 3), cast + _low_frequency(ramp - cast, 3))
    assert torch.allclose(wavelet_color_fix(cast, ramp, 3), ramp, atol=1e-6)


def test_cpu_bf16_is_channels_last_and_auto_precision_follows_the_cpu(monkeypatch):
    import vpdsr.pipeline as pipeline

    for has_bf16, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(pipeline, "cpu_has_native_bf16", lambda has=has_bf16: has)
        assert pipeline.resolve_dtype("auto", torch.device("cpu")) is expected
    assert pipeline.resolve_dtype("fp32", torch.device("cpu")) is torch.float32
    exact, half = pipeline.load_pipeline(dtype="fp32"), pipeline.load_pipeline(dtype="bf16")
    for pipe, layout in ((exact, torch.contiguous_format), (half, torch.channels_last), (half.to("cpu"), torch.channels_last)):
        assert pipe.student.vae.decoder.conv_in.weight.is_contiguous(memory_format=layout)
    lr = _image(32, 40, 3)
    out = half(lr, scale=4)  # bf16 is emulated where the CPU lacks it: slower, the same numbers
    assert out.dtype == torch.float32 and _psnr(out, exact(lr, scale=4)) > 40


def test_color_fixes():
    torch.manual_seed(0)
    ref = torch.rand(1, 3, 64, 64)
    img = ref * 0.5 + 0.3 + 0.05 * torch.randn_like(ref)
    fixed = adain_color_fix(img, ref)
    assert torch.allclose(fixed.mean((2, 3)), ref.mean((2, 3)), atol=1e-5)
    assert torch.allclose(fixed.std((2, 3)), ref.std((2, 3)), atol=1e-4)
    # wavelet: a colour cast (low frequency) is removed, fine detail of the image is kept
    cast = img + torch.tensor([0.2, -0.1, 0.0]).view(1, 3, 1, 1)
    wav = wavelet_color_fix(cast, ref)
    assert (wav.mean((2, 3)) - ref.mean((2, 3))).abs().max() < 0.01
    detail = img - torch.nn.functional.avg_pool2d(img, 3, 1, 1)
    wav_detail = wav - torch.nn.functional.avg_pool2d(wav, 3, 1, 1)
    assert torch.corrcoef(torch.stack([detail.flatten(), wav_detail.flatten()]))[0, 1] > 0.9
    assert torch.equal(apply_color_fix(img, ref, "none"), img)
