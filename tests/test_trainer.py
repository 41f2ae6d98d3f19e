"""End-to-end tests of the trainer on the tiny backbone: config, every stage, resume, export.

Runs are a few steps on 32 px crops of small images written here, on one CPU thread; they check
that the machinery is right (what runs, what is saved, what resumes), not that models learn.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import load_file, save_file

import vpdsr
from tests.sd_fixtures import TINY_SD2, ldm_state, random_parts, text_tower
from trainer import cli
from trainer.config import ConfigError, load_config
from trainer.images import psnr_ssim
from trainer.loop import TrainingInterrupted, TrainingStopped, fill_sr_teacher_cache, train
from trainer.losses import LOSSES, StudentLoss, StudentStep
from trainer.stages import build_stage
from trainer.stages import student as student_module
from trainer.stages.base import portable_paths
from trainer.stages.teacher import VAEReconstruction
from trainer.stages.student import StudentStage
from trainer.teacher_file import load_teacher
from vpdsr.backbones import build_backbone
from vpdsr.errors import ModelFileError
from vpdsr.modelfile import load_student, read_meta
from vpdsr.semantics import build_clip, load_clip, save_clip

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "trainer" / "configs"
TEACHER, STUDENT, DAPE, SD21 = (CONFIGS / f"{n}.yaml" for n in ("tiny-teacher", "tiny-student", "dape", "sd21-student"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads; on a busy CPU, spinning OpenMP threads make these
    runs many times slower (and one thread keeps results bitwise reproducible)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Six smooth random 48x40 photos-to-be (smooth, so the degradations have something to blur)."""
    folder = tmp_path_factory.mktemp("hr")
    rng = np.random.default_rng(0)
    for i in range(6):
        small = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
        Image.fromarray(small).resize((40, 48), Image.BICUBIC).save(folder / f"img{i}.png")
    return folder


def common(images: Path, out: Path) -> list[str]:
    return [
        f"data.hr_dirs=[{images}]",
        f"data.val_hr_dir={images}",
        "data.crop_size=32",
        "data.val_crop_size=32",
        "data.batch_size=2",
        "data.num_workers=0",
        "validation.max_images=2",
        "validation.every=100",
        "checkpoint.every=100",
        "optim.log_every=1",
        f"output_dir={out}",
    ]


def _strings(value: object) -> list[str]:
    """Every string in a JSON-like value (model metadata), to search it for paths."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def logged_names(out: Path) -> set[str]:
    return {line.split(",")[1] for line in (out / "log.csv").read_text().splitlines()[1:]}


@pytest.fixture(scope="module")
def teacher_file(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    cfg = load_config(
        TEACHER, common(images, out) + ["optim.steps=3", "teacher.vae_steps=1", "teacher.sampling_steps=2"]
    )
    return train(cfg, progress=False)


# ----------------------------------------------------------------------------- config


def test_committed_configs_load():
    stages = {path.stem: load_config(path).stage for path in CONFIGS.glob("*.yaml")}
    assert stages == {
        "tiny-teacher": "teacher",
        "tiny-student": "student",
        "tiny-v2-teacher": "teacher",
        "tiny-v2-student": "student",
        "tiny-v2-degrid": "student",
        "tiny-v3-student": "student",
        "tiny-v4-student": "student",
        "sd21-student": "student",
        "dape": "dape",
    }
    v2 = load_config(CONFIGS / "tiny-v2-student.yaml")
    assert v2.backbone == "tiny-v2" and v2.losses.sr_teacher.weight > 0 and v2.data.fixed_batches > 0
    assert load_config(STUDENT).losses.semantic.weight == 0  # no ESS without a real CLIP
    sd = load_config(SD21)
    assert sd.losses.semantic.weight > 0 and sd.student.lora_rank > 0 and sd.clip.path is None


def test_the_model_name_is_the_output_folder_unless_set():
    assert load_config(STUDENT, ["output_dir=runs/my-photos"]).name == "my-photos"
    assert load_config(STUDENT, ["output_dir=runs/x", "name=mine"]).name == "mine"
    assert load_config(CONFIGS / "tiny-v2-student.yaml").name == "vpdsr-tiny-default"  # the embedded default


def test_training_info_paths_are_relative_to_the_run_or_names(tmp_path):
    run = tmp_path / "run"
    info = {"dirs": [str(tmp_path / "photos"), "rel/photos"], "cache": str(run / "cache" / "x"),
            "out": str(run), "prompt": "/imagine a photo"}  # fmt: skip
    assert portable_paths(info, run) == {"dirs": ["photos", "rel/photos"], "cache": "cache/x", "out": "run",
                                         "prompt": "/imagine a photo"}  # fmt: skip


def test_overrides_are_typed_by_the_dataclass_fields():
    cfg = load_config(STUDENT, ["optim.lr=1e-4", "data.hr_dirs=[a, b]", "optim.steps=7.0", "student.teacher=null",
                                "losses.vsd.weight=2"])  # fmt: skip
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.data.hr_dirs == ("a", "b")
    assert cfg.optim.steps == 7 and isinstance(cfg.optim.steps, int)
    assert cfg.student.teacher is None
    assert cfg.losses.vsd.weight == 2.0
    assert load_config(STUDENT, ["optim.mixed_precision=no"]).optim.mixed_precision == "no"  # not False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=1"], "unknown key optim.lrr; valid keys in optim: .*lr_schedule"),
        (["losses.vsd.wieght=1"], "unknown key losses.vsd.wieght"),
        (["losses.vssd.weight=1"], "unknown key losses.vssd; valid keys in losses: adversarial, diffloss, grid, hfp, "),
        (["optim.steps=many"], "optim.steps must be an integer, got 'many'"),
        (["optim.lr_schedule=linear"], "optim.lr_schedule must be one of 'constant', 'cosine'"),
        (["optim.gradient_checkpointing=yes please"], "must be true or false"),
        (["data.crop_size=0"], "data: crop_size must be >= 1"),
        (["losses.vsd.t_max=2000"], "t_min/t_max"),
        (["optim=3"], "optim must be a mapping"),
        (["optim.lr.x=3"], "optim.lr.x=3.: optim.lr is a value, not a section"),
        (["stage=distill"], "stage must be one of"),
        (["student.lora_rank=4"], "train_vae_decoder needs lora_rank 0"),
        (["student.color_fix=sepia"], "color_fix must be one of"),
        (["student.ring_clamp=both"], "ring_clamp must be one of"),
    ],
)
def test_bad_config_values_fail_at_start_with_the_key_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(STUDENT, overrides)


def test_unknown_keys_in_the_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stage: teacher\nteacher:\n  vae_step: 3\n")
    with pytest.raises(ConfigError, match="teacher.vae_step.*valid keys in teacher: .*vae_steps"):
        load_config(path)


def test_cli_reports_config_errors_without_a_traceback(capsys):
    assert cli.main(["--config", str(TEACHER), "optim.lrr=1"]) == 2
    assert "error: unknown key optim.lrr" in capsys.readouterr().err


def test_run_py_works_as_a_script_from_any_folder(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "trainer" / "run.py"), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "degrade-preview" in result.stdout


def test_degrade_preview_command(images, tmp_path):
    out = tmp_path / "grid.png"
    assert cli.main(["degrade-preview", "--config", str(TEACHER), "--out", str(out), "--count", "2",
                     f"data.hr_dirs=[{images}]", "data.crop_size=32"]) == 0  # fmt: skip
    with Image.open(out) as grid:
        assert grid.width >= 3 * 32


@dataclass
class ToyLossConfig:
    weight: float = 0.0
    level: float = 0.0
    """The grey level, in [-1, 1], the toy loss pulls SR towards."""


@pytest.fixture
def toy_loss():
    """A loss added the way a contributor adds one: its config and one class, registered by the class
    statement; nothing else in the trainer is told about it. Unregistered after the test."""

    class ToyTerm(StudentLoss, key="toy", config=ToyLossConfig):
        def terms(self, s: StudentStep) -> dict[str, tuple[float, torch.Tensor]]:
            return {"toy": (self.config.weight, (s.sr - self.config.level).abs().mean())}

    yield ToyTerm
    del LOSSES["toy"]


def test_a_new_loss_is_read_from_yaml_and_trained(toy_loss, teacher_file, images, tmp_path):
    data = yaml.safe_load(STUDENT.read_text())
    data["losses"].update(toy={"weight": 0.5, "level": 0.25}, vsd={"weight": 0}, regression={"weight": 0},
                          diffloss={"weight": 0}, adversarial={"weight": 0})  # fmt: skip
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(path, common(images, tmp_path / "out") + [f"student.teacher={teacher_file}"])
    assert cfg.losses.toy == ToyLossConfig(weight=0.5, level=0.25)  # typed, like every other section
    assert cfg.to_dict()["losses"]["toy"] == {"weight": 0.5, "level": 0.25}
    with pytest.raises(ConfigError, match="unknown key losses.toy.levle; valid keys in losses.toy: level, weight"):
        load_config(path, ["losses.toy.levle=1"])
    with pytest.raises(ConfigError, match="unknown key losses.toyy; valid keys in losses: .*, toy, vsd"):
        load_config(path, ["losses.toyy.weight=1"])
    stage = build_stage(cfg, Accelerator(cpu=True))
    hr = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    logs = stage.train_step({"hr": hr, "lr": hr[..., ::4, ::4]}, 0, torch.Generator().manual_seed(0))
    assert {"rec", "hfp", "toy"} <= set(logs) and not {"vsd", "regression", "diffloss", "gan_g"} & set(logs)
    assert logs["loss"] == pytest.approx(logs["rec"] + logs["hfp"] + 0.5 * logs["toy"], rel=1e-5)


def test_validation_measures_what_the_exported_file_gives(teacher_file, images, tmp_path):
    """Validation runs the student through VPDPipeline, the inference path itself (not a copy of it)."""
    cfg = load_config(STUDENT, common(images, tmp_path) + [
        f"student.teacher={teacher_file}", "losses.vsd.weight=0", "losses.diffloss.weight=0",
        "losses.adversarial.weight=0", "losses.regression.weight=0",
    ])  # fmt: skip
    stage = build_stage(cfg, Accelerator(cpu=True))
    hr = torch.rand(1, 3, 40, 36, generator=torch.Generator().manual_seed(0))  # 40x36: padded to the multiple
    lr = torch.nn.functional.interpolate(hr, scale_factor=0.25, mode="area")
    metrics, rows = stage.validate([{"hr": hr, "lr": lr}], 0)
    pipe = vpdsr.load_pipeline(model=stage.export(tmp_path), device="cpu")
    sr = pipe(lr, color_fix=cfg.student.color_fix)
    assert torch.allclose(rows[0][1], sr[0], atol=1e-6)
    psnr, _ = psnr_ssim(sr, hr)
    assert metrics["psnr"] == pytest.approx(float(psnr.mean()), abs=1e-4)


# ----------------------------------------------------------------------------- stages end to end


def test_teacher_stage_trains_vae_then_unet_and_exports(teacher_file):
    out = teacher_file.parent
    names = logged_names(out)
    assert {"vae/l1", "vae/kl", "vae/hfp", "loss", "val/teacher_psnr", "val/teacher_ssim"} <= names
    assert (out / "samples" / "step-00000003.png").is_file()
    assert (out / "checkpoints" / "step-00000003" / "weights.safetensors").is_file()
    teacher, meta = load_teacher(teacher_file)
    assert teacher.lr_conditioned and meta["sampling_steps"] == 2 and meta["training"]["stage"] == "teacher"
    z_lr = torch.randn(1, 8, 4, 4)
    assert teacher.sample(z_lr, 2, torch.Generator().manual_seed(0)).shape == z_lr.shape


def test_vae_reconstruction_decodes_the_mean_or_a_sample():
    torch.manual_seed(0)
    vae = build_backbone("tiny").vae
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    run = lambda sample, seed: VAEReconstruction(vae, sample)(x, torch.Generator().manual_seed(seed))[0]  # noqa: E731
    with torch.no_grad():
        assert torch.equal(run(False, 0), run(False, 1))
        assert torch.allclose(run(False, 0), vae.decode(vae.encode(x).latent_dist.mean).sample)
        assert not torch.allclose(run(True, 0), run(True, 1))


def test_student_stage_with_every_offline_loss_exports_a_loadable_model(teacher_file, images, tmp_path):
    out = tmp_path / "student"
    cfg = load_config(STUDENT, common(images, out) + [
        f"student.teacher={teacher_file}", "optim.steps=3", "validation.every=3",
        "losses.adversarial.start_step=1", "losses.regression.steps=2", "student.ring_clamp=input",
    ])  # fmt: skip
    path = train(cfg, progress=False)
    names = logged_names(out)
    assert {
        "rec",
        "hfp",
        "regression",
        "vsd",
        "vsd_fake",
        "diffloss",
        "gan_g",
        "gan_d",
        "val/psnr",
        "val/ssim",
    } <= names
    pipe = vpdsr.load_pipeline(model=path, device="cpu")
    assert (
        pipe.info["training"]["stage"] == "student" and pipe.info["training"]["config"]["losses"]["vsd"]["weight"] > 0
    )
    assert pipe.meta.ring_clamp == "input"  # the colour fix trained under is the one the file asks for
    # named after the output folder, and no absolute path of this machine (every path given was one)
    assert path.name == "student.safetensors" and pipe.info["name"] == "student"
    absolute = [s for s in _strings(pipe.info) if Path(s).is_absolute() or str(tmp_path) in s]
    assert not absolute, absolute
    assert pipe.info["training"]["config"]["data"]["hr_dirs"] == [images.name]
    assert pipe.info["training"]["teacher"] == teacher_file.name
    # tiny-student.yaml trains the whole VAE: encoder and decoder both moved away from the teacher's
    teacher_vae = load_teacher(teacher_file)[0].vae.state_dict()
    student_vae = pipe.student.vae.state_dict()
    for part in ("encoder.conv_in.weight", "decoder.conv_out.weight"):
        assert not torch.equal(student_vae[part], teacher_vae[part]), part
    assert torch.equal(student_vae["post_quant_conv.weight"], teacher_vae["post_quant_conv.weight"])
    with Image.open(next(images.glob("*.png"))) as img:
        up = pipe.upscale_pil(img)
        assert up.size == (img.width * 4, img.height * 4)


def test_student_with_lora_feature_discriminator_and_clip_losses(teacher_file, images, tmp_path):
    """Plumbing of ESS and the HFP CLIP term on a tiny *random* CLIP (never do this for real)."""
    torch.manual_seed(0)
    clip, spec = build_clip()
    save_clip(tmp_path / "clip.safetensors", clip, spec)
    out = tmp_path / "student"
    cfg = load_config(STUDENT, common(images, out) + [
        f"student.teacher={teacher_file}", "optim.steps=2", "student.lora_rank=2", "student.train_vae_decoder=false",
        "optim.ema_decay=0",
        f"clip.path={tmp_path / 'clip.safetensors'}", "losses.semantic.weight=0.5", "losses.semantic.kl_weight=0.1",
        "losses.hfp.clip_weight=0.1", "losses.hfp.bands=both", "losses.adversarial.discriminator=prior_features",
        "losses.adversarial.start_step=0", "losses.regression.weight=0", "losses.vsd.weight=0",
    ])  # fmt: skip
    path = train(cfg, progress=False)
    assert {"ess_cos", "ess_kl", "hfp", "gan_g", "gan_d", "diffloss"} <= logged_names(out)
    meta = read_meta(path)
    assert meta.weights == "full" and not meta.lora  # the tiny student's LoRA is merged on export
    assert vpdsr.load_pipeline(model=path, device="cpu")(torch.rand(1, 3, 12, 12)).shape == (1, 3, 48, 48)


def _tiny_base():
    torch.manual_seed(123)
    parts = build_backbone("tiny")
    return SimpleNamespace(vae=parts.vae, unet=parts.unet, text_encoder=None)


@pytest.fixture(scope="module")
def toy_sd(tmp_path_factory) -> tuple[Path, Path]:
    """A toy SD 2 backbone: its config as a JSON file and a single-file checkpoint in the real layout."""
    folder = tmp_path_factory.mktemp("toy-sd")
    (folder / "tiny-sd2.json").write_text(json.dumps(TINY_SD2))
    save_file(ldm_state(*random_parts(), text_tower()), str(folder / "tiny-sd2.safetensors"))
    return folder / "tiny-sd2.json", folder / "tiny-sd2.safetensors"


def test_sd_style_student_lora_vsd_with_cfg_and_ess(images, tmp_path, toy_sd):
    """The sd21-student recipe on a toy SD 2 (real file layout, text encoder and base loader):
    LoRA + conv_in, VSD against the text-conditioned base with CFG, ESS (tiny random CLIP)."""
    backbone, checkpoint = toy_sd
    torch.manual_seed(0)
    clip, spec = build_clip()
    save_clip(tmp_path / "clip.safetensors", clip, spec)
    out = tmp_path / "student"
    cfg = load_config(SD21, common(images, out) + [
        f"backbone={backbone}", f"student.base={checkpoint}", f"clip.path={tmp_path / 'clip.safetensors'}",
        "student.prompt=a photo", "optim.steps=2", "optim.mixed_precision=no", "optim.gradient_checkpointing=true",
        "losses.diffloss.weight=0.1", "validation.every=2",
    ])  # fmt: skip
    path = train(cfg, progress=False)
    assert {"rec", "vsd", "vsd_fake", "ess_cos", "ess_kl", "hfp", "diffloss", "val/psnr"} <= logged_names(out)
    meta = read_meta(path)
    assert meta.weights == "lora" and {s.part for s in meta.lora} == {"unet", "vae"} and meta.prompt == "a photo"
    stored = load_file(str(path))
    assert all("lora_" in k or k.startswith("unet.conv_in.") or k == "prompt_embeds" for k in stored)
    with pytest.raises(ModelFileError, match="base weights"):
        load_student(path)
    pipe = vpdsr.load_pipeline(model=path, base=checkpoint, device="cpu")
    assert pipe(torch.rand(1, 3, 12, 12), color_fix="none").shape == (1, 3, 48, 48)


def test_dape_stage_exports_a_loadable_clip(images, tmp_path):
    torch.manual_seed(0)
    clip, spec = build_clip()
    save_clip(tmp_path / "clip.safetensors", clip, spec)
    out = tmp_path / "dape"
    cfg = load_config(DAPE, common(images, out) + [f"clip.path={tmp_path / 'clip.safetensors'}", "optim.steps=3",
                                                  "validation.every=3", "dape.lora_rank=2"])  # fmt: skip
    path = train(cfg, progress=False)
    assert {"embed", "kl", "val/cos_adapted", "val/cos_original"} <= logged_names(out)
    adapted, adapted_spec = load_clip(path)
    assert adapted_spec.info["stage"] == "dape"
    assert not any("lora_" in k for k in adapted.state_dict())
    changed = [k for k, v in adapted.state_dict().items() if not torch.equal(v, clip.state_dict()[k])]
    assert changed and all(k.startswith("visual.") and ".mlp." in k for k in changed)


# ----------------------------------------------------------------------------- errors, NaN, resume


def test_missing_models_are_reported_at_start(images, tmp_path, teacher_file, monkeypatch):
    monkeypatch.setattr(student_module, "load_base_weights", lambda config, path, option: _tiny_base())
    base = common(images, tmp_path / "x") + ["optim.steps=1"]
    with pytest.raises(ModelFileError, match="clip.path"):
        train(
            load_config(STUDENT, base + [f"student.teacher={teacher_file}", "losses.semantic.weight=1"]), progress=False
        )
    with pytest.raises(ModelFileError, match="lpips_vgg_path"):
        train(
            load_config(STUDENT, base + [f"student.teacher={teacher_file}", "losses.reconstruction.lpips_weight=1"]),
            progress=False,
        )
    with pytest.raises(ConfigError, match="regression needs a multi-step SR teacher"):
        train(load_config(STUDENT, base + ["student.teacher=null", "student.init_from=base", "student.prior=base",
                                           "student.base=x"]), progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="dape stage fine-tunes a real CLIP"):
        train(load_config(DAPE, base), progress=False)


def test_nan_losses_skip_steps_then_stop(images, tmp_path, teacher_file):
    out = tmp_path / "nan"
    cfg = load_config(STUDENT, common(images, out) + [
        f"student.teacher={teacher_file}", "optim.steps=5", "optim.max_bad_steps=2",
        "losses.reconstruction.weight=.nan",
        "losses.vsd.weight=0", "losses.regression.weight=0", "losses.diffloss.weight=0", "losses.adversarial.weight=0",
    ])  # fmt: skip
    with (
        pytest.warns(UserWarning, match="skipped: student loss is nan"),
        pytest.raises(TrainingStopped, match="2 steps in a row"),
    ):
        train(cfg, progress=False)
    assert not (out / f"{cfg.name}.safetensors").exists()


def _all_tensors(out: Path, name: str) -> dict[str, torch.Tensor]:
    """The exported student and the final checkpoint (fake model, discriminator, EMA, optimizers)."""
    tensors = {f"export/{k}": v for k, v in load_file(str(out / f"{name}.safetensors")).items()}
    final = out / "checkpoints" / "step-00000004"
    tensors.update({f"ckpt/{k}": v for k, v in load_file(str(final / "weights.safetensors")).items()})
    tensors.update({f"ema/{k}": v for k, v in load_file(str(final / "ema.safetensors")).items()})
    for opt_name, state in torch.load(final / "optim.pt", weights_only=True).items():
        for pid, values in state.get("state", {}).items():
            tensors.update({f"{opt_name}/{pid}/{k}": v for k, v in values.items()})
    return tensors


def test_resume_after_interruption_matches_an_uninterrupted_run(teacher_file, images, tmp_path, monkeypatch):
    overrides = [f"student.teacher={teacher_file}", "optim.steps=4", "checkpoint.every=2", "optim.ema_decay=0.9",
                 "optim.warmup_steps=3", "losses.adversarial.start_step=1", "losses.regression.weight=0",
                 "losses.diffloss.weight=0", "checkpoint.keep=3"]  # fmt: skip
    full = load_config(STUDENT, common(images, tmp_path / "full") + overrides)
    train(full, progress=False)
    expected = _all_tensors(tmp_path / "full", full.name)

    cfg = load_config(STUDENT, common(images, tmp_path / "resumed") + overrides)
    original = StudentStage.train_step

    def interrupted(self, batch, step, generator):
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C during the third step
        return original(self, batch, step, generator)

    monkeypatch.setattr(StudentStage, "train_step", interrupted)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(cfg, progress=False)
    assert stopped.value.step == 3 and stopped.value.checkpoint.name == "step-00000003"
    monkeypatch.undo()
    assert not (tmp_path / "resumed" / f"{cfg.name}.safetensors").exists()

    def assert_same() -> None:
        got = _all_tensors(tmp_path / "resumed", cfg.name)
        assert got.keys() == expected.keys()
        different = [k for k in expected if not torch.equal(got[k], expected[k])]
        assert not different, different[:5]

    train(cfg, resume="latest", progress=False)  # after the graceful stop at step 3
    assert_same()
    train(cfg, resume=str(tmp_path / "resumed" / "checkpoints" / "step-00000002"), progress=False)  # as after a crash
    assert_same()


# ----------------------------------------------------------------------------- pretrained SR teacher


def _tiny_esrgan(path: Path, scale: int = 4) -> Path:
    """A random RRDBNet (ESRGAN) written as spandrel and ComfyUI would find it in the wild."""
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    model = ESRGAN(num_filters=8, num_blocks=1, scale=scale)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def test_student_distils_a_spandrel_teacher_with_cached_outputs(teacher_file, images, tmp_path):
    sr_teacher, cache = _tiny_esrgan(tmp_path / "esrgan.safetensors"), tmp_path / "cache"
    overrides = [
        f"student.teacher={teacher_file}", f"student.sr_teacher={sr_teacher}", f"student.sr_teacher_cache={cache}",
        "losses.sr_teacher.weight=1.0", "losses.sr_teacher.hfp_target=true", "losses.sr_teacher.gan_target=true",
        "losses.adversarial.start_step=0", "losses.vsd.weight=0", "losses.diffloss.weight=0",
        "losses.regression.weight=0", "data.fixed_batches=2", "optim.steps=4", "validation.every=4",
    ]  # fmt: skip
    out = tmp_path / "student"
    cfg = load_config(STUDENT, common(images, out) + overrides)
    assert fill_sr_teacher_cache(cfg, progress=False) == 4  # 2 fixed batches of 2 crops, made ahead
    assert fill_sr_teacher_cache(cfg, progress=False) == 0
    entries = sorted(cache.rglob("*.safetensors"))
    assert len(entries) == 4
    assert load_file(entries[0])["sr"].dtype == torch.uint8 and load_file(entries[0])["sr"].shape == (3, 32, 32)
    stamps = {p: p.stat().st_mtime_ns for p in entries}
    train(cfg, progress=False)  # 4 steps see each fixed batch twice
    assert {"sr_teacher", "hfp", "gan_d"} <= logged_names(out)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")} == stamps  # all read back, none remade


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["losses.sr_teacher.weight=1.0"], "set student.sr_teacher"),
        (["student.sr_teacher=SRT"], "no loss uses it"),
        (["student.sr_teacher=SRT_X2", "losses.sr_teacher.weight=1.0"], "upscales x2, this run trains x4"),
        (["student.sr_teacher=missing.pth", "losses.sr_teacher.weight=1.0"], "missing.pth not found"),
    ],
)
def test_sr_teacher_mistakes_are_named_at_start(teacher_file, images, tmp_path, overrides, message):
    files = {"SRT": _tiny_esrgan(tmp_path / "x4.safetensors"), "SRT_X2": _tiny_esrgan(tmp_path / "x2.safetensors", 2)}
    overrides = [o.split("=")[0] + "=" + str(files.get(o.split("=")[1], o.split("=")[1])) for o in overrides]
    cfg = load_config(STUDENT, common(images, tmp_path / "out") + [f"student.teacher={teacher_file}", *overrides])
    with pytest.raises(ConfigError, match=message):
        train(cfg, progress=False)


def test_sr_teacher_remembers_outputs_only_when_asked(tmp_path):
    from trainer.losses import load_sr_teacher

    path = _tiny_esrgan(tmp_path / "x4.safetensors")
    lr = torch.rand(2, 3, 8, 8)
    for remember in (False, True):
        teacher = load_sr_teacher(path, 4, remember=remember)
        first, again = teacher(lr), teacher(lr)
        assert torch.equal(first, again) and first.shape == (2, 3, 32, 32)
        assert teacher.computed == (2 if remember else 4)  # no disk cache: memory is the only one
