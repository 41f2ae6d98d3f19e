"""The ``vpdsr`` command end to end, on the tiny random student and 16 px inputs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import photo_like
from vpdsr import color
from vpdsr.cli import COLOR_FIXES, DEFAULT_COLOR_FIX, build_parser, main

MISSING_MODEL = "no-such-model.safetensors"  # loading it would fail: a run given it must not load a model


def _image(path: Path, seed: int = 0, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo_like(16, 16, seed)).save(path, **options)
    return path


def test_folder_run_keeps_every_output_and_names_what_it_skipped(tmp_path: Path, random_student_file: Path, capsys):
    inputs = tmp_path / "in"
    for name in ("a.png", "sub/b.jpg", "plain.tiff", "plain.webp", "x/same.png", "y/same.png", "anim.gif"):
        _image(inputs / name)
    (inputs / "broken.png").write_bytes(b"\x89PNG garbage")
    (inputs / "notes.txt").write_text("not an image")
    if hasattr(os, "mkfifo"):
        os.mkfifo(inputs / "fifo.png")  # reading it would block: it must be refused, not opened
    out = tmp_path / "out"
    code = main(["upscale", str(inputs), "-o", str(out), "--model", str(random_student_file), "-q"])
    assert code == 1  # the broken file fails, the others are written
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["a.png", "anim.png", "plain.tiff.png", "plain.webp.png", "sub/b.png", "x/same.png", "y/same.png"]
    assert all(Image.open(out / name).size == (64, 64) for name in written)
    err = capsys.readouterr().err
    assert err.count("broken.png") == 1 and "failed: " in err
    assert "skipped 1 file, not an image format Pillow reads: " in err and "notes.txt" in err
    skipped = 1
    if hasattr(os, "mkfifo"):
        assert "skipped 1 file, not a regular file: " in err and "fifo.png" in err
        skipped = 2
    assert f"wrote 7 images to {out} (1 failed, {skipped} skipped)" in err
    assert "Traceback" not in err


def test_existing_outputs_are_kept_and_resume_a_run_unless_overwrite(
    tmp_path: Path, random_student_file: Path, capsys
):
    """The output folder inside the input folder: later runs neither read it back nor redo its files."""
    inputs = tmp_path / "photos"
    _image(inputs / "p.png")
    out = inputs / "x4"
    assert main(["upscale", str(inputs), "-o", str(out), "--model", str(random_student_file), "-q"]) == 0
    result = out / "p.png"
    Image.new("RGB", (3, 3)).save(result)  # a stand-in: replacing it would show
    capsys.readouterr()
    assert main(["upscale", str(inputs), "-o", str(out), "--model", MISSING_MODEL, "-q"]) == 0
    assert Image.open(result).size == (3, 3) and not (out / "x4").exists()
    err = capsys.readouterr().err
    assert f"kept 1 existing output (--overwrite replaces it): {result}" in err
    assert f"wrote 0 images to {out} (1 skipped)" in err
    assert main(["upscale", str(inputs), "-o", str(out), "--model", str(random_student_file), "-q", "--overwrite"]) == 0
    assert Image.open(result).size == (64, 64)


def test_single_file_to_named_output(tmp_path: Path, random_student_file: Path, capsys):
    src = _image(tmp_path / "p.png")
    dst = tmp_path / "result.png"
    assert main(["upscale", str(src), "-o", str(dst), "--model", str(random_student_file), "--scale", "2", "-q"]) == 0
    assert Image.open(dst).size == (32, 32)
    assert f"wrote 1 image to {dst}" in capsys.readouterr().err


def test_default_scale_is_the_models_own(tmp_path: Path, random_student_file: Path):
    src = _image(tmp_path / "p.png")
    assert main(["upscale", str(src), "-o", str(tmp_path / "out"), "--model", str(random_student_file), "-q"]) == 0
    assert Image.open(tmp_path / "out" / "p.png").size == (64, 64)  # the file records x4


def test_scale_note_is_one_line_of_ours(tmp_path: Path, random_student_file: Path, capsys):
    src = _image(tmp_path / "p.png")
    assert main(["upscale", str(src), "-o", str(tmp_path / "out"), "--model", str(random_student_file), "--scale", "5",
                 "-q"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "vpdsr: note: " in err and "trained for x4" in err and "UserWarning" not in err


def test_info_summary_and_json(tmp_path: Path, random_student_file: Path, capsys):
    assert main(["info", str(random_student_file)]) == 0
    out = capsys.readouterr().out
    assert "random-tiny" in out and "tiny, sd2 family (full weights)" in out and "x4" in out and " MB)" in out
    assert len(out.splitlines()) < 10 and "{" not in out
    assert main(["info", str(random_student_file), "--json"]) == 0
    assert '"vpdsr-student"' in capsys.readouterr().out
    assert main(["info", str(random_student_file), "--full"]) == 0
    assert '"block_out_channels"' in capsys.readouterr().out
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    assert main(["info", str(bad)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


def test_truncated_osediff_checkpoint_is_named_so(tmp_path: Path, capsys):
    whole = tmp_path / "whole.pkl"
    torch.save({"rank_unet": 4, "state_dict_unet": {"conv_in.weight": torch.randn(64, 64)}}, whole)
    data = whole.read_bytes()
    for size in (len(data) // 2, len(data) - 10, 0):
        cut = tmp_path / "osediff.pkl"
        cut.write_bytes(data[:size])
        assert main(["convert-osediff", str(cut), "-o", str(tmp_path / "x.safetensors")]) == 2
        err = capsys.readouterr().err
        assert err.count("osediff.pkl") == 1 and "Errno" not in err
        assert ("truncated or corrupt" if size else "the file is empty") in err


def test_python_dash_m_works(random_student_file: Path):
    done = subprocess.run([sys.executable, "-m", "vpdsr", "info", str(random_student_file)], capture_output=True, text=True)
    assert done.returncode == 0 and "random-tiny" in done.stdout


def test_tile_takes_auto_off_or_a_size():
    def tile(value: str) -> int | None:
        return build_parser().parse_args(["upscale", "x.png", "-o", "o", "--tile", value]).tile

    assert tile("auto") is None and tile("0") == 0 and tile("256") == 256
    assert build_parser().parse_args(["upscale", "x.png", "-o", "o"]).tile is None


def test_color_fix_choices_match_the_core():
    assert COLOR_FIXES == color.COLOR_FIXES and DEFAULT_COLOR_FIX == color.DEFAULT_COLOR_FIX


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["upscale", "x.png", "-o", "o", "--scale", "two"], "expected a number from 1 to 8"),
        (["upscale", "x.png", "-o", "o", "--scale", "9"], "the scale must be from 1 to 8"),
        (["upscale", "x.png", "-o", "o", "--tile", "-1"], "expected auto, 0 (off) or a tile size"),
        (["upscale", "x.png", "-o", "o", "--device", "gpu"], "expected auto, cpu, cuda, cuda:N or mps"),
        (["upscale"], "required"),
    ],
)
def test_bad_arguments_exit_with_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("images", [1, 2])
def test_progress_bar_counts_whole_steps_or_images(tmp_path: Path, random_student_file: Path, monkeypatch,
                                                   images: int):  # fmt: skip
    """Never "0.3/1": one image counts the pipeline's steps, so a large image moves the bar tile by tile
    (a 1920x1200 output once sat at 0/1 for 70 s); a folder counts images, written or failed, with the
    current image's steps beside its name."""
    import tqdm

    seen: list[tuple[float, float | None, str]] = []

    class Recording(tqdm.tqdm):
        def update(self, n: float = 1) -> bool | None:
            done = super().update(n)
            seen.append((self.n, self.total, self.postfix or ""))
            return done

        def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
            super().set_postfix_str(s, refresh)
            seen.append((self.n, self.total, s))

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    inputs = tmp_path / "in"
    _image(inputs / "a.png")
    if images == 2:
        (inputs / "broken.png").write_bytes(b"\x89PNG garbage")
    code = main(["upscale", str(inputs), "-o", str(tmp_path / "out"), "--model", str(random_student_file),
                 "--tile", "16"])  # fmt: skip
    assert code == images - 1
    assert all(n == int(n) and (total is None or total == int(total)) for n, total, _ in seen)
    counts = [n for n, *_ in seen]
    assert counts == sorted(counts)
    if images == 1:
        assert len(set(counts)) > 4 and counts[-1] == seen[-1][1]  # many steps, and all of them
    else:
        assert counts[-1] == 2 and {total for _, total, _ in seen} == {2}
        assert any(re.fullmatch(r"a\.png \d+/\d+", postfix) for *_, postfix in seen)


def test_the_embedded_default_is_named_default_everywhere(tmp_path: Path, capsys):
    """``--model default`` and ``vpdsr info default`` name the embedded file, as ``bench.quality`` does, and
    the help says which file that is and what ``info``'s argument and ``--dtype`` mean."""
    from vpdsr.paths import DEFAULT_MODEL_NAME, default_model_path

    assert main(["info", "default"]) == 0
    assert f"file      {default_model_path()}" in capsys.readouterr().out
    src = _image(tmp_path / "p.png")
    assert main(["upscale", str(src), "-o", str(tmp_path / "out.png"), "--model", "default", "-q"]) == 0
    assert (tmp_path / "out.png").is_file()
    subparsers = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert DEFAULT_MODEL_NAME in "".join(subparsers["upscale"].format_help().split())  # argparse wraps lines
    info_model = next(a for a in subparsers["info"]._actions if a.dest == "model")
    dtype = next(a for a in subparsers["upscale"]._actions if a.dest == "dtype")
    assert "default" in info_model.help and DEFAULT_MODEL_NAME in info_model.help and "precision" in dtype.help
