"""vpdsr.semantics on the tiny random CLIP: loading, tokenizer, tags, embeddings, drift, quality."""

import json
import socket

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vpdsr.errors import ModelFileError
from vpdsr.semantics import (
    QUALITY_PAIRS,
    ClipPreprocess,
    DriftReport,
    SemanticModel,
    build_clip,
    build_tokenizer,
    clip_preprocess,
    default_tags,
    drift_report,
    list_configs,
    load_clip,
    load_tags,
    prompt_from_tags,
    quality_from_embeddings,
    resolve_config,
    save_clip,
)

TINY = "vpdsr-tiny-clip"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_clip(TINY)


@pytest.fixture(scope="module")
def judge(tiny):
    """One SemanticModel for the module: encoding the vocabulary is the slow part."""
    clip, spec = tiny
    model = SemanticModel(clip, spec)
    model.tag_embeddings()
    return model


def _images(batch=2, height=48, width=40, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- configs and loading -------------------------------------------------------------------


def test_tiny_config_is_registered_and_builds_on_cpu_float32(tiny):
    clip, spec = tiny
    assert TINY in list_configs() and "ViT-B-32" in list_configs()
    assert spec.name == TINY and spec.image_size == (32, 32)
    param = next(clip.parameters())
    assert param.device.type == "cpu" and param.dtype == torch.float32


def test_builtin_open_clip_configs_resolve_offline():
    spec = resolve_config("ViT-H-14")
    assert spec.image_size == (224, 224) and spec.context_length == 77
    assert spec.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)


def test_unknown_config_and_hub_only_configs_are_refused():
    with pytest.raises(ModelFileError, match="Unknown OpenCLIP config 'ViT-Nope'"):
        resolve_config("ViT-Nope")
    with pytest.raises(ModelFileError, match="Hugging Face"):
        resolve_config("ViT-B-16-SigLIP")  # its tokenizer lives on the hub
    with pytest.raises(ModelFileError, match="lacks embed_dim"):
        resolve_config({"vision_cfg": {}, "text_cfg": {}})


def test_save_clip_round_trip_needs_no_config(tiny, tmp_path):
    clip, spec = tiny
    path = tmp_path / "dape.safetensors"
    save_clip(path, clip, spec, info={"stage": "dape", "steps": 3})
    loaded, loaded_spec = load_clip(path)
    assert _same_weights(clip, loaded)
    assert loaded_spec.config == spec.config and loaded_spec.name == TINY
    assert loaded_spec.info == {"stage": "dape", "steps": 3}
    assert not list(tmp_path.glob("*.partial"))
    assert _same_weights(clip, SemanticModel.from_file(path).clip)


def test_save_clip_accepts_a_dict_config_with_preprocessing(tmp_path):
    config = dict(resolve_config(TINY).config, preprocess_cfg={"mean": [0.5] * 3, "std": [0.5] * 3})
    clip, spec = build_clip(config)
    save_clip(tmp_path / "c.safetensors", clip, config)
    _, loaded_spec = load_clip(tmp_path / "c.safetensors")
    assert loaded_spec.name is None and loaded_spec.mean == (0.5, 0.5, 0.5)


def test_our_export_is_a_plain_open_clip_checkpoint(tiny, tmp_path):
    """Other OpenCLIP tools can read what we write: the metadata is extra, the keys are theirs."""
    clip, spec = tiny
    save_clip(tmp_path / "c.safetensors", clip, spec)
    other = open_clip.model.CLIP(**spec.config)
    open_clip.load_checkpoint(other, str(tmp_path / "c.safetensors"))
    assert _same_weights(clip, other)


def test_save_clip_refuses_weights_that_do_not_fit_the_config(tiny, tmp_path):
    clip, _ = tiny
    other = dict(resolve_config(TINY).config, embed_dim=16)
    with pytest.raises(ModelFileError, match="shape mismatches"):
        save_clip(tmp_path / "c.safetensors", clip, other)
    with pytest.raises(ValueError, match=".safetensors"):
        save_clip(tmp_path / "c.pt", clip, TINY)


@pytest.mark.parametrize(
    ("suffix", "wrapper", "prefix"),
    [
        (".safetensors", None, ""),
        (".safetensors", None, "module."),
        (".bin", None, ""),
        (".pt", "state_dict", ""),
        (".pt", "state_dict", "module."),
        (".pth", "model", "_orig_mod."),
    ],
)
def test_plain_open_clip_checkpoints_load_in_common_layouts(tiny, tmp_path, suffix, wrapper, prefix):
    clip, _ = tiny
    state = {prefix + key: value.clone() for key, value in clip.state_dict().items()}
    path = tmp_path / f"clip{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({wrapper: state, "epoch": 3} if wrapper else state, path)
    loaded, spec = load_clip(path, config=TINY)
    assert _same_weights(clip, loaded) and spec.name == TINY


def test_half_precision_and_scalar_logit_scale_files_load_as_float32(tiny, tmp_path):
    clip, _ = tiny
    state = {key: value.half() for key, value in clip.state_dict().items()}
    state["logit_scale"] = state["logit_scale"].reshape(1)  # some exports store it as a 1-vector
    save_file(state, str(tmp_path / "half.safetensors"))
    loaded, _ = load_clip(tmp_path / "half.safetensors", TINY)
    assert loaded.logit_scale.dtype == torch.float32 and loaded.logit_scale.shape == clip.logit_scale.shape


def test_open_clip_config_json_beside_the_checkpoint_is_used(tiny, tmp_path):
    clip, spec = tiny
    save_file(clip.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": spec.config, "preprocess_cfg": {"mean": [0.4] * 3, "std": [0.3] * 3}})
    )
    loaded, loaded_spec = load_clip(tmp_path / "open_clip_model.safetensors")
    assert _same_weights(clip, loaded) and loaded_spec.std == (0.3, 0.3, 0.3)


def test_plain_checkpoint_without_config_asks_for_one(tiny, tmp_path):
    clip, _ = tiny
    save_file(clip.state_dict(), str(tmp_path / "plain.safetensors"))
    with pytest.raises(ModelFileError, match=r"plain\.safetensors.*config="):
        load_clip(tmp_path / "plain.safetensors")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_corrupt_files_are_refused_with_their_name(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"\x00\x01 definitely not weights" * 10)
    with pytest.raises(ModelFileError, match=f"broken\\{suffix}"):
        load_clip(path, TINY)


def test_truncated_safetensors_is_refused(tiny, tmp_path):
    clip, spec = tiny
    path = tmp_path / "cut.safetensors"
    save_clip(path, clip, spec)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="cut.safetensors.*corrupt or truncated"):
        load_clip(path)


def test_missing_file_and_unknown_suffix_are_refused(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        load_clip(tmp_path / "absent.safetensors", TINY)
    (tmp_path / "weights.onnx").write_bytes(b"x")
    with pytest.raises(ModelFileError, match="unsupported"):
        load_clip(tmp_path / "weights.onnx", TINY)


def test_mismatched_checkpoint_lists_missing_unexpected_and_shapes(tiny, tmp_path):
    clip, _ = tiny
    state = dict(clip.state_dict())
    del state["text_projection"]
    state["visual.extra_head.weight"] = torch.zeros(2)
    state["visual.proj"] = torch.zeros(5, 5)
    path = tmp_path / "wrong.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelFileError) as err:
        load_clip(path, TINY)
    message = str(err.value)
    assert "wrong.safetensors" in message and TINY in message
    assert "1 missing keys (text_projection)" in message
    assert "1 unexpected keys (visual.extra_head.weight)" in message
    assert "visual.proj: file (5, 5) vs config (32, 32)" in message


def test_a_checkpoint_for_another_architecture_is_refused(tiny, tmp_path):
    clip, _ = tiny
    save_file(clip.state_dict(), str(tmp_path / "tiny.safetensors"))
    bigger = dict(resolve_config(TINY).config, embed_dim=48)
    with pytest.raises(ModelFileError, match="shape mismatches"):
        load_clip(tmp_path / "tiny.safetensors", bigger)


# --- tokenizer ---------------------------------------------------------------------------


def test_tokenizer_works_offline(tiny, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer tried to reach the network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    clip, spec = tiny
    tokenizer = build_tokenizer(spec)
    tokens = tokenizer(["a photo of a dog.", "a photo of a cat."])
    assert tokens.shape == (2, spec.context_length) and tokens.dtype == torch.long
    assert torch.equal(tokens[0, :8], open_clip.tokenize(["a photo of a dog."])[0, :8])
    assert not torch.equal(tokens[0], tokens[1])
    assert SemanticModel(clip, spec, tags=["dog", "cat"]).tag_embeddings().shape == (2, 32)


# --- tags --------------------------------------------------------------------------------


def test_shipped_vocabulary_is_large_unique_and_clean():
    tags = default_tags()
    assert len(tags) >= 300
    assert len(set(tags)) == len(tags)
    assert all(tag == tag.strip().lower() and tag and not tag.startswith("#") for tag in tags)
    assert {"dog", "brick", "beach", "text", "face"} <= set(tags)


def test_vocabulary_file_with_repeats_is_refused(tmp_path):
    path = tmp_path / "tags.txt"
    path.write_text("# comment\ndog\ncat\n\nDog\n")
    with pytest.raises(ValueError, match="repeats tags: dog"):
        load_tags(path)
    path.write_text("dog\n# cat\n\nfern\n")
    assert load_tags(path) == ("dog", "fern")


def test_prompt_from_tags_keeps_order_and_drops_repeats():
    assert prompt_from_tags([("dog", 0.5), ("grass", 0.2), ("dog", 0.1), ("sky", 0.05)]) == "dog, grass, sky"
    assert prompt_from_tags(["a", "b", "c"], max_tags=2) == "a, b"
    assert prompt_from_tags([" ", ""]) == ""


def test_prompts_and_top_tags_come_from_the_vocabulary(judge):
    images = _images()
    top = judge.top_tags(images, k=5)
    assert len(top) == 2 and all(len(row) == 5 for row in top)
    for row in top:
        probs = [p for _, p in row]
        assert probs == sorted(probs, reverse=True) and all(0 < p < 1 for p in probs)
        assert all(tag in judge.tags for tag, _ in row)
    prompts = judge.prompts(images, max_tags=3)
    assert prompts[0] == ", ".join(tag for tag, _ in top[0][:3])
    assert judge.prompts(images, max_tags=3, min_prob=1.0) == ["", ""]


# --- embeddings and preprocessing --------------------------------------------------------


def test_preprocess_matches_open_clips_pil_transform():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(90, 70, 3), dtype=np.uint8)
    expected = open_clip.image_transform(32, is_train=False)(Image.fromarray(array))[None]
    tensor = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
    ours = clip_preprocess(tensor, (32, 32), open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() < 0.05  # about 3/255 in pixel units: PIL rounds to 8 bits


def test_preprocess_module_equals_function_and_accepts_grey():
    images = _images(height=20, width=50)
    module = ClipPreprocess((32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert torch.equal(module(images), clip_preprocess(images, (32, 32), module.mean, module.std))
    grey = images[:, :1]
    assert module(grey).shape == (2, 3, 32, 32)


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (torch.rand(3, 32, 32), ValueError, r"BCHW.*\(3, 32, 32\)"),
        (torch.rand(1, 4, 32, 32), ValueError, "1 or 3 channels"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, "float"),
        (np.zeros((1, 3, 8, 8)), TypeError, "torch.Tensor"),
    ],
)
def test_bad_images_are_refused_clearly(judge, bad, error, match):
    with pytest.raises(error, match=match):
        judge.encode_images(bad)


def test_embeddings_are_unit_norm_and_gradients_reach_the_image(judge):
    images = _images().requires_grad_(True)
    embeddings = judge.encode_images(images)
    assert embeddings.shape == (2, 32)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-5)
    embeddings[:, 0].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in judge.clip.parameters())


def test_no_grad_embeddings_match_and_are_cpu_float32(judge):
    images = _images().requires_grad_(True)
    embedded = judge.embed_images(images)
    assert not embedded.requires_grad and embedded.dtype == torch.float32 and embedded.device.type == "cpu"
    assert torch.allclose(embedded, judge.encode_images(images).detach(), atol=1e-6)


def test_judge_stays_frozen_in_eval_mode(judge):
    judge.train()
    assert not judge.training and not judge.clip.training
    assert not any(p.requires_grad for p in judge.parameters())


def test_cached_text_embeddings_follow_dtype_changes():
    clip, spec = build_clip(TINY)
    model = SemanticModel(clip, spec, tags=["dog", "cat", "sky"])
    images = _images(batch=1)
    before = model.tag_probabilities(images)
    model.to(torch.float64)
    assert model.tag_text_embeddings.dtype == torch.float64
    assert torch.allclose(model.tag_probabilities(images), before, atol=1e-4)


# --- consistency, quality, loss ----------------------------------------------------------


def test_consistency_of_an_image_with_itself_is_one(judge):
    images = _images()
    assert torch.allclose(judge.consistency(images, images), torch.ones(2), atol=1e-5)


def test_consistency_compares_sr_at_the_lr_size(judge):
    lr = _images(height=32, width=32)
    sr = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False)
    sr.requires_grad_(True)
    same = judge.consistency(sr, lr)
    different = judge.consistency(sr, lr.flip(-1).roll(7, dims=-2))
    assert (same > 0.99).all() and (same > different).all()
    same.sum().backward()
    assert sr.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="batches differ"):
        judge.consistency(sr[:1], lr)


def test_quality_is_a_probability_per_image(judge):
    per_pair = judge.quality_per_pair(_images())
    assert per_pair.shape == (2, len(QUALITY_PAIRS))
    score = judge.quality(_images())
    assert score.shape == (2,) and ((score >= 0) & (score <= 1)).all()


def test_quality_prefers_the_positive_prompt_the_image_resembles():
    pairs = torch.nn.functional.normalize(torch.randn(3, 2, 8), dim=-1)
    image = torch.stack([pairs[:, 0].sum(0), pairs[:, 1].sum(0)])  # like all positives; like all negatives
    probs = quality_from_embeddings(torch.nn.functional.normalize(image, dim=-1), pairs, 100.0)
    assert probs.shape == (2, 3)
    assert probs[0].mean() > 0.5 > probs[1].mean()
    assert torch.allclose(quality_from_embeddings(image[:1], pairs[:, [0, 0]], 100.0), torch.full((1, 3), 0.5))


def test_semantic_loss_is_zero_for_identical_images_and_trains_sr(judge):
    hr = _images()
    same = judge.semantic_loss(hr.clone(), hr)
    assert same.cosine.abs() < 1e-5 and same.kl.abs() < 1e-5
    sr = _images(seed=5).requires_grad_(True)
    hr = hr.requires_grad_(True)
    terms = judge.semantic_loss(sr, hr)
    assert terms.cosine > 0 and terms.kl > 0
    (terms.cosine + terms.kl).backward()
    assert sr.grad.abs().sum() > 0 and hr.grad is None


# --- drift report ------------------------------------------------------------------------


def test_drift_report_finds_gained_and_lost_tags_deterministically():
    tags = ["dog", "grass", "sky", "cat", "fur", "text"]
    lr = torch.tensor([0.40, 0.30, 0.20, 0.05, 0.03, 0.02])
    sr = torch.tensor([0.35, 0.05, 0.20, 0.05, 0.30, 0.05])
    report = drift_report(lr, sr, tags, top_k=3)
    assert isinstance(report, DriftReport) and report.top_k == 3
    assert [c.tag for c in report.gained] == ["fur"]
    assert [c.tag for c in report.lost] == ["grass"]
    assert [c.tag for c in report.kept] == ["dog", "sky"]
    fur = report.gained[0]
    assert fur.lr_prob == pytest.approx(0.03) and fur.sr_prob == pytest.approx(0.30)
    assert fur.delta == pytest.approx(0.27)
    expected_kl = float((lr.double() * (lr.double() / sr.double()).log()).sum())
    assert report.kl == pytest.approx(expected_kl, rel=1e-6)
    text = report.to_text()
    assert "gained (possible hallucination): fur 0.030 -> 0.300" in text
    assert "lost: grass 0.300 -> 0.050" in text


def test_drift_report_of_identical_distributions_is_empty():
    probs = torch.tensor([0.5, 0.3, 0.2])
    report = drift_report(probs, probs, ["a", "b", "c"], top_k=10)
    assert report.gained == [] and report.lost == [] and len(report.kept) == 3
    assert report.kl == pytest.approx(0.0, abs=1e-9)
    assert "gained (possible hallucination): none" in report.to_text()
    with pytest.raises(ValueError, match="differ in length"):
        drift_report(probs, probs, ["a", "b"])


def test_inspect_reports_each_pair(judge):
    lr = _images(height=32, width=32)
    sr = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    reports = judge.inspect(lr, sr, top_k=4)
    assert len(reports) == 2
    report = reports[0]
    assert report.consistency > 0.99 and 0 <= report.quality_sr <= 1
    assert len(report.lr_tags) == len(report.sr_tags) == 4 and report.drift.top_k == 4
    assert report.prompt == prompt_from_tags(report.lr_tags)
    assert report.consistency == pytest.approx(float(judge.consistency(sr, lr)[0]), abs=1e-5)
    assert report.quality_lr == pytest.approx(float(judge.quality(lr)[0]), abs=1e-5)
    expected = judge.top_tags(sr, k=4)[0]
    assert [t for t, _ in report.sr_tags] == [t for t, _ in expected]
    assert [p for _, p in report.sr_tags] == pytest.approx([p for _, p in expected], abs=1e-6)
    text = report.to_text()
    for heading in ("Semantic consistency", "CLIP-IQA", "LR tags:", "SR tags:", "Semantic drift", "Prompt"):
        assert heading in text


def test_trimmed_text_encoding_equals_open_clips_encode_text(judge):
    """encode_texts cuts the padding after the end-of-text token; it must not change the result."""
    texts = ["a photo of a dog.", "a close-up photo of polka dots on a red silk dress.", "sky"]
    tokens = judge.tokenizer(texts)
    with torch.no_grad():
        reference = torch.nn.functional.normalize(judge.clip.encode_text(tokens), dim=-1)
    assert torch.allclose(judge.encode_texts(texts), reference, atol=1e-5)
