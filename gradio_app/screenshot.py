"""Drive the demo in a real headless Chromium: upscale one image and take a screenshot.

``python -m gradio_app.screenshot --model student.safetensors -o docs/demo.png`` retakes the
README's screenshot; the browser test drives the page through the same functions. It needs the
``playwright`` Python package (a dev dependency) and a Chromium binary, e.g. Debian's
``apt-get install chromium``; no browser is downloaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gradio_app.config import DemoConfig

# Flags for a headless browser in a container or CI: no sandbox (root), no GPU, and none of
# Chromium's own background traffic (updates, sync, field trials), so the page is all it loads.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EXAMPLE = Path(__file__).resolve().parent / "examples" / "nuthatch.png"

# The result is in the page when the sizes box has been filled and both slider images decoded.
_RESULT_READY = """() => {
    const sizes = document.querySelector('#sizes textarea');
    const images = [...document.querySelectorAll('#result img')];
    return sizes && sizes.value.includes('output') && images.length >= 2
        && images.every(img => img.complete && img.naturalWidth > 0);
}"""


@dataclass(frozen=True)
class PageResult:
    sizes: str  # the "Sizes and time" text
    output_size: tuple[int, int]  # naturalWidth/Height of the slider's "after" image


def find_chromium() -> str | None:
    """``$VPDSR_CHROMIUM`` if set, else a ``chromium`` (Debian) or ``chromium-browser`` on the PATH."""
    return os.environ.get("VPDSR_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve(config: DemoConfig) -> Iterator[str]:
    """Run the demo in this process on a free loopback port; yields its URL."""
    from gradio_app.app import build_demo, launch_demo

    config = replace(config, host="127.0.0.1", port=free_port())
    demo = build_demo(config)
    _, url, _ = launch_demo(demo, config, prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        demo.close()


@contextmanager
def chromium_page(executable: str, width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A page in a fresh headless Chromium (playwright ``Page``)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def upscale_in_page(page: Any, url: str, image: Path, timeout_s: float = 60) -> PageResult:
    """Open the demo, upload ``image``, press Upscale and wait until the slider shows the result."""
    page.goto(url)
    page.set_input_files("#input-image input[type=file]", str(image))
    page.locator("#input-image img").first.wait_for(timeout=timeout_s * 1000)
    page.click("#upscale")
    page.wait_for_function(_RESULT_READY, timeout=timeout_s * 1000)
    sizes = page.input_value("#sizes textarea")
    width, height = page.eval_on_selector_all(
        "#result img", "imgs => [imgs.at(-1).naturalWidth, imgs.at(-1).naturalHeight]"
    )
    return PageResult(sizes, (width, height))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradio_app.screenshot", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="student file (default: the embedded default model)")
    parser.add_argument("--image", type=Path, default=EXAMPLE, help="image to upscale (default: an example)")
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/demo.png"), help="screenshot PNG")
    parser.add_argument("--width", type=int, default=1280, help="browser window width in pixels")
    args = parser.parse_args(argv)
    executable = find_chromium()
    if executable is None:
        parser.error("no Chromium found; install one (Debian: apt-get install chromium) or set VPDSR_CHROMIUM")
    with serve(DemoConfig(model=args.model)) as url, chromium_page(executable, width=args.width) as page:
        result = upscale_in_page(page, url, args.image, timeout_s=600)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.output), full_page=True)
    print(f"{result.sizes}\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
