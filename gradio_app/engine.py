"""The demo's work, without any UI: load the models once, upscale files, analyse, zip batches.

Kept apart from ``app.py`` so the page code is only layout and glue, and so each step can be
called (and reasoned about) as a plain function of files in and files out. Every failure the
user can cause arrives here as a ``vpdsr.errors.VPDError`` with a readable message.
"""

from __future__ import annotations

import asyncio
import contextvars
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from PIL import Image

from gradio_app.config import DemoConfig, launch_option
from vpdsr import VPDPipeline, default_model_path, load_pipeline, read_meta
from vpdsr.color import DEFAULT_COLOR_FIX
from vpdsr.errors import (
    Cancelled,
    DownloadNotAllowed,
    MissingBaseError,
    ModelFileError,
    NoDefaultModel,
    OutOfMemory,
    VPDError,
)
from vpdsr.imageio import load_image, pil_to_tensor, save_image
from vpdsr.modelfile import StudentMeta
from vpdsr.pipeline import ceil_to, network_scale, resolve_device, resolve_scale, scale_note
from vpdsr.semantics import InspectionReport, SemanticModel

Progress = Callable[[float, str], None]  # fraction done in [0, 1], what is being done
StopCheck = Callable[[], bool]  # True once the job should stop: the pipeline's should_stop hook
T = TypeVar("T")

# Result folders older than this are removed when a new request starts; by then gradio has
# copied what it serves into its own cache.
_KEEP_RESULTS_S = 3600.0
# The launch options that fix what the core reports: the core's messages name no front-end's settings.
HINTS: dict[type[VPDError], str] = {
    MissingBaseError: f"start the demo with {launch_option('--base')} naming them",
    DownloadNotAllowed: f"the demo downloads nothing: {launch_option('--base')} must name a folder or file",
    OutOfMemory: f"start the demo with {launch_option('--device')} set to cpu, or free memory",
    NoDefaultModel: f"start the demo with {launch_option('--model')} naming one",
}


@dataclass(frozen=True)
class UpscaleOptions:
    scale: float | None = None  # None: the model's own
    tile: int | None = None  # None: automatic, 0: no tiling
    color_fix: str = DEFAULT_COLOR_FIX
    prompt: str | None = None


@dataclass(frozen=True)
class Timing:
    seconds: float  # the upscale itself
    load_seconds: float  # loading the model first (0 once it is loaded)
    device: str


@dataclass(frozen=True)
class UpscaleResult:
    before: Path  # the input resized (bicubic) to the output size: the slider's left side
    output: Path  # the result, a lossless PNG
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    timing: Timing
    note: str | None = None  # what the scale costs with this model (vpdsr.pipeline.scale_note)

    def summary(self) -> str:
        (w, h), (ow, oh), t = self.input_size, self.output_size, self.timing
        text = f"Input {w}×{h} → output {ow}×{oh} in {t.seconds:.2f} s on {t.device}"
        if t.load_seconds:
            text += f" (plus {t.load_seconds:.1f} s to load the model, once)"
        return f"{text}. Note: {self.note}." if self.note else text


@dataclass(frozen=True)
class BatchResult:
    archive: Path | None  # None when no file could be upscaled
    done: list[str]
    failed: list[str]  # "name: reason"

    def summary(self) -> str:
        lines = [f"Upscaled {len(self.done)} of {len(self.done) + len(self.failed)} files."]
        lines += [f"Skipped {reason}" for reason in self.failed]
        return "\n".join(lines)


class ModelJobs:
    """The threads that run model work: at most ``concurrency`` jobs at once, each one stoppable.

    gradio runs a plain function in a thread it cannot stop. Cancelling its event (the client's
    cancel, the Stop button) only cancels the asyncio task that waits for the thread, which frees
    the event's concurrency slot: the next job then starts beside the one still computing. So the
    events await :meth:`run` instead. A cancel sets the job's stop flag, which the pipeline checks
    before every tile, and the task returns only once the worker has, so gradio's slot is freed
    after the work has stopped. The pool's size bounds the jobs computing at once all the same.
    """

    def __init__(self, concurrency: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="vpdsr-job")
        self._lock = threading.Lock()
        self._stops: dict[threading.Event, str | None] = {}  # each running or waiting job's flag -> its session

    async def run(self, work: Callable[[StopCheck], T], session: str | None = None) -> T:
        """``work(should_stop)`` in a worker thread; ``session`` (gradio's session hash) lets
        :meth:`stop_session` stop it when the page that asked for it is closed."""
        stop = threading.Event()
        with self._lock:
            self._stops[stop] = session
        try:
            # gr.Progress finds its event through context variables: the worker runs in a copy of ours
            future = asyncio.wrap_future(self._pool.submit(contextvars.copy_context().run, _start, work, stop))
            try:
                return await asyncio.shield(future)  # a cancel must reach this task, not the worker's future
            except asyncio.CancelledError:
                stop.set()
                await _outlast(future)
                raise
        finally:
            with self._lock:
                del self._stops[stop]

    def stop_session(self, session: str) -> int:
        """Stop the jobs of a page that was closed or reloaded; returns how many there were."""
        with self._lock:
            stops = [stop for stop, owner in self._stops.items() if owner == session]
        for stop in stops:
            stop.set()
        return len(stops)

    @property
    def active(self) -> int:
        """Jobs running or waiting for a worker."""
        with self._lock:
            return len(self._stops)

    def close(self) -> None:
        """Stop every job and wait for the workers to return: at shutdown, before the work folder goes."""
        with self._lock:
            for stop in self._stops:
                stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


def _start(work: Callable[[StopCheck], T], stop: threading.Event) -> T:
    if stop.is_set():  # stopped while it waited for a worker
        raise Cancelled("cancelled before it started")
    return work(stop.is_set)


async def _outlast(future: asyncio.Future) -> None:
    """Wait for a worker that was told to stop (within one tile), through any further cancels."""
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            continue
    if not future.cancelled():
        future.exception()  # retrieved, so asyncio does not log the worker's Cancelled as unhandled


class DemoModels:
    """The student and the optional CLIP, each loaded on first use, once, by whichever request
    comes first; nothing is loaded at import or while the page is built. ``jobs`` runs the work."""

    def __init__(self, config: DemoConfig) -> None:
        self.config = config
        self.jobs = ModelJobs(config.concurrency)
        self.model_path = config.model if config.model is not None else default_model_path()
        self.meta: StudentMeta | None = None  # metadata only: reading it loads no weights
        self.meta_error = ""
        if self.model_path is not None:
            try:
                self.meta = read_meta(self.model_path)
            except ModelFileError as err:
                self.meta_error = str(err)
        self._lock = threading.Lock()
        self._pipeline: VPDPipeline | None = None
        self._semantic: SemanticModel | None = None

    @property
    def has_clip(self) -> bool:
        return self.config.clip is not None

    @property
    def default_scale(self) -> float:
        return float(self.meta.scale) if self.meta else 4.0

    def scale_of(self, options: UpscaleOptions) -> float:
        """The scale a request runs at, as the pipeline resolves it: its own, or the model's for None."""
        return self.default_scale if options.scale is None else options.scale

    def describe(self) -> str:
        """Markdown about the configured model, for the top of the page."""
        if self.model_path is None:
            return (
                "**No model is loaded.** This build of vpdsr ships no embedded default model. "
                "Start the demo with a student file: `vpdsr demo --model student.safetensors` "
                "(or set `VPDSR_MODEL`); LoRA students also need `--base`."
            )
        if self.meta is None:
            return f"**The model cannot be used:** {self.meta_error}"
        name = self.meta.name or self.model_path.name
        text = f"Model **{name}**: {self.meta.backbone.name} backbone, trained for ×{self.meta.scale}."
        if self.meta.weights == "lora" and self.config.base is None:  # said up front; loading would refuse it
            text += f" **It is a LoRA student: start the demo with {launch_option('--base')} naming its base weights.**"
        return text

    def pipeline(self) -> tuple[VPDPipeline, float]:
        """The loaded pipeline and the seconds this call spent loading it (0 when it was loaded)."""
        with self._lock:
            if self._pipeline is not None:
                return self._pipeline, 0.0
            start = time.perf_counter()
            self._pipeline = load_pipeline(model=self.model_path, base=self.config.base, device=self.config.device)
            return self._pipeline, time.perf_counter() - start

    def semantic_model(self) -> SemanticModel:
        if self.config.clip is None:
            raise VPDError("no CLIP model is configured; start the demo with --clip (and --clip-config if needed)")
        with self._lock:
            if self._semantic is None:
                try:
                    model = SemanticModel.from_file(self.config.clip, config=self.config.clip_config)
                except ModelFileError as err:
                    raise ModelFileError(f"{err} (the demo takes the config as --clip-config)") from None
                self._semantic = model.to(resolve_device(self.config.device))
            return self._semantic


def fresh_folder(workdir: Path) -> Path:
    """A new folder for one request's files, after removing those of requests long finished."""
    workdir.mkdir(parents=True, exist_ok=True)
    cutoff = time.time() - _KEEP_RESULTS_S
    for old in workdir.iterdir():
        if old.is_dir() and old.stat().st_mtime < cutoff:
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=workdir))


def open_upload(path: str | Path, max_pixels: int) -> Image.Image:
    """Decode an uploaded file with the demo's pixel limit; errors name the file as uploaded."""
    path = Path(path)
    return load_image(path, max_pixels=max_pixels, name=path.name)


def check_work(models: DemoModels, sizes: Sequence[tuple[int, int]], options: UpscaleOptions, asked: str) -> None:
    """Refuse a request whose images would make the network compute more pixels than the demo's
    ``max_output_pixels``, before any work. A job's time grows with those pixels, the input pixel
    limit alone allows an hour-long x4 job on a CPU, and one job holds the model for everyone.
    ``asked`` says what was asked for, e.g. ``"photo.png: 800×600 at ×4"``.

    The pixels counted are the padded ones the network really computes: each side is padded up to
    the model's multiple, so a 262144×1 upload (4.2 megapixels at ×4 before padding, as many as
    512×512) computes 1048576×16 at ×4, four times the work and memory of the square."""
    if models.meta is None:
        return  # loading the model refuses the request with its own message
    scale = resolve_scale(models.meta, options.scale)  # a bad scale gets the pipeline's own message
    run = network_scale(models.meta, options.scale)  # from the metadata alone: before any model loads
    multiple = models.meta.size_multiple
    pixels = [(round(w * run), round(h * run)) for w, h in sizes]
    padded = [(ceil_to(w, multiple), ceil_to(h, multiple)) for w, h in pixels]
    total, limit = sum(w * h for w, h in padded), models.config.max_output_pixels
    if total <= limit:
        return
    computed = ""
    if len(pixels) == 1:
        (w, h), (pw, ph) = pixels[0], padded[0]
        computed = f"{w}×{h} pixels, " if (w, h) == (pw, ph) else (
            f"{w}×{h} pixels padded to {pw}×{ph} (the model works on sides that are multiples of {multiple}), "
        )
    how = f" (the model computes at its own ×{run:g}, then scales down)" if run > scale else ""
    raise VPDError(
        f"{asked} means computing {computed}{total / 1e6:.1f} megapixels{how}: above this demo's limit of "
        f"{limit / 1e6:.1f} megapixels per request. Use smaller images, or start the demo with a larger "
        f"{launch_option('--max-output-pixels')}"
    )


def upscale_image(
    models: DemoModels,
    image: Image.Image,
    options: UpscaleOptions,
    progress: Progress | None = None,
    should_stop: StopCheck | None = None,
) -> tuple[Image.Image, Timing]:
    """Upscale a decoded image, loading the model first if no request has yet; ``should_stop`` is
    checked before every tile and raises ``vpdsr.errors.Cancelled``. The core's errors come out in
    the demo's words (``HINTS``)."""
    if progress:
        progress(0.0, "Loading the model")

    def on_tile(done: int, total: int) -> None:
        if progress:
            progress(done / total, f"Upscaling (step {done} of {total})")

    try:
        pipe, load_seconds = models.pipeline()
        start = time.perf_counter()
        result = pipe.upscale_pil(
            image,
            scale=options.scale,
            tile=options.tile,
            color_fix=options.color_fix,
            prompt=options.prompt or None,
            progress=on_tile,
            should_stop=should_stop,
        )
    except VPDError as err:
        raise err.worded(HINTS) from None
    return result, Timing(time.perf_counter() - start, load_seconds, str(pipe.device))


def upscale_file(
    models: DemoModels,
    source: str | Path,
    options: UpscaleOptions,
    folder: Path,
    progress: Progress | None = None,
    should_stop: StopCheck | None = None,
) -> UpscaleResult:
    """Upscale one uploaded file into ``folder``: the result PNG and a bicubic 'before' PNG."""
    source, scale = Path(source), models.scale_of(options)
    image = open_upload(source, models.config.max_pixels)
    check_work(models, [image.size], options, f"{source.name}: {image.width}×{image.height} at ×{scale:g}")
    result, timing = upscale_image(models, image, options, progress, should_stop)
    output = save_image(result, folder / f"{source.stem}_x{scale:g}.png")
    display = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    before = folder / f"{source.stem}_bicubic.png"
    display.resize(result.size, Image.Resampling.BICUBIC).save(before, compress_level=1)
    note = scale_note(models.meta, scale) if models.meta else None
    return UpscaleResult(before, output, image.size, result.size, timing, note)


def upscale_batch(
    models: DemoModels,
    sources: Sequence[str | Path],
    options: UpscaleOptions,
    folder: Path,
    progress: Progress | None = None,
    should_stop: StopCheck | None = None,
) -> BatchResult:
    """Upscale many files into one zip; a file that fails is listed and skipped, as in the CLI.
    The work limit counts every file that will open, so it holds for the request as a whole."""
    if not sources:
        raise VPDError("no files were uploaded")
    if len(sources) > models.config.max_batch:
        raise VPDError(
            f"{len(sources)} files is more than this demo takes at once ({models.config.max_batch}); "
            "split them, or start the demo with a larger --max-batch"
        )
    sizes = [size for size in map(_declared_size, sources) if size and size[0] * size[1] <= models.config.max_pixels]
    check_work(models, sizes, options, f"{len(sizes)} images at ×{models.scale_of(options):g}")
    done: list[str] = []
    failed: list[str] = []
    names: set[str] = set()
    archive = folder / "vpdsr-results.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:  # PNGs are compressed already
        for index, source in enumerate(map(Path, sources)):
            name = _unique(f"{source.stem}_x{models.scale_of(options):g}.png", names)

            def step(fraction: float, what: str, index: int = index, label: str = source.name) -> None:
                if progress:
                    progress((index + fraction) / len(sources), f"{label} ({index + 1}/{len(sources)}): {what}")

            try:
                image = open_upload(source, models.config.max_pixels)
                result, _ = upscale_image(models, image, options, step, should_stop)
                zf.write(save_image(result, folder / name), arcname=name)
                done.append(source.name)
            except (ModelFileError, Cancelled):
                raise  # no usable model: every other file would fail the same way; or the job was stopped
            except VPDError as err:
                failed.append(f"{source.name}: {err}")
    if not done:
        archive.unlink()
    return BatchResult(archive if done else None, done, failed)


def _declared_size(path: str | Path) -> tuple[int, int] | None:
    """An image's size from its header, nothing decoded; None for a file that will not open, which
    the batch then skips with the loader's own message."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _unique(name: str, taken: set[str]) -> str:
    """Two uploads called photo.png must not overwrite each other in the zip."""
    stem, suffix, n = Path(name).stem, Path(name).suffix, 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}{suffix}"
    taken.add(name)
    return name


def _rgb_tensor(image: Image.Image) -> torch.Tensor:
    return pil_to_tensor(image.convert("RGB"))


def analyse(models: DemoModels, low: str | Path, high: str | Path) -> InspectionReport:
    """CLIP's view of an input and its upscaled output: tags, drift, consistency, quality."""
    judge = models.semantic_model()
    lr = open_upload(low, models.config.max_pixels)
    sr = open_upload(high, models.config.max_pixels * 64)  # an output is up to x8 per side
    return judge.inspect(_rgb_tensor(lr), _rgb_tensor(sr))[0]


def prompt_from_image(models: DemoModels, source: str | Path, max_tags: int = 8) -> str:
    """A hard prompt (the image's most likely tags), as the student would be conditioned on."""
    judge = models.semantic_model()
    return judge.prompts(_rgb_tensor(open_upload(source, models.config.max_pixels)), max_tags=max_tags)[0]
