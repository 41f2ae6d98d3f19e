"""The vpdsr browser demo: upscale an image, a batch of images, and see what CLIP thinks changed.

Run it with ``vpdsr demo``, ``python -m gradio_app`` or ``python gradio_app/app.py`` (flags:
``--help``). It works offline: analytics are off, fonts come from gradio's own package and
nothing is shared. Every event has an ``api_name``, so ``gradio_client`` can drive it.

The layout follows gradio's own demos: plain functions first, then ``build_demo`` with the
``gr.Blocks`` page, then ``launch`` under ``__main__``. The model loads on the first request.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported

import atexit
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
from matplotlib.figure import Figure

from gradio_app.config import DemoConfig
from gradio_app.engine import (
    BatchResult,
    DemoModels,
    Progress,
    StopCheck,
    UpscaleOptions,
    UpscaleResult,
    analyse,
    fresh_folder,
    prompt_from_image,
    upscale_batch,
    upscale_file,
)
from vpdsr.color import COLOR_FIXES, DEFAULT_COLOR_FIX
from vpdsr.errors import VPDError
from vpdsr.semantics import InspectionReport

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
EXAMPLES = ["nuthatch.png", "bark.png", "goldfish.png"]
TILE_CHOICES = ["auto", "no tiling", "256", "512", "1024", "2048"]
MODEL_JOBS = "model"  # one concurrency group for every event that runs a network
T = TypeVar("T")

# --- the events' helpers, then the events themselves (DemoEvents) -----------------------------


def parse_tile(choice: str) -> int | None:
    """The tile dropdown's label -> the pipeline's ``tile`` (None: automatic, 0: no tiling)."""
    if choice not in TILE_CHOICES:  # API callers can send anything
        raise gr.Error(f"tile must be one of {', '.join(TILE_CHOICES)}, got {choice!r}")
    if choice == "auto":
        return None
    return 0 if choice == "no tiling" else int(choice)


def upload_path(payload: Any) -> str:
    """The server-side path of an upload, as events with ``preprocess=False`` receive it.

    The image events skip gradio's own preprocessing, which opens uploads with PIL and answers a
    corrupt file with a bare "Error"; vpdsr's loader gives a message that names the problem.
    """
    if isinstance(payload, dict):
        payload = payload.get("path")
    if not payload:
        raise gr.Error("Upload an image first.")
    return str(payload)


def options_from(scale: float, tile: str, color_fix: str, prompt: str | None) -> UpscaleOptions:
    return UpscaleOptions(
        scale=float(scale), tile=parse_tile(tile), color_fix=color_fix, prompt=(prompt or "").strip() or None
    )


def progress_reporter(progress: gr.Progress) -> Progress:
    return lambda fraction, what: progress(fraction, desc=what)


def tag_chart(report: InspectionReport) -> Figure:
    """LR and SR probabilities of every tag in either top list, side by side, most likely on top."""
    drift = report.drift
    changes = sorted(drift.kept + drift.lost + drift.gained, key=lambda c: max(c.lr_prob, c.sr_prob))
    figure = Figure(figsize=(7, 0.32 * len(changes) + 1.2), layout="constrained")
    axes = figure.add_subplot()
    rows = range(len(changes))
    axes.barh([r + 0.2 for r in rows], [c.lr_prob for c in changes], height=0.4, label="input (LR)", color="#8c9bab")
    axes.barh([r - 0.2 for r in rows], [c.sr_prob for c in changes], height=0.4, label="output (SR)", color="#e8702a")
    axes.set_yticks(list(rows), [c.tag for c in changes])
    axes.set_xlabel("zero-shot tag probability")
    axes.set_title(f"Top {drift.top_k} tags of input and output")
    axes.legend(loc="lower right")
    return figure


class DemoEvents:
    """The events that run a network, bound to the demo's models and work folder.

    Each is a coroutine that hands its work to ``models.jobs`` and awaits it, so that gradio's
    cancel (the client's, the Stop button's) reaches the pipeline's ``should_stop`` and the next
    job waits until the cancelled one has stopped. Each takes the ``gr.Request`` to know its page's
    session: :meth:`closed` stops the jobs of a page that was closed. They are methods rather than
    ``functools.partial`` of functions because gradio finds ``gr.Request`` by its annotation,
    which it cannot read through a partial.
    """

    def __init__(self, models: DemoModels, workdir: Path) -> None:
        self.models = models
        self.workdir = workdir

    async def _run(self, work: Callable[[StopCheck], T], request: gr.Request) -> T:
        try:
            return await self.models.jobs.run(work, request.session_hash)
        except VPDError as err:
            raise gr.Error(str(err), print_exception=False) from None

    async def upscale(
        self,
        image: Any,
        scale: float,
        tile: str,
        color_fix: str,
        prompt: str,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - the default is how gradio hands out a progress bar
    ) -> tuple[tuple[str, str], str, str]:
        """One image -> (before, after) for the slider, the PNG to download, and sizes and time."""
        source, options = upload_path(image), options_from(scale, tile, color_fix, prompt)
        report = progress_reporter(progress)

        def work(stop: StopCheck) -> UpscaleResult:
            return upscale_file(self.models, source, options, fresh_folder(self.workdir), report, stop)

        result = await self._run(work, request)
        return (str(result.before), str(result.output)), str(result.output), result.summary()

    async def upscale_many(
        self,
        files: list[str] | None,
        scale: float,
        tile: str,
        color_fix: str,
        prompt: str,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008
    ) -> tuple[str, str]:
        """Many images -> a zip of the results and a summary naming any file that was skipped."""
        if not files:
            raise gr.Error("Upload one or more images first.")
        options, report = options_from(scale, tile, color_fix, prompt), progress_reporter(progress)

        def work(stop: StopCheck) -> BatchResult:
            return upscale_batch(self.models, files, options, fresh_folder(self.workdir), report, stop)

        batch = await self._run(work, request)
        if batch.archive is None:
            raise gr.Error(batch.summary(), print_exception=False)
        return str(batch.archive), batch.summary()

    async def semantics(self, low: Any, high: Any, request: gr.Request) -> tuple[str, Figure]:
        """The drift report and tag chart for an input and its upscaled output."""
        low, high = upload_path(low), upload_path(high)

        def work(stop: StopCheck) -> tuple[str, Figure]:
            report = analyse(self.models, low, high)
            return report.to_text(), tag_chart(report)

        return await self._run(work, request)

    async def tags_prompt(self, image: Any, request: gr.Request) -> str:
        """A prompt made of the input's most likely tags."""
        source = upload_path(image)
        return await self._run(lambda stop: prompt_from_image(self.models, source), request)

    def closed(self, request: gr.Request) -> None:
        """A page was closed or reloaded (gradio's ``unload``): nobody waits for its jobs any more."""
        self.models.jobs.stop_session(request.session_hash)


def intro(models: DemoModels) -> str:
    config = models.config
    return (
        "# vpdsr: one-step diffusion super-resolution\n"
        f"{models.describe()}\n\n"
        f"Uploads up to {config.max_file_size}, images up to {config.max_pixels / 1e6:.1f} megapixels, "
        f"up to {config.max_output_pixels / 1e6:.1f} megapixels computed per request. "
        "Everything runs on this machine; nothing is sent elsewhere."
    )


# --- the page ---------------------------------------------------------------------------------


def build_demo(
    config: DemoConfig | None = None, workdir: Path | None = None, models: DemoModels | None = None
) -> gr.Blocks:
    """The demo for ``config`` (default: the embedded model), queued and ready to launch.

    ``workdir`` holds the results (default: a temporary folder removed at exit); ``models`` lets
    the caller keep the models and their jobs, to stop them at shutdown (``gradio_app.cli``).
    """
    config = config or DemoConfig()
    models = models or DemoModels(config)
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="vpdsr-demo-"))
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    events = DemoEvents(models, workdir)
    model_job = {"concurrency_limit": config.concurrency, "concurrency_id": MODEL_JOBS}

    with gr.Blocks(title="vpdsr demo", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(intro(models), elem_id="intro")
        with gr.Tab("Upscale"), gr.Row():
            with gr.Column():
                image_in = gr.Image(
                    label="Input image",
                    type="filepath",
                    image_mode=None,
                    sources=["upload", "clipboard"],
                    height=320,
                    elem_id="input-image",
                )
                with gr.Row():
                    scale = gr.Slider(
                        1,
                        8,
                        value=models.default_scale,
                        step=0.5,
                        label="Scale",
                        info=f"the model's own is ×{models.default_scale:g}; it always runs at that one",
                    )
                    tile = gr.Dropdown(
                        TILE_CHOICES,
                        value="auto",
                        label="Tile size (output pixels)",
                        info="smaller tiles use less memory",
                    )
                color_fix = gr.Radio(
                    list(COLOR_FIXES),
                    value=DEFAULT_COLOR_FIX,
                    label="Colour fix",
                    info="match the output's colours to the input's",
                )
                prompt = gr.Textbox(
                    label="Prompt (optional)",
                    lines=1,
                    max_lines=3,
                    info="only for models with a text encoder (LoRA students with --base)",
                )
                with gr.Row():
                    if models.has_clip:
                        fill_prompt = gr.Button("Prompt from image tags", elem_id="fill-prompt")
                    run = gr.Button("Upscale", variant="primary", elem_id="upscale")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                gr.Examples(
                    [[str(EXAMPLES_DIR / name)] for name in EXAMPLES],
                    inputs=[image_in],
                    label="Examples (CC BY-SA 3.0, see gradio_app/examples/ATTRIBUTION.md)",
                    api_name="load_example",
                    api_visibility="private",
                )
            with gr.Column():
                slider = gr.ImageSlider(
                    label="Before (bicubic) / after (vpdsr)",
                    type="filepath",
                    format="png",
                    interactive=False,
                    elem_id="result",
                )
                sizes = gr.Textbox(label="Sizes and time", interactive=False, elem_id="sizes")
                download = gr.File(label="Download (lossless PNG)", interactive=False, elem_id="download")
        with gr.Tab("Batch"):
            gr.Markdown("Upscale several images with the options of the Upscale tab; the results come as one zip.")
            with gr.Row():
                files_in = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="batch-in")
                with gr.Column():
                    with gr.Row():
                        run_batch = gr.Button("Upscale all", variant="primary", elem_id="upscale-batch")
                        stop_batch = gr.Button("Stop", variant="stop", elem_id="stop-batch")
                    archive = gr.File(label="Results (zip of PNGs)", interactive=False, elem_id="batch-zip")
                    batch_summary = gr.Textbox(label="Summary", interactive=False, lines=3, elem_id="batch-summary")
        if models.has_clip:
            with gr.Tab("Semantics"):
                gr.Markdown(
                    "What CLIP sees in the input and the output. Tags that enter the output's top list may be "
                    "invented by the upscaler; tags that leave it may have been washed out."
                )
                with gr.Row():
                    sem_lr = gr.Image(
                        label="Input",
                        type="filepath",
                        image_mode=None,
                        sources=["upload", "clipboard"],
                        height=320,
                        elem_id="sem-lr",
                    )
                    sem_sr = gr.Image(
                        label="Output",
                        type="filepath",
                        image_mode=None,
                        sources=["upload", "clipboard"],
                        height=320,
                        elem_id="sem-sr",
                    )
                run_sem = gr.Button("Analyse", variant="primary", elem_id="analyse")
                with gr.Row():
                    report = gr.Textbox(label="Semantic drift report", lines=10, interactive=False, elem_id="report")
                    chart = gr.Plot(label="Top tags", elem_id="tag-chart")

        options = [scale, tile, color_fix, prompt]
        upscaled = run.click(
            events.upscale,
            [image_in, *options],
            [slider, download, sizes],
            api_name="upscale",
            preprocess=False,
            **model_job,
        )
        batched = run_batch.click(
            events.upscale_many,
            [files_in, *options],
            [archive, batch_summary],
            api_name="batch",
            **model_job,
        )
        if models.has_clip:
            fill_prompt.click(
                events.tags_prompt,
                [image_in],
                [prompt],
                api_name="prompt_from_tags",
                preprocess=False,
                **model_job,
            )
            upscaled.success(
                lambda image, output: (image, output),
                [image_in, download],
                [sem_lr, sem_sr],
                api_name="show_in_semantics",
                api_visibility="private",
            )
            run_sem.click(
                events.semantics,
                [sem_lr, sem_sr],
                [report, chart],
                api_name="semantics",
                preprocess=False,
                **model_job,
            )
        # gradio's cancel: the asyncio task of the event ends, and DemoEvents passes that on to the pipeline
        gr.on(
            [stop.click, stop_batch.click], None, cancels=[upscaled, batched], api_name="stop", api_visibility="private"
        )
        demo.unload(events.closed)
    return demo.queue(default_concurrency_limit=config.concurrency, max_size=config.max_queue)


def launch_demo(demo: gr.Blocks, config: DemoConfig, **options: Any) -> Any:
    """Start the server with the settings that keep the demo local and its uploads bounded."""
    return demo.launch(
        server_name=config.host,
        server_port=config.port,
        share=False,
        max_file_size=config.max_file_size,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        **options,
    )


if __name__ == "__main__":
    from gradio_app.cli import main

    raise SystemExit(main())
