"""One validation gate: the core raises typed errors in its own terms, each front-end words them.

The core (``vpdsr/`` but its CLI) names no front-end's setting, so no string in it holds ``--``;
the CLI, the ComfyUI node, the demo and the trainer each add the setting that fixes the problem
(a flag, a node input, a launch option, a config key) to the same error, caught by its type.
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

import vpdsr.pipeline
from comfyui_vpdsr.loading import load_student_pipeline
from gradio_app.config import DemoConfig
from gradio_app.engine import DemoModels, UpscaleOptions, upscale_image
from trainer.config_loading import ConfigError
from trainer.stages.base import load_base_weights
from vpdsr import OneStepStudent, build_backbone, load_pipeline, save_student
from vpdsr.backbones import backbone_config
from vpdsr.cli import main
from vpdsr.errors import DownloadNotAllowed, MissingBaseError, OutOfMemory, VPDError
from vpdsr.lora import LoraSpec, add_lora
from vpdsr.weights import load_base

CORE = Path(__file__).resolve().parents[1] / "vpdsr"
CPU = torch.device("cpu")


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of docstring nodes: they document, and may show a command line; messages are the rest."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def test_no_core_string_names_a_front_ends_flag():
    """Every str constant and f-string part under vpdsr/ except the CLI: ``--`` would be a flag of one front-end."""
    hits = []
    for path in sorted(CORE.rglob("*.py")):
        if path == CORE / "cli.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = _docstrings(tree)
        hits += [f"{path.relative_to(CORE.parent)}:{node.lineno}: {node.value[:80]!r}" for node in ast.walk(tree)
                 if isinstance(node, ast.Constant) and isinstance(node.value, str) and "--" in node.value
                 and id(node) not in docs]  # fmt: skip
    assert not hits, "core strings that name a front-end's flag:\n" + "\n".join(hits)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    parts = build_backbone("tiny")
    student = OneStepStudent(parts.vae, parts.unet, parts.config, prompt_embeds=torch.randn(8, 64))
    spec = LoraSpec("unet", "default", rank=2, alpha=2.0, targets=("conv_in",))
    add_lora(student.unet, spec)
    return save_student(tmp_path_factory.mktemp("models") / "lora.safetensors", student, weights="lora", lora=[spec])


def _out_of_memory(*args: object, **kwargs: object) -> None:
    raise torch.OutOfMemoryError("simulated")


@pytest.fixture
def no_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every network call runs out of memory, down to the smallest tile."""
    monkeypatch.setattr(vpdsr.pipeline.VPDPipeline, "_upscale", _out_of_memory)


def _no_flag(err: VPDError) -> VPDError:
    assert "--" not in str(err)
    return err


# --- the core: typed errors with fields, in its own terms --------------------------------------


def test_a_lora_student_without_its_base_is_one_typed_error(lora_file: Path):
    with pytest.raises(MissingBaseError, match="lora.safetensors is a LoRA student .* needs its base") as caught:
        load_pipeline(lora_file, device="cpu")
    err = _no_flag(caught.value)
    assert (err.backbone, err.path) == ("tiny", str(lora_file))


def test_base_weights_errors_carry_what_was_given(tmp_path: Path):
    with pytest.raises(MissingBaseError) as caught:
        load_base("tiny", None)
    assert _no_flag(caught.value).backbone == "tiny" and caught.value.path == ""
    with pytest.raises(DownloadNotAllowed) as caught:
        load_base("tiny", str(tmp_path / "nowhere"))
    assert _no_flag(caught.value).source == str(tmp_path / "nowhere")


def test_out_of_memory_carries_device_tile_and_dtype(random_student_file: Path, no_memory: None):
    pipe = load_pipeline(random_student_file, device="cpu")
    with pytest.raises(OutOfMemory) as caught:
        pipe(torch.rand(1, 3, 32, 32), tile=256)
    err = _no_flag(caught.value)
    assert (err.device, err.dtype) == ("cpu", "float32") and vpdsr.pipeline.MIN_TILE <= err.tile < 256


def test_worded_keeps_the_type_and_fields_and_pickles():
    err = MissingBaseError("x needs its base weights", backbone="tiny", path="x")
    worded = err.worded({OutOfMemory: "no", MissingBaseError: "pass them with --base"})
    assert type(worded) is MissingBaseError and str(worded) == "x needs its base weights (pass them with --base)"
    again = pickle.loads(pickle.dumps(worded))
    assert (str(again), again.backbone, again.path) == (str(worded), "tiny", "x")
    assert str(err) == "x needs its base weights"  # the original is untouched
    assert err.worded({OutOfMemory: "no"}) is err


# --- each front-end in its own words -----------------------------------------------------------


def test_cli_names_its_flags(lora_file: Path, photo_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = str(tmp_path / "out")
    assert main(["upscale", str(photo_file), "-o", out, "--model", str(lora_file), "-q"]) == 2
    assert "needs its base weights" in (err := capsys.readouterr().err) and "(pass them with --base)" in err
    missing = str(tmp_path / "sd-turbo")
    assert main(["upscale", str(photo_file), "-o", out, "--model", str(lora_file), "--base", missing, "-q"]) == 2
    assert "--allow-download" in capsys.readouterr().err


def test_cli_names_dtype_and_device_when_memory_runs_out(random_student_file: Path, photo_file: Path,
                                                         tmp_path: Path, no_memory: None,
                                                         capsys: pytest.CaptureFixture):  # fmt: skip
    assert main(["upscale", str(photo_file), "-o", str(tmp_path / "out"), "--model", str(random_student_file),
                 "-q"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "out of cpu memory" in err and "--dtype fp16" in err and "--device cpu" in err


def test_node_names_its_inputs(lora_file: Path):
    """The node's out-of-memory wording is checked through the node itself in test_comfyui_nodes.py."""
    with pytest.raises(MissingBaseError, match=r"choose its base model in 'base' of Load VPD Model") as caught:
        load_student_pipeline(lora_file, None, "auto", CPU, CPU)
    assert "--" not in str(caught.value)


def test_demo_names_its_launch_options(lora_file: Path, random_student_file: Path):
    lora = DemoModels(DemoConfig(model=lora_file, device="cpu"))
    try:
        assert "--base or VPDSR_BASE" in lora.describe()
        with pytest.raises(MissingBaseError, match=r"start the demo with --base or VPDSR_BASE"):
            upscale_image(lora, Image.new("RGB", (16, 16)), UpscaleOptions())
    finally:
        lora.jobs.close()


def test_demo_names_its_device_option_when_memory_runs_out(random_student_file: Path, no_memory: None):
    full = DemoModels(DemoConfig(model=random_student_file, device="cpu"))
    try:
        with pytest.raises(OutOfMemory, match=r"--device or VPDSR_DEVICE set to cpu"):
            upscale_image(full, Image.new("RGB", (16, 16)), UpscaleOptions())
    finally:
        full.jobs.close()


def test_trainer_names_its_config_key(tmp_path: Path):
    config = backbone_config("tiny")
    with pytest.raises(ConfigError, match=r"needs its base weights.*\(set student\.base to one\)"):
        load_base_weights(config, None, "student.base")
    with pytest.raises(ConfigError, match=r"\(teacher\.base: the trainer downloads nothing\)"):
        load_base_weights(config, str(tmp_path / "gone"), "teacher.base")
