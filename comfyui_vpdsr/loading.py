"""Loading students and CLIPs once: a small cache keyed by what would make a reload differ.

ComfyUI already reuses a node's output while its inputs stay the same, but forgets it when
another workflow runs in between. The key holds each file's modification time, so a student
that was retrained in place is picked up on the next run instead of the stale copy.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vpdsr.errors import MissingBaseError, ModelFileError, OutOfMemory, VPDError

if TYPE_CHECKING:
    from vpdsr import VPDPipeline
    from vpdsr.semantics import SemanticModel


class LoadCache:
    """The last ``size`` loaded models; older ones are dropped so their memory can be freed."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, load: Callable[[], Any]) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = load()
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()


STUDENTS = LoadCache()
CLIPS = LoadCache()

# The node inputs that fix what the core reports: the core's messages name no front-end's settings.
# (Missing files and the embedded default are the node's own errors: ``folders`` resolves its inputs.)
HINTS: dict[type[VPDError], str] = {
    MissingBaseError: "choose its base model in 'base' of Load VPD Model: an SD 2.x / SD-Turbo single-file "
    ".safetensors in models/checkpoints, or a diffusers folder in models/diffusers",
    OutOfMemory: "choose dtype fp16 in Load VPD Model, or free memory by unloading other models",
}


def file_stamp(path: Path | None) -> tuple[str, int] | None:
    """Path and modification time; for a folder (a diffusers base), its newest file's time."""
    if path is None:
        return None
    if path.is_dir():
        times = [entry.stat().st_mtime_ns for entry in path.rglob("*") if entry.is_file()]
        return str(path.resolve()), max(times, default=path.stat().st_mtime_ns)
    return str(path.resolve()), path.stat().st_mtime_ns


def load_student_pipeline(
    path: Path, base: Path | None, dtype: str, device: torch.device, offload_device: torch.device
) -> VPDPipeline:
    """A pipeline in ``dtype`` for ``device``, parked on ``offload_device`` until it runs; the core's
    errors come out in the node's words (``HINTS``).

    The pipeline module (and with it diffusers) is imported here, at the first load, not with the pack:
    ComfyUI imports every pack at its own start-up, and diffusers alone takes seconds."""
    from vpdsr.pipeline import load_pipeline, resolve_dtype

    torch_dtype = resolve_dtype(dtype, device)
    key = (file_stamp(path), file_stamp(base), torch_dtype)
    try:
        return STUDENTS.get(key, lambda: load_pipeline(path, base=base, device=offload_device, dtype=torch_dtype))
    except VPDError as err:
        raise err.worded(HINTS) from None


def load_semantic_model(path: Path, config: str | None, text_path: Path | None = None) -> SemanticModel:
    """A CLIP from one file, or from an image tower (``path``) and a text tower (``text_path``)."""
    from vpdsr.semantics import SemanticModel
    from vpdsr.semantics.loading import MissingTextTower

    hints = {MissingTextTower: "choose its text tower in 'text_encoder' of Load CLIP"}
    key = (file_stamp(path), file_stamp(text_path), config)
    try:
        return CLIPS.get(key, lambda: SemanticModel.from_file(path, config, text_path=text_path))
    except VPDError as err:
        raise err.worded(hints) from None


def stamp_or_missing(resolve: Callable[[], Path | None]) -> Any:
    """A fingerprint for ComfyUI: changes when the file does; a missing file never matches."""
    try:
        return file_stamp(resolve())
    except (ModelFileError, OSError):
        return float("nan")
