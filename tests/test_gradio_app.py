"""The Gradio demo through its API (gradio_client), started as ``python gradio_app/app.py`` would be.

One server for the module, on a tiny random student and a tiny random CLIP, configured through
environment variables and run from an unrelated working directory. The engine and the command
line are also checked directly, where no server is needed.
"""

from __future__ import annotations

import argparse
import os
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from gradio_app import engine
from gradio_app.config import DemoConfig, add_arguments, config_from_args
from gradio_app.screenshot import free_port
from tests.gradio_support import start_app, wait_until_up, write_image, write_tiny_student
from vpdsr.errors import ModelFileError
from vpdsr.semantics import build_clip, save_clip

MAX_PIXELS = 64 * 64


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    write_tiny_student(root / "tiny.safetensors")
    clip, spec = build_clip("vpdsr-tiny-clip")
    save_clip(root / "clip.safetensors", clip, spec)
    write_image(root / "small.png", 32, 32, seed=1)
    write_image(root / "wide.png", 48, 32, seed=2)
    write_image(root / "too-many-pixels.png", 80, 80, seed=3)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
    Image.effect_noise((400, 400), 64).convert("RGB").save(root / "big-upload.png")  # ~480 KB, noise
    return root


@pytest.fixture(scope="module")
def client(files: Path) -> Iterator[Client]:
    """``python gradio_app/app.py`` as a user would start it, configured through the environment."""
    port = free_port()
    env = dict(
        os.environ,
        VPDSR_MODEL=str(files / "tiny.safetensors"),
        VPDSR_CLIP=str(files / "clip.safetensors"),
        VPDSR_DEVICE="cpu",
        VPDSR_MAX_PIXELS=str(MAX_PIXELS),
        VPDSR_MAX_FILE_SIZE="200kb",
        VPDSR_MAX_BATCH="3",
        PYTHONUNBUFFERED="1",
        GRADIO_TEMP_DIR=str(files / "gradio-cache"),
    )
    server = start_app(files, env, port, files / "server.log")
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_up(url, server, files / "server.log")
        yield Client(url, verbose=False, download_files=str(files / "downloads"))
    finally:
        server.terminate()
        server.wait(timeout=30)


def _upscale(client: Client, image: Path, scale: float = 4, tile: str = "auto") -> tuple:
    return client.predict(handle_file(str(image)), scale, tile, "adain", "", api_name="/upscale")


def test_start_up_prints_our_address_line_not_gradios_share_hint(client: Client, files: Path) -> None:
    log = files / "server.log"
    deadline = time.monotonic() + 30  # the line follows the server's start by a moment
    while "vpdsr demo running at " not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    text = log.read_text()
    assert f"vpdsr demo running at {client.src}" in text and "share=True" not in text, text


def test_upscale_returns_a_lossless_png_four_times_the_input(client: Client, files: Path) -> None:
    (before, after), download, sizes = _upscale(client, files / "wide.png")
    with Image.open(after) as out, Image.open(download) as dl, Image.open(before) as bicubic:
        assert out.format == dl.format == "PNG"
        assert out.size == dl.size == bicubic.size == (192, 128)
    assert sizes.startswith("Input 48×32 → output 192×128 in ")
    assert sizes.rstrip(")").split(" on ")[1].startswith("cpu")


def test_options_reach_the_pipeline(client: Client, files: Path) -> None:
    (_, after), _, sizes = _upscale(client, files / "small.png", scale=2, tile="no tiling")
    assert Image.open(after).size == (64, 64) and "output 64×64" in sizes


def test_corrupt_upload_is_a_readable_error_and_the_app_keeps_answering(client: Client, files: Path) -> None:
    with pytest.raises(AppError, match="corrupt.png: .*(not an image|corrupt)"):
        _upscale(client, files / "corrupt.png")
    (_, after), _, _ = _upscale(client, files / "small.png")
    assert Image.open(after).size == (128, 128)


def test_pixel_limit_is_explained(client: Client, files: Path) -> None:
    with pytest.raises(AppError, match=r"too-many-pixels.png: 80x80 .* above the limit"):
        _upscale(client, files / "too-many-pixels.png")


def test_upload_size_limit_refuses_large_files(client: Client, files: Path) -> None:
    big = files / "big-upload.png"
    assert big.stat().st_size > 200 * 1024
    with pytest.raises(ValueError, match="exceeds the maximum file size of 204800 bytes"):  # the client checks first
        _upscale(client, big)
    with big.open("rb") as upload:  # and the server refuses it too, whoever sends it
        response = httpx.post(f"{client.src}gradio_api/upload", files={"files": (big.name, upload, "image/png")})
    assert response.status_code == 413 and "maximum allowed size of 204800 bytes" in response.text
    assert _upscale(client, files / "small.png")[2].startswith("Input 32×32")


def test_unknown_tile_choice_is_refused(client: Client, files: Path) -> None:
    with pytest.raises(AppError, match="tile must be one of auto, no tiling"):
        _upscale(client, files / "small.png", tile="huge")


def test_batch_zips_the_good_files_and_names_the_bad_ones(client: Client, files: Path) -> None:
    uploads = [handle_file(str(files / name)) for name in ("small.png", "wide.png", "corrupt.png")]
    archive, summary = client.predict(uploads, 4, "auto", "adain", "", api_name="/batch")
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == ["small_x4.png", "wide_x4.png"]
        with zf.open("wide_x4.png") as member, Image.open(member) as image:
            assert image.size == (192, 128)
    assert summary.startswith("Upscaled 2 of 3 files.") and "corrupt.png" in summary


def test_batch_size_limit(client: Client, files: Path) -> None:
    with pytest.raises(AppError, match="4 files is more than this demo takes at once"):
        client.predict([handle_file(str(files / "small.png"))] * 4, 4, "auto", "adain", "", api_name="/batch")


def test_semantics_report_and_prompt_from_tags(client: Client, files: Path) -> None:
    (_, after), _, _ = _upscale(client, files / "small.png")
    report, chart = client.predict(handle_file(str(files / "small.png")), handle_file(after), api_name="/semantics")
    assert "Semantic drift (top 10 tags" in report and "KL(LR || SR)" in report
    assert chart  # the plot's payload; its drawing is checked in test_tag_chart_shows_every_tag
    prompt = client.predict(handle_file(str(files / "small.png")), api_name="/prompt_from_tags")
    assert isinstance(prompt, str) and prompt.count(",") >= 1


def test_every_event_has_an_explicit_api_name(files: Path) -> None:
    from gradio_app.app import build_demo

    demo = build_demo(DemoConfig(model=files / "tiny.safetensors", clip=files / "clip.safetensors"))
    events = {fn.api_name: fn for fn in demo.fns.values() if not fn.is_cancel_function}  # gradio names that one
    assert sorted(events) == [
        "batch", "closed", "load_example", "prompt_from_tags", "semantics", "show_in_semantics", "stop", "upscale"
    ]  # fmt: skip
    for name in ("batch", "prompt_from_tags", "semantics", "upscale"):  # the ones that run a network
        assert events[name].concurrency_id == "model" and events[name].concurrency_limit == 1


# --- without a server -------------------------------------------------------------------------


def test_progress_advances_per_tile(files: Path, tmp_path: Path) -> None:
    models = engine.DemoModels(DemoConfig(model=files / "tiny.safetensors", device="cpu"))
    seen: list[float] = []

    def record(fraction: float, what: str) -> None:
        seen.append(fraction)

    engine.upscale_file(models, files / "small.png", engine.UpscaleOptions(scale=2, tile=32), tmp_path, record)
    assert seen[0] == 0.0 and seen[-1] == pytest.approx(1.0)
    assert len(seen) > 4 and seen == sorted(seen)


def test_scale_defaults_to_the_models_own_and_a_costly_one_says_so(files: Path, tmp_path: Path) -> None:
    models = engine.DemoModels(DemoConfig(model=files / "tiny.safetensors", device="cpu"))
    own = engine.upscale_file(models, files / "small.png", engine.UpscaleOptions(), tmp_path)
    assert own.output.name == "small_x4.png" and own.output_size == (128, 128) and "Note" not in own.summary()
    with pytest.warns(UserWarning, match="trained for x4"):  # the server's log says it too, once
        above = engine.upscale_file(models, files / "small.png", engine.UpscaleOptions(scale=6), tmp_path)
    assert above.output_size == (192, 192) and "Note: " in above.summary() and "trained for x4" in above.summary()


def test_tag_chart_shows_every_tag(files: Path) -> None:
    from gradio_app.app import tag_chart

    models = engine.DemoModels(DemoConfig(clip=files / "clip.safetensors"))
    report = engine.analyse(models, files / "small.png", files / "wide.png")
    labels = [t.get_text() for t in tag_chart(report).axes[0].get_yticklabels()]
    assert set(labels) == {c.tag for c in report.drift.kept + report.drift.lost + report.drift.gained}


def test_without_a_model_the_page_says_how_to_pass_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import vpdsr.paths

    monkeypatch.setattr(engine, "default_model_path", lambda: None)
    monkeypatch.setattr(vpdsr.paths, "default_model_path", lambda: None)
    models = engine.DemoModels(DemoConfig())
    assert "No model is loaded" in models.describe() and "--model" in models.describe()
    with pytest.raises(ModelFileError, match=r"no embedded default model.*\(start the demo with --model or VPDSR_"):
        engine.upscale_file(models, write_image(tmp_path / "a.png"), engine.UpscaleOptions(), tmp_path)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in [k for k in os.environ if k.startswith("VPDSR_")]:
        monkeypatch.delenv(key)
    return monkeypatch


def test_vpdsr_demo_subcommand_and_environment(clean_env: pytest.MonkeyPatch) -> None:
    from gradio_app.cli import run
    from vpdsr.cli import build_parser

    clean_env.setenv("VPDSR_MODEL", "from-env.safetensors")
    clean_env.setenv("VPDSR_DEMO_PORT", "9001")
    args = build_parser().parse_args(["demo", "--host", "0.0.0.0", "--clip", "clip.pt", "--clip-config", "ViT-B-32"])
    assert args.func is run
    config = config_from_args(args)
    assert config == DemoConfig(
        model=Path("from-env.safetensors"), clip=Path("clip.pt"), clip_config="ViT-B-32", host="0.0.0.0", port=9001
    )


def test_defaults_and_bad_numbers(clean_env: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args([])) == DemoConfig()
    assert DemoConfig().host == "127.0.0.1" and DemoConfig().port == 7860 and DemoConfig().concurrency == 1
    with pytest.raises(SystemExit, match="--port must be a whole number"):
        config_from_args(parser.parse_args(["--port", "eighty"]))
    with pytest.raises(SystemExit, match="--max-pixels must be at least 1"):
        config_from_args(parser.parse_args(["--max-pixels", "0"]))


def test_the_work_limit_counts_the_padded_pixels(files: Path) -> None:
    """A 262144×1 upload is 4.2 megapixels at ×4, as many as 512×512, but the network computes its
    short side padded to 16: 139 s and 4.3 GB against 14-17 s and 2.1 GB for the square (#24)."""
    from vpdsr.errors import VPDError

    models = engine.DemoModels(DemoConfig(model=files / "tiny.safetensors", device="cpu",
                                          max_output_pixels=2048 * 2048))  # fmt: skip
    engine.check_work(models, [(512, 512)], engine.UpscaleOptions(scale=4), "square.png")  # at the limit
    expected = (r"^line.png: 262144×1 at ×4 means computing 1048576×4 pixels padded to 1048576×16 \(the model works "
                r"on sides that are multiples of 16\), 16.8 megapixels: above this demo's limit of 4.2 megapixels")
    with pytest.raises(VPDError, match=expected):
        engine.check_work(models, [(262144, 1)], engine.UpscaleOptions(scale=4), "line.png: 262144×1 at ×4")
    assert models._pipeline is None  # refused from the metadata alone
    assert models.meta.size_multiple == models.pipeline()[0].multiple  # the pipeline pads as counted
