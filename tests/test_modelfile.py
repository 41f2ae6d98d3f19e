import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vpdsr import OneStepStudent, build_backbone, load_student, read_meta, save_student
from vpdsr.color import color_fix_
from vpdsr.errors import ModelFileError
from vpdsr.lora import UNET_TARGET_SUFFIXES, LoraSpec, add_lora, default_lora_targets, merge_lora
from vpdsr.pipeline import VPDPipeline, default_model_path


def _student(seed: int = 0) -> OneStepStudent:
    torch.manual_seed(seed)
    parts = build_backbone("tiny")
    return OneStepStudent(parts.vae, parts.unet, parts.config, timestep=900, prompt_embeds=torch.randn(8, 64)).eval()


def test_full_round_trip(tmp_path: Path):
    student = _student()
    path = save_student(tmp_path / "s.safetensors", student, prompt="a photo", training_info={"steps": 3})
    meta = read_meta(path)
    assert meta.backbone.name == "tiny" and meta.timestep == 900 and meta.prompt == "a photo"
    assert meta.training == {"steps": 3} and meta.weights == "full"
    loaded = load_student(path)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(student(x), loaded(x))
    assert torch.equal(loaded.prompt_embeds, student.prompt_embeds)


def test_lora_round_trip_and_merge(tmp_path: Path):
    base = _student()
    spec = LoraSpec("unet", "default", rank=4, alpha=4.0, targets=default_lora_targets(base.unet, UNET_TARGET_SUFFIXES))
    add_lora(base.unet, spec)
    with torch.no_grad():
        for name, p in base.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    path = save_student(tmp_path / "lora.safetensors", base, weights="lora", lora=[spec])
    stored = load_file(str(path))
    assert all("lora_" in k or k.startswith("unet.conv_in.") or k == "prompt_embeds" for k in stored)
    fresh = _student()  # the same base weights, as a user's base checkpoint would give
    loaded = load_student(path, base=fresh)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = base(x)
        assert torch.allclose(loaded(x), expected, atol=1e-5)
        merge_lora(loaded.unet)
        assert not any("lora_" in n for n, _ in loaded.unet.named_parameters())
        assert torch.allclose(loaded(x), expected, atol=1e-4)


def test_lora_file_without_base_is_refused(tmp_path: Path):
    student = _student()
    spec = LoraSpec("unet", "default", rank=2, alpha=2.0, targets=("conv_in",))
    add_lora(student.unet, spec)
    path = save_student(tmp_path / "l.safetensors", student, weights="lora", lora=[spec])
    with pytest.raises(ModelFileError, match="needs its base weights"):
        load_student(path)


def test_full_save_refuses_unmerged_lora(tmp_path: Path):
    student = _student()
    add_lora(student.unet, LoraSpec("unet", "default", rank=2, alpha=2.0, targets=("conv_in",)))
    with pytest.raises(ValueError, match="merge"):
        save_student(tmp_path / "x.safetensors", student)


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    return save_student(tmp_path / "good.safetensors", _student())


def _rewrite(src: Path, dst: Path, tensors=None, meta=None) -> Path:
    with safe_open(str(src), "pt") as f:
        header = dict(f.metadata())
    data = load_file(str(src)) if tensors is None else tensors
    if meta is not None:
        header["vpdsr"] = json.dumps(meta(json.loads(header["vpdsr"]))) if callable(meta) else meta
    save_file(data, str(dst), metadata=header)
    return dst


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p, d: d / "missing.safetensors", "not found"),
        (lambda p, d: (d / "x.ckpt").write_bytes(b"x") and d / "x.ckpt", "are .safetensors"),
        (lambda p, d: (d / "junk.safetensors").write_bytes(b"\x00" * 64) and d / "junk.safetensors", "not a readable"),
        (lambda p, d: (d / "cut.safetensors").write_bytes(p.read_bytes()[:5000]) and d / "cut.safetensors", "not a readable|damaged"),
        (lambda p, d: _rewrite(p, d / "j.safetensors", meta="{not json"), "not valid JSON"),
        (lambda p, d: _rewrite(p, d / "f.safetensors", meta=lambda m: {**m, "format": "other"}), "not a vpdsr student"),
        (lambda p, d: _rewrite(p, d / "v.safetensors", meta=lambda m: {**m, "format_version": 99}), "newer"),
        (lambda p, d: _rewrite(p, d / "b.safetensors", meta=lambda m: {**m, "backbone": {"name": "x"}}), "lacks"),
    ],
)
def test_bad_files_are_refused_clearly(good_file: Path, tmp_path: Path, make, message: str):
    bad = make(good_file, tmp_path)
    with pytest.raises(ModelFileError, match=message):
        load_student(bad)


def test_missing_and_misshapen_weights_are_named(good_file: Path, tmp_path: Path):
    tensors = load_file(str(good_file))
    dropped = dict(tensors)
    dropped.pop("unet.conv_out.weight")
    with pytest.raises(ModelFileError, match="missing.*unet.conv_out.weight"):
        load_student(_rewrite(good_file, tmp_path / "m.safetensors", tensors=dropped))
    wrong = dict(tensors)
    wrong["unet.conv_out.bias"] = torch.zeros(3)
    with pytest.raises(ModelFileError, match="wrong shape.*unet.conv_out.bias"):
        load_student(_rewrite(good_file, tmp_path / "s.safetensors", tensors=wrong))
    extra = dict(tensors)
    extra["unet.not_a_layer.weight"] = torch.zeros(1)
    with pytest.raises(ModelFileError, match="do not fit"):
        load_student(_rewrite(good_file, tmp_path / "e.safetensors", tensors=extra))


def test_plain_safetensors_is_not_a_model(tmp_path: Path):
    path = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(1)}, str(path))
    with pytest.raises(ModelFileError, match="not a vpdsr model"):
        read_meta(path)


def test_wavelet_settings_are_the_models_and_steer_the_default_colour_fix(tmp_path: Path):
    default = read_meta(default_model_path())  # both chosen on DRealSR, see MODEL_CARD.md
    assert (default.wavelet_levels, default.ring_clamp) == (3, "input")
    student = _student()
    settings = [{}, {"wavelet_levels": 3}, {"ring_clamp": "input"}]
    metas = [read_meta(save_student(tmp_path / f"{i}.safetensors", student, **kw)) for i, kw in enumerate(settings)]
    assert [(m.wavelet_levels, m.ring_clamp) for m in metas] == [(5, "joint"), (3, "joint"), (5, "input")]
    image = torch.rand(1, 3, 24, 20)
    outputs = []
    for meta in metas:
        pipe = VPDPipeline(student, meta, torch.device("cpu"), torch.float32)
        outputs.append(pipe(image))
        raw = pipe(image, color_fix="none")
        bicubic = torch.nn.functional.interpolate(image, size=raw.shape[2:], mode="bicubic").clamp(0, 1)
        expected = color_fix_(raw.clone(), bicubic, "wavelet", levels=meta.wavelet_levels, ring=meta.ring_clamp)
        assert (outputs[-1] - expected.clamp(0, 1)).abs().max() < 1e-5
    assert min((outputs[0] - other).abs().max() for other in outputs[1:]) > 1e-3


def _rewrite_meta(path: Path, **changes: object) -> None:
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["vpdsr"])
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    save_file(tensors, path, metadata={"vpdsr": json.dumps(meta)})


@pytest.mark.parametrize(("key", "value"), [("wavelet_levels", 0), ("wavelet_levels", 9), ("wavelet_levels", 2.5),
                                            ("wavelet_levels", "3"), ("ring_clamp", "both"), ("ring_clamp", 3)])
def test_wavelet_settings_out_of_range_are_refused(tmp_path: Path, key, value):
    path = save_student(tmp_path / "s.safetensors", _student())
    _rewrite_meta(path, **{key: value})
    with pytest.raises(ModelFileError, match=key):
        read_meta(path)


def test_files_without_the_newer_settings_keep_their_colour_fix_and_files_get_the_usual_mode(tmp_path: Path):
    path = save_student(tmp_path / "s.safetensors", _student())
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # readable beside the user's other files
    _rewrite_meta(path, wavelet_levels=None, ring_clamp=None)  # as a file from before those fields
    assert (read_meta(path).wavelet_levels, read_meta(path).ring_clamp) == (5, "joint")
