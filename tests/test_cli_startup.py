"""The CLI answers at once: help, version and argument errors without importing torch, and a closed
pipe ends it quietly. Each check runs in a fresh interpreter, where ``sys.modules`` tells."""

import subprocess
import sys
from pathlib import Path

import pytest

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
    ],
)
def test_answers_without_importing_torch(tmp_path: Path, argv: list[str]):
    done = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], capture_output=True, text=True,
                          cwd=tmp_path)  # fmt: skip
    assert "heavy []" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    if argv == ["--version"]:
        assert done.stdout.startswith("vpdsr ")
    if argv[0] == "upscale" and "--help" not in argv:
        assert "exit 2" in done.stderr


def test_closed_pipe_ends_quietly(random_student_file: Path):
    """``vpdsr info MODEL | head``: the reader is gone before the output is written."""
    for extra in ([], ["--full"]):
        proc = subprocess.Popen([sys.executable, "-m", "vpdsr", "info", str(random_student_file), *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        proc.stdout.close()  # long before the child has imported torch and read the file
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) != 0
        assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
