"""A cancelled demo job stops, the queue and the work per request are bounded, SIGTERM leaves no files.

The cancel, queue and limit tests drive a demo served in this process through gradio_client, so
they can count the pipeline's steps: its ``upscale_pil`` is wrapped to count every tile step and
every call still running. The SIGTERM test starts ``python gradio_app/app.py``, which boots (a few
seconds of imports) while the others run. All on the tiny random student.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError, Status

from gradio_app import engine
from gradio_app.app import build_demo, launch_demo
from gradio_app.config import DemoConfig
from gradio_app.screenshot import free_port
from tests.gradio_support import start_app, wait_until_up, write_image, write_tiny_student
from vpdsr.errors import VPDError

MAX_OUTPUT = 1024 * 1024
LONG = ("long.png", 256)  # x4 with 256 px tiles: 4x4 tiles, ~1,100 steps, many seconds on a CPU
GUARD_S = 120.0  # a deadline against hangs only; each wait ends as soon as its condition holds


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cancel")
    write_tiny_student(root / "tiny.safetensors")
    write_image(root / LONG[0], LONG[1], LONG[1], seed=1)
    write_image(root / "small.png", 32, 32, seed=2)
    write_image(root / "too-much.png", 300, 300, seed=3)  # 1200x1200 at x4: 1.4 megapixels
    write_image(root / "half.png", 200, 200, seed=4)  # 0.64 megapixels at x4: two are above 1.0
    return root


@pytest.fixture(scope="module", autouse=True)
def script_demo(files: Path) -> Iterator[tuple[Any, str, Path]]:
    """``python gradio_app/app.py`` with GRADIO_TEMP_DIR set, started first so it boots meanwhile."""
    temp, port = files / "gradio-temp", free_port()
    env = dict(os.environ, VPDSR_MODEL=str(files / "tiny.safetensors"), VPDSR_DEVICE="cpu",
               GRADIO_TEMP_DIR=str(temp), PYTHONUNBUFFERED="1")  # fmt: skip
    server = start_app(files, env, port, files / "script.log")
    try:
        yield server, f"http://127.0.0.1:{port}/", temp
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)


@dataclass
class Call:
    """One ``upscale_pil`` call: its tile steps, how many it had in all, and how it ended."""

    steps: int = 0
    total: int = 0
    steps_when_stopped: int | None = None  # its step count when should_stop first said True
    outcome: str | None = None  # None while it runs, then "done" or the exception's name


class StepCounter:
    """Wraps a pipeline's ``upscale_pil`` to record every call, and how many ran at once."""

    def __init__(self, pipe: Any) -> None:
        self.lock = threading.Lock()
        self.calls: list[Call] = []
        self.running = self.peak = 0
        self._upscale = pipe.upscale_pil
        pipe.upscale_pil = self.upscale_pil

    @property
    def steps(self) -> int:
        return sum(call.steps for call in self.calls)

    def upscale_pil(self, image: Any, progress: Callable, should_stop: Callable[[], bool], **options: Any) -> Any:
        call = Call()

        def step(done: int, total: int) -> None:
            call.steps, call.total = call.steps + 1, total
            progress(done, total)

        def stop() -> bool:
            if should_stop() and call.steps_when_stopped is None:
                call.steps_when_stopped = call.steps
            return should_stop()

        with self.lock:
            self.calls.append(call)
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            result = self._upscale(image, progress=step, should_stop=stop, **options)
            call.outcome = "done"
            return result
        except BaseException as err:
            call.outcome = type(err).__name__
            raise
        finally:
            with self.lock:
                self.running -= 1


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + GUARD_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def served(files: Path) -> Iterator[tuple[Client, engine.DemoModels, StepCounter]]:
    config = DemoConfig(model=files / "tiny.safetensors", device="cpu", max_output_pixels=MAX_OUTPUT, max_queue=1,
                        port=free_port())  # fmt: skip
    models = engine.DemoModels(config)
    counter = StepCounter(models.pipeline()[0])
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRADIO_TEMP_DIR", str(files / "served-cache"))
        demo = build_demo(config, files / "work", models)
        _, url, _ = launch_demo(demo, config, prevent_thread_lock=True, quiet=True)
        client = Client(url, verbose=False, download_files=str(files / "downloads"))
        try:
            yield client, models, counter
        finally:
            client.close()
            demo.close()
            models.jobs.close()


def _submit(client: Client, name: str, files: Path, scale: float = 4, tile: str = "256") -> Any:
    return client.submit(handle_file(str(files / name)), scale, tile, "adain", "", api_name="/upscale")


def _computing(counter: StepCounter, calls: int) -> Call:
    """Wait for the ``calls``-th call to be well under way, and return it."""
    wait_for(lambda: len(counter.calls) == calls and counter.calls[-1].steps > 20, "the job to compute")
    return counter.calls[-1]


def _assert_stopped_within_a_tile(call: Call) -> None:
    assert call.outcome == "Cancelled"
    assert call.steps == call.steps_when_stopped  # no step after the check that said stop
    assert call.steps < call.total / 2  # far from done


def test_cancel_stops_the_pipeline_and_the_next_job_waits_for_it(
    served: tuple[Client, engine.DemoModels, StepCounter], files: Path
) -> None:
    client, models, counter = served
    other = Client(client.src, verbose=False, download_files=str(files / "downloads"))  # see the queue test
    job = _submit(client, LONG[0], files)
    cancelled = _computing(counter, len(counter.calls) + 1)
    following = _submit(other, "small.png", files, tile="auto")
    wait_for(lambda: following.status().code == Status.IN_QUEUE, "the next job to queue")
    job.cancel()  # the server answers once the job's task has ended: after the worker returned
    _assert_stopped_within_a_tile(cancelled)
    # the next request runs, alone: it started only once the cancelled one had stopped
    (_, after), _, sizes = following.result(timeout=GUARD_S)
    assert Path(after).exists() and sizes.startswith("Input 32×32 → output 128×128")
    assert counter.peak == 1 and counter.calls[-1].outcome == "done" and models.jobs.active == 0
    other.close()


def test_closing_the_page_stops_its_job(served: tuple[Client, engine.DemoModels, StepCounter], files: Path) -> None:
    """A browser tab holds gradio's heartbeat stream open; closing the tab closes it, and gradio
    runs the demo's ``unload`` event for that session."""
    client, models, counter = served
    tab = Client(client.src, verbose=False, download_files=False)
    with httpx.stream("GET", f"{client.src}gradio_api/heartbeat/{tab.session_hash}", timeout=GUARD_S) as page:
        lines = page.iter_lines()  # kept: a dropped iterator closes the stream
        next(lines)  # the session's heartbeat is connected
        _submit(tab, LONG[0], files)
        closed = _computing(counter, len(counter.calls) + 1)
    wait_for(lambda: closed.outcome is not None, "the closed page's job to stop")
    _assert_stopped_within_a_tile(closed)
    wait_for(lambda: models.jobs.active == 0, "the job's task to end")
    tab.close()


def test_a_full_queue_is_refused_and_cancelling_a_waiting_job_skips_it(
    served: tuple[Client, engine.DemoModels, StepCounter], files: Path
) -> None:
    client, models, counter = served
    other = Client(client.src, verbose=False, download_files=False)  # gradio cancels a session's runs of an event
    running = _submit(client, LONG[0], files)
    calls = len(counter.calls) + 1
    first = _computing(counter, calls)
    waiting = _submit(other, "small.png", files)
    wait_for(lambda: waiting.status().code == Status.IN_QUEUE, "the second job to queue")
    with pytest.raises(QueueError, match="Queue is full"):  # max_queue=1
        _submit(client, "small.png", files).result(timeout=GUARD_S)
    waiting.cancel()
    running.cancel()
    _assert_stopped_within_a_tile(first)
    assert len(counter.calls) == calls and models.jobs.active == 0  # the waiting job never ran
    other.close()


def test_output_pixel_limit_is_refused_before_any_work(
    served: tuple[Client, engine.DemoModels, StepCounter], files: Path
) -> None:
    client, _, counter = served
    steps, calls = counter.steps, len(counter.calls)
    expected = (
        r"too-much.png: 300×300 at ×4 means computing 1200×1200 pixels, 1.4 megapixels: "
        r"above this demo's limit of 1.0 megapixels per request. .*--max-output-pixels"
    )
    with pytest.raises(AppError, match=expected):
        _submit(client, "too-much.png", files).result(timeout=GUARD_S)
    assert counter.steps == steps and len(counter.calls) == calls


def test_batch_limit_counts_every_image_and_the_models_own_scale(files: Path, tmp_path: Path) -> None:
    config = DemoConfig(model=files / "tiny.safetensors", device="cpu", max_output_pixels=MAX_OUTPUT)
    models = engine.DemoModels(config)
    two = [files / "half.png", files / "half.png"]
    with pytest.raises(VPDError, match=r"^2 images at ×4 means computing 1.3 megapixels: above .* 1.0 megapixels"):
        engine.upscale_batch(models, two, engine.UpscaleOptions(scale=4), tmp_path)
    with pytest.raises(VPDError, match=r"at ×2 means computing 1.3 megapixels \(the model computes at its own ×4"):
        engine.upscale_batch(models, [*two, files / "not-there.png"], engine.UpscaleOptions(scale=2), tmp_path)
    assert models._pipeline is None  # refused from the files' headers and the metadata: nothing was loaded


def test_stop_buttons_cancel_the_upscale_events(files: Path) -> None:
    demo = build_demo(DemoConfig(model=files / "tiny.safetensors"))
    ids = {fn.api_name: fn._id for fn in demo.fns.values()}
    (stop,) = [fn for fn in demo.fns.values() if fn.is_cancel_function]
    assert sorted(stop.cancels) == sorted([ids["upscale"], ids["batch"]])
    buttons = {block._id for block in demo.blocks.values() if block.elem_id in ("stop", "stop-batch")}
    assert len(buttons) == 2 and {target for target, _ in stop.targets} == buttons


def test_sigterm_stops_a_running_job_and_removes_every_file(script_demo: tuple[Any, str, Path], files: Path) -> None:
    server, url, temp = script_demo
    wait_until_up(url, server, files / "script.log")
    client = Client(url, verbose=False, download_files=str(files / "script-downloads"))
    _submit(client, "small.png", files, tile="auto").result(timeout=GUARD_S)
    (work,) = list(temp.glob("vpdsr-demo-*"))  # the demo's own folder, inside the one asked for
    assert any((work / "gradio").rglob("*.png")) and any((work / "results").rglob("*.png"))
    job = _submit(client, LONG[0], files)
    wait_for(lambda: job.status().code in (Status.PROCESSING, Status.PROGRESS), "the long job to run")
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=GUARD_S) == 0
    assert not work.exists() and not [p for p in temp.rglob("*") if p.is_file()]
    client.close()


def test_progress_reaches_the_page_through_the_queue(
    served: tuple[Client, engine.DemoModels, StepCounter], files: Path
) -> None:
    """The job's worker thread must see the event's context: gr.Progress finds its event there."""
    client, models, counter = served
    job = client.submit(handle_file(str(files / "half.png")), 4, "256", "adain", "", api_name="/upscale")
    seen: set[float] = set()
    while not job.done():
        status = job.status()
        if status.progress_data:
            seen.add(round(status.progress_data[0].progress or 0.0, 3))
        time.sleep(0.02)
    job.result(timeout=GUARD_S)
    assert len(seen) >= 2, f"the page saw progress {sorted(seen)}"
