"""Hostile and broken model files, and outputs that are not numbers (issue 13, parts 2 and 3).

Each hostile file is the embedded default with one thing changed: a weight made NaN or infinite,
metadata that describes a giant UNet, metadata nested 200,000 deep or tens of MB long. None may
give a black image, allocate without bound, or end in a traceback.
"""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import photo_like
from vpdsr import load_pipeline, modelfile, pipeline
from vpdsr.cli import main
from vpdsr.errors import ModelFileError, NonFiniteOutput, NonFiniteWeights, VPDError
from vpdsr.modelfile import load_student, read_meta
from vpdsr.pipeline import default_model_path

DEFAULT = default_model_path()
pytestmark = pytest.mark.skipif(DEFAULT is None, reason="this build ships no embedded default model")


def _default() -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(DEFAULT), "pt") as f:
        meta = json.loads(f.metadata()["vpdsr"])
    return load_file(str(DEFAULT)), meta


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict | str) -> Path:
    save_file(tensors, str(path), metadata={"vpdsr": meta if isinstance(meta, str) else json.dumps(meta)})
    return path


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "photo.png"
    path.parent.mkdir()
    Image.fromarray(photo_like(16, 16)).save(path)
    return path


def _upscale(photo: Path, out: Path, model: Path | None = None) -> int:
    return main(["upscale", str(photo), "-o", str(out), "-q"] + (["--model", str(model)] if model else []))


@pytest.mark.parametrize(
    ("key", "value"),
    [("unet.down_blocks.0.resnets.0.conv1.weight", math.nan), ("vae.decoder.conv_out.weight", math.inf),
     ("prompt_embeds", math.nan)],
)  # fmt: skip
def test_non_finite_weights_are_refused_and_no_image_is_written(tmp_path: Path, photo: Path, capsys, key, value):
    tensors, meta = _default()
    tensors[key].view(-1)[:3] = value
    bad = _write(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(NonFiniteWeights, match="NaN or infinite") as caught:
        load_student(bad)
    assert caught.value.tensor == key and caught.value.count == 3
    assert _upscale(photo, tmp_path / "out", bad) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err
    assert not list(tmp_path.glob("out/**/*.png"))


def test_giant_config_is_refused_within_a_2gb_address_space_cap(tmp_path: Path, photo: Path):
    """A 9 MB file whose metadata describes a 25-billion-weight UNet: refused, never built.

    The cap is set after the imports (torch alone maps about 4 GB of address space for its
    libraries) and leaves 2 GB for loading; building that UNet for real would need 100 GB.
    """
    tensors, meta = _default()
    meta["backbone"]["unet"]["block_out_channels"] = [4096, 8192, 8192]
    giant = _write(tmp_path / "giant.safetensors", tensors, meta)
    script = textwrap.dedent(
        """
        import resource, sys
        import tqdm, vpdsr.imageio, vpdsr.pipeline  # what loading imports, mapped before the cap
        from vpdsr.cli import main
        mapped = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (mapped + 2 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
        sys.exit(main(["upscale", sys.argv[1], "-o", sys.argv[2], "--model", sys.argv[3], "-q"]))
        """
    )
    done = subprocess.run([sys.executable, "-c", script, str(photo), str(tmp_path / "out"), str(giant)],
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "25.6 billion weights" in done.stderr and "holds 2.4 million" in done.stderr
    assert "Traceback" not in done.stderr and not list(tmp_path.glob("out/**/*.png"))


def test_config_with_endless_layers_is_refused_before_it_is_built(tmp_path: Path, monkeypatch):
    """Even on the meta device every layer is a Python object: the count is bounded too."""
    tensors, meta = _default()
    meta["backbone"]["unet"]["layers_per_block"] = 100_000
    monkeypatch.setattr(modelfile, "MAX_MODULES", 1000)  # the default's backbone has 480; keeps the test fast
    load_student(DEFAULT)
    with pytest.raises(ModelFileError, match="more than 1000 layers"):
        load_student(_write(tmp_path / "deep.safetensors", tensors, meta))


def test_deeply_nested_metadata_is_refused_in_info_and_upscale(tmp_path: Path, photo: Path, capsys):
    _, meta = _default()
    text = json.dumps(meta)[:-1] + ', "junk": ' + "[" * 200_000 + "]" * 200_000 + "}"
    bad = _write(tmp_path / "nested.safetensors", {"x": torch.zeros(1)}, text)
    for argv in (["info", str(bad)], ["info", str(bad), "--json"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "nests more than 64 levels" in err and "RecursionError" not in err
    assert _upscale(photo, tmp_path / "out", bad) == 2
    assert "nests more than 64 levels" in capsys.readouterr().err
    _write(bad, {"x": torch.zeros(1)}, json.dumps(meta)[:-1] + ', "ok": ' + "[" * 60 + "]" * 60 + "}")
    assert read_meta(bad).name == meta["name"]  # brackets in strings and escapes do not count either
    _write(bad, {"x": torch.zeros(1)}, json.dumps({**meta, "name": '\\" [[[[' * 100}))
    assert read_meta(bad).name == '\\" [[[[' * 100


def test_metadata_above_the_size_limit_is_refused(tmp_path: Path, monkeypatch):
    tensors, meta = _default()
    monkeypatch.setattr(modelfile, "MAX_META_CHARS", 10_000)
    meta["training"]["log"] = "x" * 20_000
    with pytest.raises(ModelFileError, match="above the limit"):
        read_meta(_write(tmp_path / "long.safetensors", tensors, meta))


def test_info_summarises_50mb_of_metadata(tmp_path: Path, capsys):
    _, meta = _default()
    meta["name"] = "n" * 5000
    meta["training"]["log"] = "x" * 50_000_000
    meta["training"]["losses"] = list(range(200_000))
    big = _write(tmp_path / "big.safetensors", {"x": torch.zeros(1)}, meta)
    assert main(["info", str(big)]) == 0
    out = capsys.readouterr().out
    assert len(out) < 2000 and len(out.splitlines()) < 10
    assert "log: xxx" in out and "(50.0 MB)" in out and "losses (1.5 MB, see --json)" in out and "metadata  51." in out
    assert main(["info", str(big), "--full"]) == 0  # --json, less the backbone, is cut the same way
    captured = capsys.readouterr()
    assert len(captured.out) < 50_000 and "3 values longer than 1000 characters or 100 items" in captured.err
    data = json.loads(captured.out)
    assert data["training"]["log"].endswith("(50.0 MB in all)") and len(data["training"]["losses"]) == 101
    assert data["training"]["config"] == meta["training"]["config"]  # what is not long stays whole
    assert data["backbone"]["unet"]["block_out_channels"] == meta["backbone"]["unet"]["block_out_channels"]


def _poisoned(key: str, value: float) -> pipeline.VPDPipeline:
    """The default pipeline with one parameter made NaN or infinite after loading, as an fp16
    overflow on a real model would leave an activation: the load check cannot see it."""
    pipe = load_pipeline(device="cpu")
    pipe.student.get_parameter(key).data.fill_(value)
    return pipe


@pytest.mark.parametrize(("key", "value"), [("vae.decoder.conv_out.bias", math.inf), ("unet.conv_in.weight", math.nan)])
def test_non_finite_output_raises_the_typed_error(key: str, value: float):
    with pytest.raises(NonFiniteOutput, match="even in float32") as caught:
        _poisoned(key, value)(torch.rand(1, 3, 16, 16))
    assert caught.value.dtype == "float32"
    with pytest.raises(NonFiniteOutput, match="float16 overflowed.*run in float32 or bfloat16") as caught:
        pipeline._check_finite(torch.tensor([1.0, math.inf], dtype=torch.float16), torch.float16)
    assert caught.value.dtype == "float16" and "--" not in str(caught.value)  # the core names no CLI flag


def test_cli_reports_non_finite_output_per_file_and_goes_on(tmp_path: Path, photo: Path, monkeypatch, capsys):
    Image.fromarray(photo_like(16, 16, seed=1)).save(photo.with_name("second.png"))
    pipe = _poisoned("vae.decoder.conv_out.bias", math.inf)
    monkeypatch.setattr(pipeline, "load_pipeline", lambda **_: pipe)
    assert main(["upscale", str(photo.parent), "-o", str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.count("NaN or infinite values") == 2 and "wrote 0 images" in err and "(2 failed)" in err
    assert not list(tmp_path.glob("out/**/*.png"))


def test_demo_shows_the_message_instead_of_an_image(tmp_path: Path, photo: Path):
    from gradio_app import engine
    from gradio_app.config import DemoConfig

    models = engine.DemoModels(DemoConfig(device="cpu"))
    models._pipeline = _poisoned("unet.conv_in.weight", math.nan)
    with pytest.raises(VPDError, match="NaN or infinite values"):  # the page shows VPDErrors as gr.Error
        engine.upscale_file(models, photo, engine.UpscaleOptions(), tmp_path / "result")
    assert not list(tmp_path.glob("result/*.png"))


# --- weights that are not floats, and model paths that are not files (#24) ------------------------


def test_integer_weights_are_refused_in_one_line(tmp_path: Path, photo: Path, capsys):
    """int8 tensors under unchanged metadata loaded, were cast to float and gave garbage (10 dB)."""
    tensors, meta = _default()
    key = "unet.conv_in.weight"
    tensors = {k: (v.clamp(-1, 1) * 127).to(torch.int8) if k.startswith("unet.") else v for k, v in tensors.items()}
    bad = _write(tmp_path / "int8.safetensors", tensors, meta)
    with pytest.raises(ModelFileError, match=r"int8\.safetensors: \d+ tensors are stored as int8, e\.g\. unet\.") as caught:
        load_student(bad)
    assert "\n" not in str(caught.value) and "floating point" in str(caught.value)
    assert _upscale(photo, tmp_path / "out", bad) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "int8" in err and key.split(".")[0] in err and "Traceback" not in err
    assert not list(tmp_path.glob("out/**/*.png"))


def test_half_precision_weights_still_load(tmp_path: Path):
    tensors, meta = _default()
    half = _write(tmp_path / "half.safetensors", {k: v.half() for k, v in tensors.items()}, meta)
    assert load_student(half) is not None


def _special_paths(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    cases = {"folder": (folder, "is a folder, not a model file")}
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.safetensors")
        cases["fifo"] = (tmp_path / "pipe.safetensors", "is a pipe, not a model file")
    if Path("/dev/zero").exists():
        (tmp_path / "zero.safetensors").symlink_to("/dev/zero")
        cases["link to /dev/zero"] = (tmp_path / "zero.safetensors", "is a device, not a model file")
    (tmp_path / "dangling.safetensors").symlink_to(tmp_path / "gone.safetensors")
    cases["dangling link"] = (tmp_path / "dangling.safetensors", "is a link to a missing file")
    return cases


@pytest.mark.parametrize("case", ["folder", "fifo", "link to /dev/zero", "dangling link"])
def test_a_model_path_that_is_not_a_file_says_what_it_is(tmp_path: Path, photo: Path, capsys, case: str):
    cases = _special_paths(tmp_path)
    if case not in cases:
        pytest.skip(f"no {case} here")
    path, message = cases[case]
    with pytest.raises(ModelFileError, match=message) as caught:
        read_meta(path)
    assert "not found" not in str(caught.value)
    assert main(["info", str(path)]) == 2 and _upscale(photo, tmp_path / "out", path) == 2
    err = capsys.readouterr().err
    assert err.count(message) == 2 and "not found" not in err and "Traceback" not in err


def _load_teacher(path: Path) -> object:
    from trainer.teacher_file import load_teacher

    return load_teacher(path)


def _load_clip(path: Path) -> object:
    from vpdsr.semantics import load_clip

    return load_clip(path)


def _convert_osediff(path: Path) -> object:
    from vpdsr.osediff import convert_osediff

    return convert_osediff(path, path.with_name("out.safetensors"))


def _load_base(path: Path) -> object:
    from vpdsr.weights import load_base

    return load_base("sd21-base", path)


@pytest.mark.parametrize(
    ("load", "what"),
    [(_load_teacher, "a teacher file"), (_load_clip, "a CLIP checkpoint"), (_convert_osediff, "an OSEDiff checkpoint"),
     (_load_base, "a base checkpoint")],
)  # fmt: skip
@pytest.mark.parametrize("case", ["fifo", "link to /dev/zero", "dangling link"])
def test_every_model_path_that_is_not_a_file_says_what_it_is(tmp_path: Path, load, what: str, case: str):
    """Only student files said what a path is: a teacher file, a CLIP or OSEDiff checkpoint and the
    base weights that were a pipe or a device said "not found" (or a base: "not an existing file")."""
    cases = _special_paths(tmp_path)
    if case not in cases:
        pytest.skip(f"no {case} here")
    path, message = cases[case]
    with pytest.raises(ModelFileError, match=message.replace("a model file", what)) as caught:
        load(path)
    assert "not found" not in str(caught.value)


def test_two_writers_of_one_model_file_never_take_each_others_temporary_file(tmp_path: Path, monkeypatch):
    """Every writer used ``name + ".tmp"``: one that finished first renamed the other's half-written
    file away, and the other failed (or published the first one's bytes as its own)."""
    tensors, meta = _default()
    student_meta = modelfile.StudentMeta.from_json(json.dumps(meta), "default")
    path, real_save, nested = tmp_path / "model.safetensors", modelfile.save_file, []

    def another_writer_meanwhile(data: dict[str, torch.Tensor], filename: str, **options: object) -> None:
        real_save(data, filename, **options)
        if not nested:  # while this writer holds its temporary file, another writes the same model
            nested.append(filename)
            modelfile.write_model_file(path, student_meta, tensors)

    monkeypatch.setattr(modelfile, "save_file", another_writer_meanwhile)
    assert modelfile.write_model_file(path, student_meta, tensors) == path
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"] and load_student(path) is not None


def test_a_failed_clean_up_does_not_hide_why_a_model_write_failed(tmp_path: Path, monkeypatch):
    tensors, meta = _default()
    student_meta = modelfile.StudentMeta.from_json(json.dumps(meta), "default")

    def disk_full(data: dict[str, torch.Tensor], filename: str, **options: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    def cannot_unlink(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(modelfile, "save_file", disk_full)
    monkeypatch.setattr(Path, "unlink", cannot_unlink)
    with pytest.raises(OSError) as raised:
        modelfile.write_model_file(tmp_path / "model.safetensors", student_meta, tensors)
    assert raised.value.errno == errno.ENOSPC
