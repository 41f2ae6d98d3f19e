"""bench.quality end to end on a tiny made-up LR/HR set: table, CSV, sheet and failure messages."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.comparison_sheet import SheetRow, detail_box, render_sheet
from bench.quality import main, sheet_picks
from bench.quality_io import ImagePair

NAMES = ["a.png", "b.png", "c.png"]
HR_SIZE = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HR photos-to-be (smooth colour noise), their x4 bicubic LR, and a 'method' that adds noise."""
    root = tmp_path_factory.mktemp("pairs")
    for folder in ("lr", "hr", "noisy"):
        (root / folder).mkdir()
    rng = np.random.default_rng(0)
    for name in NAMES:
        coarse = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        hr = coarse.resize((HR_SIZE, HR_SIZE), Image.Resampling.BICUBIC)
        hr.save(root / "hr" / name)
        hr.resize((16, 16), Image.Resampling.BICUBIC).save(root / "lr" / name)
        noisy = np.asarray(hr, dtype=np.int16) + rng.integers(-6, 7, (HR_SIZE, HR_SIZE, 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(root / "noisy" / name)
    return root


def run(dataset: Path, out: Path, *extra: str) -> int:
    return main(["--lr", str(dataset / "lr"), "--hr", str(dataset / "hr"), "--out", str(out), "--crop", "32", *extra])


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_cli_writes_table_csv_and_sheet(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code = run(dataset, out, "--method", "bicubic", "--results", f"noisy={dataset / 'noisy'}", "--sheet-images", "2")
    assert code == 0

    table = (out / "table.md").read_text()
    assert "| Method | PSNR-Y ↑ | SSIM-Y ↑ | HaarPSI ↑ | LSD-HF ↓ |" in table
    assert "| bicubic |" in table and "| noisy |" in table and "lanczos" not in table
    assert table.split("\n\n", 1)[1] in capsys.readouterr().out  # printed as well

    rows = read_csv(out / "per_image.csv")
    assert list(rows[0]) == ["image", "method", "PSNR-Y", "SSIM-Y", "HaarPSI", "LSD-HF"]
    per_image = [r for r in rows if r["image"] != "mean"]
    means = {r["method"]: r for r in rows if r["image"] == "mean"}
    assert sorted((r["image"], r["method"]) for r in per_image) == sorted(
        (n, m) for n in NAMES for m in ("bicubic", "noisy")
    )
    assert rows[-2:] == list(means.values())  # mean rows come last
    for method, mean in means.items():
        own = [float(r["PSNR-Y"]) for r in per_image if r["method"] == method]
        assert float(mean["PSNR-Y"]) == pytest.approx(np.mean(own), abs=1e-5)
    # +-6 levels of noise on the HR itself is far closer to it than a x4 bicubic round trip.
    assert float(means["noisy"]["PSNR-Y"]) > float(means["bicubic"]["PSNR-Y"])

    with Image.open(out / "sheet.png") as sheet:
        sheet.load()
    assert sheet.mode == "RGB" and sheet.width >= 3 * 32 * 2  # LR (bicubic) | noisy | HR, zoom 2
    assert sheet.height >= 2 * 32 * 2


def test_default_methods_are_bicubic_and_lanczos(dataset: Path, tmp_path: Path) -> None:
    assert run(dataset, tmp_path, "--limit", "1", "--sheet-images", "0") == 0
    methods = [r["method"] for r in read_csv(tmp_path / "per_image.csv")]
    assert methods == ["bicubic", "lanczos", "bicubic", "lanczos"]
    assert not (tmp_path / "sheet.png").exists()


def test_a_vpdsr_model_file_is_benchmarked_at_the_pairs_scale(dataset: Path, tmp_path: Path) -> None:
    from vpdsr import OneStepStudent, build_backbone, save_student

    torch.manual_seed(0)
    parts = build_backbone("tiny")
    model = save_student(tmp_path / "tiny.safetensors", OneStepStudent(parts.vae, parts.unet, parts.config))
    out = tmp_path / "out"
    assert run(dataset, out, "--model", f"tiny={model}", "--method", "bicubic", "--limit", "2", "--device", "cpu") == 0
    rows = read_csv(out / "per_image.csv")
    assert [r["method"] for r in rows if r["image"] == "mean"] == ["tiny", "bicubic"]
    assert all(np.isfinite(float(r["PSNR-Y"])) for r in rows)
    assert (out / "sheet.png").exists()


def test_missing_result_is_reported(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    Image.open(dataset / "noisy" / "a.png").save(partial / "a.png")
    assert run(dataset, tmp_path / "out", "--method", "bicubic", "--results", f"part={partial}") == 2
    assert "has no image for b.png" in capsys.readouterr().err


def test_wrong_size_result_is_reported(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    small = tmp_path / "small"
    small.mkdir()
    for name in NAMES:
        Image.new("RGB", (32, 32)).save(small / name)
    assert run(dataset, tmp_path / "out", "--results", f"small={small}") == 2
    assert "small gave 32x32 for a.png, but the HR image is 64x64" in capsys.readouterr().err


def test_missing_lr_and_model_are_reported(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--lr", str(tmp_path), "--hr", str(dataset / "hr")]) == 2
    assert "3 HR images have no LR file of the same name" in capsys.readouterr().err
    assert run(dataset, tmp_path / "out", "--model", str(tmp_path / "absent.safetensors")) == 2
    assert "cannot load model" in capsys.readouterr().err


def test_unavailable_pyiqa_metric_is_reported(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run(dataset, tmp_path / "out", "--pyiqa-metric", "no-such-metric") == 2
    assert "no-such-metric" in capsys.readouterr().err


def test_sheet_picks_spread_over_the_list() -> None:
    pairs = [ImagePair(f"{i}.png", Path(), Path()) for i in range(10)]
    assert sheet_picks(pairs, 3) == {"0.png", "4.png", "9.png"}  # round(4.5) is 4
    assert sheet_picks(pairs, 0) == set()
    assert len(sheet_picks(pairs, 20)) == 10


def test_detail_box_finds_the_textured_corner() -> None:
    image = np.full((64, 64), 128, dtype=np.uint8)
    image[40:, 40:] = np.random.default_rng(0).integers(0, 256, (24, 24))
    left, top, right, bottom = detail_box(Image.fromarray(image), 16)
    assert right - left == bottom - top == 16
    assert left >= 36 and top >= 36


def test_sheet_rejects_a_row_of_the_wrong_width() -> None:
    crop = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="1 crops for 2 columns"):
        render_sheet(["a", "b"], [SheetRow("x", [crop], [""])])
