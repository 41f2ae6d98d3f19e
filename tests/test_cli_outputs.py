"""vpdsr.outputs and the CLI's refusals: every run that would lose an image stops before any work."""

import os
from pathlib import Path

import pytest
from PIL import Image

from vpdsr.cli import main
from vpdsr.errors import VPDError
from vpdsr.outputs import NOT_A_FILE, NOT_AN_IMAGE, plan_outputs, readable_suffixes

MISSING_MODEL = "no-such-model.safetensors"  # a refusal must come before the model would load


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (200, 100, 50)).save(path)
    return path


def _targets(plan) -> dict[str, str]:
    return {job.source.name if job.source.parent.name == "in" else f"{job.source.parent.name}/{job.source.name}":
            job.target.relative_to(plan.output).as_posix() for job in plan.jobs}  # fmt: skip


def test_names_keep_structure_and_never_collide(tmp_path: Path):
    for name in ("plain.tiff", "plain.webp", "plain.png", "photo.jpg", "a/same.png", "b/same.png", "anim.gif"):
        _image(tmp_path / "in" / name)
    plan = plan_outputs([tmp_path / "in"], tmp_path / "out")
    assert _targets(plan) == {
        "plain.png": "plain.png",
        "plain.tiff": "plain.tiff.png",
        "plain.webp": "plain.webp.png",
        "photo.jpg": "photo.png",
        "a/same.png": "a/same.png",
        "b/same.png": "b/same.png",
        "anim.gif": "anim.png",
    }


def test_output_file_or_folder(tmp_path: Path):
    src = _image(tmp_path / "in" / "a.jpg")
    assert plan_outputs([src], tmp_path / "b.png").jobs[0].target == tmp_path / "b.png"
    assert plan_outputs([src], f"{tmp_path / 'b.png'}/").jobs[0].target == tmp_path / "b.png" / "a.png"
    assert plan_outputs([src], tmp_path / "out").jobs[0].target == tmp_path / "out" / "a.png"


def test_names_differing_only_in_case_do_not_share_an_output(tmp_path: Path):
    """On macOS and Windows Photo.png and photo.png are one file."""
    _image(tmp_path / "in" / "Photo.jpg")
    _image(tmp_path / "in" / "photo.webp")
    assert sorted(_targets(plan_outputs([tmp_path / "in"], tmp_path / "out")).values()) == [
        "Photo.jpg.png",
        "photo.webp.png",
    ]


def test_folder_scan_takes_what_pillow_reads_and_reports_the_rest(tmp_path: Path):
    assert {".gif", ".png", ".jpg", ".webp", ".tif", ".bmp"} <= readable_suffixes()
    assert ".mpg" not in readable_suffixes()  # Pillow only reads an MPEG's size: it would come out black
    _image(tmp_path / "in" / "a.gif")
    (tmp_path / "in" / "readme.md").write_text("hello")
    expected = [(tmp_path / "in" / "readme.md", NOT_AN_IMAGE)]
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "in" / "b.png")
        expected.insert(0, (tmp_path / "in" / "b.png", NOT_A_FILE))
    plan = plan_outputs([tmp_path / "in"], tmp_path / "out")
    assert [job.source.name for job in plan.jobs] == ["a.gif"] and plan.skipped == expected


def _refusal_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    inputs = tmp / "in"
    a, b = _image(inputs / "a.png"), _image(inputs / "b.jpg")
    twin = _image(tmp / "other" / "a.png")
    (tmp / "afile").write_text("")
    deep = _image(tmp / "deep" / "sub" / "sub" / "x.png").parent.parent  # -o deep: x.png lands in deep/sub itself
    fifo = tmp / "fifo.png"
    if hasattr(os, "mkfifo"):
        os.mkfifo(fifo)
    return {
        "file output, several inputs": ([str(a), str(b), "-o", str(tmp / "one.png")], "names one image file"),
        "folder to file output": ([str(inputs), "-o", str(tmp / "one.png")], "but there are 2 input images"),
        "same folder": ([str(inputs), "-o", str(inputs)], "both the input and the output folder"),
        "missing input": ([str(a), str(tmp / "nope.png"), "-o", str(tmp / "out")], "input not found: "),
        "special file": ([str(fifo), "-o", str(tmp / "out")], NOT_A_FILE),
        "two files, one name": ([str(a), str(twin), "-o", str(tmp / "out")], "would overwrite each other's output"),
        "replaces an input": ([str(a), "-o", str(inputs)], "would replace the input"),
        "folder under a file": ([str(a), "-o", str(tmp / "afile" / "out")], "is a file, not a folder"),
        "output read back": ([str(deep), "-o", str(deep.parent)], "inside the input folder"),
    }


@pytest.mark.parametrize(
    "case",
    ["file output, several inputs", "folder to file output", "same folder", "missing input", "special file",
     "two files, one name", "replaces an input", "folder under a file", "output read back"],
)  # fmt: skip
def test_refused_before_any_work(tmp_path: Path, capsys, case: str):
    if case == "special file" and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    argv, message = _refusal_cases(tmp_path)[case]
    before = sorted(tmp_path.rglob("*"))
    assert main(["upscale", *argv, "--model", MISSING_MODEL, "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and MISSING_MODEL not in err and len(err.strip().splitlines()) == 1
    assert sorted(tmp_path.rglob("*")) == before  # nothing created or replaced


def test_unwritable_output_folder_is_refused(tmp_path: Path):
    if os.geteuid() == 0:
        pytest.skip("root may write anywhere")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(VPDError, match="no permission to write"):
        plan_outputs([_image(tmp_path / "a.png")], locked / "out")


def test_no_images_found(tmp_path: Path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("x")
    assert main(["upscale", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", MISSING_MODEL]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "no input images found" in err
