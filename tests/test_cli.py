import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import photo_like
from vpdsr.cli import main


def test_upscale_files_and_folders_with_a_bad_file(tmp_path: Path, random_student_file: Path, capsys):
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    Image.fromarray(photo_like(24, 32, 1)).save(inputs / "a.png")
    Image.fromarray(photo_like(20, 20, 2)).save(inputs / "sub" / "b.jpg", quality=90)
    (inputs / "broken.png").write_bytes(b"\x89PNG garbage")
    out = tmp_path / "out"
    code = main(["upscale", str(inputs), "-o", str(out), "--model", str(random_student_file), "-q"])
    assert code == 1  # the broken file fails, the others are written
    assert Image.open(out / "a.png").size == (128, 96)
    assert Image.open(out / "b.png").size == (80, 80)
    err = capsys.readouterr().err
    assert "broken.png" in err and "1 of 3 images failed" in err


def test_upscale_single_file_to_named_output(tmp_path: Path, random_student_file: Path):
    src = tmp_path / "p.png"
    Image.fromarray(photo_like(16, 16)).save(src)
    dst = tmp_path / "result.png"
    assert main(["upscale", str(src), "-o", str(dst), "--model", str(random_student_file), "--scale", "2", "-q"]) == 0
    assert Image.open(dst).size == (32, 32)


def test_info_and_clear_errors(tmp_path: Path, random_student_file: Path, capsys):
    assert main(["info", str(random_student_file)]) == 0
    assert '"vpdsr-student"' in capsys.readouterr().out
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    assert main(["info", str(bad)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


def test_python_dash_m_works(random_student_file: Path):
    done = subprocess.run([sys.executable, "-m", "vpdsr", "info", str(random_student_file)], capture_output=True, text=True)
    assert done.returncode == 0 and "random-tiny" in done.stdout


@pytest.mark.parametrize("argv", [["upscale", "x.png", "-o", "o", "--scale", "two"], ["upscale"]])
def test_bad_arguments_exit_with_usage(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
