"""The demo in a real browser: headless Chromium (Debian's) driven by Playwright.

Skipped only on a machine without Chromium outside CI; in CI (``CI=true``) a missing browser or
Playwright is a failure, so the check cannot silently stop running. The screenshot is kept in
``test-artifacts/`` for a person to look at.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from gradio_app.config import DemoConfig
from gradio_app.screenshot import chromium_page, find_chromium, serve, upscale_in_page
from tests.gradio_support import write_image, write_tiny_student

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CHROMIUM = find_chromium()
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

if CHROMIUM is None:
    if IN_CI:
        pytest.fail(
            "CI=true but no Chromium was found (apt-get install chromium, or set VPDSR_CHROMIUM)", pytrace=False
        )
    pytest.skip("no Chromium on this machine (apt-get install chromium)", allow_module_level=True)
if not IN_CI:
    pytest.importorskip("playwright")


def _is_local(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("data", "blob", "about") or parts.hostname in ("127.0.0.1", "localhost")


def test_upload_upscale_and_errors_in_the_browser(tmp_path: Path) -> None:
    model = write_tiny_student(tmp_path / "tiny.safetensors")
    image = write_image(tmp_path / "photo.png", 32, 24)
    other = write_image(tmp_path / "other.png", 40, 24, seed=1)
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    outside: list[str] = []
    with serve(DemoConfig(model=model, device="cpu")) as url, chromium_page(CHROMIUM) as page:
        page.on("request", lambda request: None if _is_local(request.url) else outside.append(request.url))
        result = upscale_in_page(page, url, image)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "gradio_demo.png"), full_page=True)

        page.set_input_files("#input-image input[type=file]", str(corrupt))
        page.click("#upscale")
        page.get_by_text("broken.png: not an image file").first.wait_for(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "gradio_demo_error.png"))  # the viewport: toasts are fixed

        page.set_input_files("#input-image input[type=file]", str(other))  # the same page still works
        page.click("#upscale")
        page.wait_for_function(
            "() => document.querySelector('#sizes textarea').value.includes('output 160×96')", timeout=60_000
        )

    assert result.output_size == (128, 96)
    assert result.sizes.startswith("Input 32×24 → output 128×96 in ")
    assert outside == [], f"the page reached outside this machine: {outside}"
