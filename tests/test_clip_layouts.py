"""CLIPs from the files ComfyUI users have: every layout of the same weights scores the same.

The reference is Hugging Face's own ``CLIPModel`` on those weights (``clip_layouts.toy_hf_clip``):
the text tower alone (clip_l), the image tower alone (clip_vision), an SD 2.x checkpoint's text
tower, whole ``CLIPModel`` files and folders, and open_clip's own file, all within 1e-5.
"""

from __future__ import annotations

import math
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

from tests.clip_layouts import (
    toy_hf_clip,
    write_clip_model,
    write_image_tower,
    write_sd2_checkpoint,
    write_text_tower,
)
from vpdsr.errors import ModelFileError
from vpdsr.semantics import SemanticModel, build_tokenizer, load_clip, save_clip
from vpdsr.semantics.layouts import infer_config
from vpdsr.semantics.loading import _instantiate, resolve_config

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-5
PROMPTS = ["a photo of a cat", "text", "a red car parked in the street at night"]


def _features(output) -> torch.Tensor:
    """transformers 5 returns a model output, older versions the tensor."""
    return getattr(output, "pooler_output", output)


@pytest.fixture(scope="module")
def toy():
    return toy_hf_clip(seed=0)


@pytest.fixture(scope="module")
def files(toy, tmp_path_factory):
    """The toy in every layout, as a ComfyUI models folder holds them."""
    root = tmp_path_factory.mktemp("models")
    for folder in ("text_encoders", "clip_vision", "checkpoints", "clip"):
        (root / folder).mkdir()
    whole = write_clip_model(toy, root / "clip" / "hf-clip.safetensors")
    out = {
        "whole": whole,
        "text": write_text_tower(toy, root / "text_encoders" / "clip_l.safetensors"),
        "image": write_image_tower(toy, root / "clip_vision" / "vit.safetensors"),
    }
    reference, _ = load_clip(whole)
    out["sd2"] = write_sd2_checkpoint(reference, root / "checkpoints" / "sd2.safetensors")
    out["sd2_ckpt"] = write_sd2_checkpoint(reference, root / "checkpoints" / "sd2.ckpt")
    return out


def _scores(clip: torch.nn.Module, spec) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = build_tokenizer(spec)(PROMPTS)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return clip.encode_text(tokens), clip.encode_image(pixels)


def _reference(toy) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = open_clip.tokenize(PROMPTS)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        text = _features(toy.get_text_features(input_ids=tokens))
        return text, _features(toy.get_image_features(pixel_values=pixels))


def test_the_tower_files_have_the_exact_keys_transformers_gives_them(toy, files):
    from safetensors import safe_open

    def keys(path):
        with safe_open(str(path), "pt") as f:
            return set(f.keys())

    text = CLIPTextModelWithProjection(toy.config.text_config).state_dict()
    image = CLIPVisionModelWithProjection(toy.config.vision_config).state_dict()
    assert keys(files["text"]) == set(text) - {"text_model.embeddings.position_ids"}
    assert keys(files["image"]) == set(image) - {"vision_model.embeddings.position_ids"}


@pytest.mark.parametrize(
    "image, text",
    [("whole", None), ("image", "text"), ("image", "sd2"), ("image", "sd2_ckpt"), ("whole", "sd2")],
)
def test_every_layout_scores_like_transformers(toy, files, image, text):
    clip, spec = load_clip(files[image], text_path=None if text is None else files[text])
    ours_text, ours_image = _scores(clip, spec)
    ref_text, ref_image = _reference(toy)
    assert torch.allclose(ours_text, ref_text, atol=TOL, rtol=0)
    assert torch.allclose(ours_image, ref_image, atol=TOL, rtol=0)
    assert spec.config["quick_gelu"] is False and spec.config["text_cfg"]["heads"] == 2
    expected_scale = toy.logit_scale.item() if text in (None, "sd2", "sd2_ckpt") else math.log(100.0)
    assert clip.logit_scale.item() == pytest.approx(expected_scale)


def test_open_clip_s_own_file_of_the_same_weights_scores_the_same(toy, files, tmp_path):
    clip, spec = load_clip(files["whole"])
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "open_clip.safetensors"))
    again, _ = load_clip(tmp_path / "open_clip.safetensors", config=spec.config)
    for ours, ref in zip(_scores(again, spec), _reference(toy), strict=True):
        assert torch.allclose(ours, ref, atol=TOL, rtol=0)


def test_the_inspector_scores_the_same_from_each_layout(files):
    images = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(5))
    judges = [
        SemanticModel.from_file(files["whole"], tags=["cat", "dog", "car", "tree"]),
        SemanticModel.from_file(files["image"], text_path=files["text"], tags=["cat", "dog", "car", "tree"]),
        SemanticModel.from_file(files["image"], text_path=files["sd2"], tags=["cat", "dog", "car", "tree"]),
    ]
    with torch.no_grad():
        logits = [judge.tag_logits(images) * 100 / judge.logit_scale for judge in judges]
        consistency = [judge.consistency(images, images[..., ::2, ::2]) for judge in judges]
    for other in logits[1:]:
        assert torch.allclose(other, logits[0], atol=TOL, rtol=0)
    for other in consistency[1:]:
        assert torch.allclose(other, consistency[0], atol=TOL, rtol=0)


def test_a_pair_exports_and_reloads_as_one_open_clip_file(files, tmp_path):
    clip, spec = load_clip(files["image"], text_path=files["text"])
    save_clip(tmp_path / "joined.safetensors", clip, spec)
    again, again_spec = load_clip(tmp_path / "joined.safetensors")
    assert again_spec.config == spec.config
    assert all(torch.equal(a, b) for a, b in zip(_scores(clip, spec), _scores(again, again_spec), strict=True))


def test_a_hugging_face_folder_gives_heads_and_activation(tmp_path):
    """4 heads of 32 and quick GELU are not in the weights: its config.json says so."""
    toy = toy_hf_clip(seed=1, act="quick_gelu", text_heads=4, image_heads=4)
    toy.save_pretrained(tmp_path / "clip-folder")
    for path in (tmp_path / "clip-folder", tmp_path / "clip-folder" / "model.safetensors"):
        clip, spec = load_clip(path)
        assert spec.config["quick_gelu"] is True and spec.config["text_cfg"]["heads"] == 4
        for ours, ref in zip(_scores(clip, spec), _reference(toy), strict=True):
            assert torch.allclose(ours, ref, atol=TOL, rtol=0)


def test_halves_of_different_sizes_are_refused_naming_both_files(toy, files, tmp_path):
    other = write_text_tower(toy_hf_clip(seed=2, embed=48), tmp_path / "clip_g.safetensors")
    with pytest.raises(ModelFileError, match=r"vit\.safetensors \(64-wide.*clip_g\.safetensors \(48-wide"):
        load_clip(files["image"], text_path=other)


def test_a_half_alone_or_without_projection_is_refused(toy, files, tmp_path):
    with pytest.raises(ModelFileError, match=r"vit\.safetensors holds no CLIP text tower .*matching text tower"):
        load_clip(files["image"])
    with pytest.raises(ModelFileError, match=r"clip_l\.safetensors holds no CLIP image tower"):
        load_clip(files["text"], text_path=files["image"])
    sd1 = {
        f"cond_stage_model.transformer.{k}": v.contiguous()
        for k, v in toy.state_dict().items()
        if k.startswith("text_model.")
    }
    save_file(sd1, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(ModelFileError, match=r"sd15\.safetensors: its text tower has no projection"):
        load_clip(files["image"], text_path=tmp_path / "sd15.safetensors")


def test_a_named_config_overrides_what_the_shapes_say(files):
    config = dict(resolve_config("vpdsr-tiny-clip").config)
    with pytest.raises(ModelFileError, match=r"vit\.safetensors \+ .*clip_l\.safetensors does not match"):
        load_clip(files["image"], config=config, text_path=files["text"])


@pytest.mark.parametrize("name", ["ViT-B-32-quickgelu", "ViT-L-14-quickgelu", "ViT-H-14", "ViT-bigG-14"])
def test_shapes_give_the_published_architectures(name):
    """What ComfyUI's files hold: ViT-L/14 (clip_l + clip_vision), ViT-H/14 (SD 2.x), ViT-bigG/14 (SDXL)."""
    expected = resolve_config(name)
    state = _instantiate(expected, device="meta").state_dict()
    inferred = resolve_config(infer_config(state, {}, ("image", "text")))
    assert inferred.config["quick_gelu"] == expected.config.get("quick_gelu", False)
    built = _instantiate(inferred, device="meta")
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in state.items()}
    vision = expected.config["vision_cfg"]
    assert built.visual.transformer.resblocks[0].attn.num_heads == vision["width"] // vision.get("head_width", 64)
    assert built.transformer.resblocks[0].attn.num_heads == expected.config["text_cfg"]["heads"]


# --- the trainer: clip.path (image tower) + clip.text_path ---------------------------------------


def test_the_ess_loss_and_the_dape_stage_take_a_pair(files, tmp_path):
    import numpy as np
    from PIL import Image

    from trainer.config import load_config
    from trainer.loop import train
    from trainer.losses import SemanticLoss, load_semantic_model

    judge = load_semantic_model(str(files["image"]), None, None, "the ESS loss", str(files["sd2"]))
    reference = SemanticModel.from_file(files["whole"])
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ours, theirs = SemanticLoss(judge)(images, images.flip(0)), SemanticLoss(reference)(images, images.flip(0))
    assert all(torch.allclose(ours[k], theirs[k], atol=TOL, rtol=0) for k in ("cosine", "kl"))

    photos = tmp_path / "hr"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).resize((40, 48)).save(photos / f"{i}.png")
    out = tmp_path / "dape"
    cfg = load_config(
        REPO / "trainer" / "configs" / "dape.yaml",
        [
            f"data.hr_dirs=[{photos}]", f"data.val_hr_dir={photos}", "data.crop_size=32", "data.val_crop_size=32",
            "data.batch_size=2", "data.num_workers=0", "validation.max_images=2", "validation.every=100",
            "checkpoint.every=100", f"output_dir={out}", "optim.steps=2", "dape.lora_rank=2",
            f"clip.path={files['image']}", f"clip.text_path={files['text']}",
        ],
    )  # fmt: skip
    adapted, spec = load_clip(train(cfg, progress=False))
    assert spec.config == load_clip(files["image"], text_path=files["text"])[1].config
    assert adapted.text_projection.shape == (128, 64)
