"""The CLI answers at once: help, version and argument errors without importing torch, and a closed
pipe ends it quietly. Each check runs in a fresh interpreter, where ``sys.modules`` tells."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bench.startup import COMFY_START

HEAVY = ("torch", "diffusers", "gradio", "transformers", "numpy")
PROBE = """
import sys
from vpdsr.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("exit", code, "heavy", heavy, file=sys.stderr)
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        ["upscale", "--help"],
        ["info", "--help"],
        ["upscale", "x.png", "-o", "out", "--scale", "9"],
        ["upscale", "missing.png", "-o", "out"],
        ["info", "missing.safetensors"],
        ["info", "."],
        ["upscale", "x.png", "-o", "out", "--model", "missing.safetensors"],
    ],
)
def test_answers_without_importing_torch(tmp_path: Path, argv: list[str]):
    """Help, argument errors and a model path that is no file answer in well under a second."""
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    done = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], capture_output=True, text=True,
                          cwd=tmp_path)  # fmt: skip
    assert "heavy []" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    if argv == ["--version"]:
        assert done.stdout.startswith("vpdsr ")
    if argv[0] in ("upscale", "info") and "--help" not in argv:
        assert "exit 2" in done.stderr
    if "missing.safetensors" in argv:
        assert "vpdsr: model file not found: missing.safetensors\n" in done.stderr
    if argv == ["info", "."]:
        assert "vpdsr: .: is a folder, not a model file\n" in done.stderr


def test_comfyui_start_up_loads_no_diffusers_peft_or_matplotlib():
    """ComfyUI imports the pack, calls ``comfy_entrypoint`` and reads every node's schema at its own start-up,
    so whatever the pack imports there costs every ComfyUI user seconds. The pipeline (diffusers, which
    imports peft) loads with the first model and matplotlib with the first chart. (open_clip still comes
    with the CLIP loader's list of configs, ``vpdsr.semantics.list_configs``.)"""
    probe = COMFY_START + "\nprint('heavy', sorted(m for m in ('diffusers', 'peft', 'matplotlib') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "heavy []" in done.stdout, done.stdout


def test_closed_pipe_ends_quietly(random_student_file: Path):
    """``vpdsr info MODEL | head``: the reader is gone before the output is written."""
    for extra in ([], ["--full"]):
        proc = subprocess.Popen([sys.executable, "-m", "vpdsr", "info", str(random_student_file), *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        proc.stdout.close()  # long before the child has imported torch and read the file
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) != 0
        assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
