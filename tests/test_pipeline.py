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
    import vpdsr.pipeline as pipeline

    monkeypatch.setattr(pipeline, "default_model_path", lambda: None)
    with pytest.raises(NoDefaultModel, match="no embedded default model") as caught:
        pipeline.load_pipeline()
    assert "--" not in str(caught.value)  # the CLI, the node and the demo each say how to give one


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
