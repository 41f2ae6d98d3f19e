"""The tiny-v4 decoder (vpdsr/shuffle_decoder.py): exact tiles, an ICNR start, a model-file round trip,
and training from a v2 file whose encoder and UNet it keeps."""

from __future__ import annotations

import pytest
import torch

from trainer.stages.student import init_from_student
from vpdsr import layerwise as lw
from vpdsr.backbones import backbone_config, build_backbone
from vpdsr.errors import ModelFileError
from vpdsr.model import OneStepStudent
from vpdsr.modelfile import load_student, save_student
from vpdsr.pipeline import load_pipeline
from vpdsr.shuffle_decoder import ShuffleDecoder


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    vae = build_backbone("tiny-v4").vae.eval()
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae


@pytest.mark.parametrize("tile", [0, 16, 25])
def test_tiled_decode_equals_untiled(vae, tile):
    """Odd latent sizes, tiles that divide nothing (the bilinear base reads across tile edges); one
    tile is the module's own call bit for bit."""
    assert isinstance(vae.decoder, ShuffleDecoder)
    z = torch.randn(1, 16, 63, 47, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, ref = lw.decode(vae, z, tile=tile), vae.decode(z).sample
    assert out.shape == (1, 3, 252, 188)
    if tile == 0:
        assert torch.equal(out, ref)
    err = (out - ref).abs().max().item()
    assert err <= 1e-5 * max(1.0, ref.abs().max().item()), f"tile {tile}: max abs error {err:.3g}"


def test_the_untrained_decoder_is_its_smooth_base():
    """The detail head starts at zero: the output is the bilinear upscale of the base head alone."""
    torch.manual_seed(0)
    dec = build_backbone("tiny-v4").vae.decoder
    z = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        y = dec(z)
        h = dec.act(dec.blocks[-1](dec.blocks[-2](dec.blocks[-3](dec.blocks[0](dec.conv_in(z))))))
        base = torch.nn.functional.interpolate(dec.conv_base(h), scale_factor=4, mode="bilinear")
    assert y.abs().max() > 0
    assert torch.allclose(y, base, atol=1e-6)


def test_a_v2_file_gives_its_encoder_and_unet_and_the_result_round_trips(tmp_path):
    torch.manual_seed(0)
    parts = build_backbone("tiny-v2")
    v2_file = tmp_path / "v2.safetensors"
    save_student(v2_file, OneStepStudent(parts.vae, parts.unet, parts.config, prompt_embeds=torch.randn(8, 64)))
    config = backbone_config("tiny-v4")
    vae, unet, cond, _ = init_from_student(str(v2_file), config)
    v2 = load_student(v2_file)
    assert torch.equal(vae.encoder.conv_in.weight, v2.vae.encoder.conv_in.weight)
    assert torch.equal(unet.conv_in.weight, v2.unet.conv_in.weight)
    student = OneStepStudent(vae, unet, config, prompt_embeds=cond).eval()
    path = save_student(tmp_path / "v4.safetensors", student)
    loaded = load_student(path)
    assert isinstance(loaded.vae.decoder, ShuffleDecoder)
    image = torch.rand(1, 3, 40, 36)
    pipe = load_pipeline(path, device="cpu", dtype="fp32")
    whole, tiled = pipe(image, scale=4, tile=0), pipe(image, scale=4, tile=64)
    assert whole.shape == (1, 3, 160, 144)
    assert (whole - tiled).abs().max() < 1e-5


def test_a_bad_decoder_entry_is_named():
    data = backbone_config("tiny-v4").to_dict()
    data["vae_decoder"] = {"kind": "transposed"}
    with pytest.raises(ModelFileError, match="vae_decoder"):
        build_backbone(data)
    data["vae_decoder"], data["vae_upsample"] = {"kind": "shuffle"}, "bilinear"
    with pytest.raises(ModelFileError, match="vae_upsample"):
        build_backbone(data)
