"""Errors that front-ends show to people, instead of a traceback from deep inside torch.

Every message names the problem and what is needed, in the core's own terms: the CLI, the ComfyUI
node and the Gradio demo each set things differently (a flag, a socket, a launch option), so no
core message names a front-end's setting (tests/test_errors.py checks that none contains ``--``).
The errors a front-end has a setting for carry their facts as fields; the front-end catches the
type and adds its own words with :meth:`VPDError.worded`, instead of re-checking the condition
before calling the core just to word it differently.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping


class VPDError(Exception):
    """Base class: anything raised on purpose by vpdsr for bad input or a bad environment."""

    def worded(self, hints: Mapping[type[VPDError], str]) -> VPDError:
        """This error in a front-end's words: a copy whose message ends with ``(hint)`` for the
        first type in ``hints`` it is an instance of, or itself when none fits.

        A hint names the front-end's setting that fixes the problem (``--base``, a node's ``base``
        input, the demo's ``VPDSR_BASE``). The copy keeps the type and the fields, so a caller
        further out can still catch it as before.
        """
        for kind, hint in hints.items():
            if isinstance(self, kind):
                worded = copy.copy(self)
                worded.args = (f"{self} ({hint})",)
                return worded
        return self


class ModelFileError(VPDError):
    """A model file is missing, corrupt, of the wrong kind, or needs weights that are absent."""


class ImageError(VPDError):
    """An image is unreadable, corrupt, of an unsupported kind, or larger than the pixel limit."""


class Cancelled(VPDError):
    """The caller's ``should_stop`` hook asked to stop; partial results are discarded."""


class OutOfMemory(VPDError):
    """Even the smallest tile did not fit in the device's memory.

    ``device`` is the device type (``"cuda"``, ``"mps"``), ``tile`` the last tile size tried, in
    output pixels, and ``dtype`` the precision it ran in: front-ends name their setting for each.
    """

    def __init__(self, message: str, device: str = "", tile: int = 0, dtype: str = "") -> None:  # defaults: picklable
        super().__init__(message)
        self.device = device
        self.tile = tile
        self.dtype = dtype


class MissingBaseError(ModelFileError):
    """A backbone's base weights are needed and none were given: a LoRA student file holds only
    what training changed, and the trainer's SD backbones start from the user's weights.

    ``backbone`` is the backbone's name; ``path`` the student file that needs them ("" when no file
    does, as in the trainer).
    """

    def __init__(self, message: str, backbone: str = "", path: str = "") -> None:
        super().__init__(message)
        self.backbone = backbone
        self.path = path


class DownloadNotAllowed(ModelFileError):
    """Base weights name no existing folder or file, and downloading was not allowed.

    ``source`` is what was given: a mistyped path, or a Hugging Face repo id to download from.
    """

    def __init__(self, message: str, source: str = "") -> None:
        super().__init__(message)
        self.source = source


class NoDefaultModel(ModelFileError):
    """No student file was given and this build embeds no default model to fall back on."""


class NonFiniteWeights(ModelFileError):
    """A model file holds NaN or infinite weights: every image it made would come out black.

    ``tensor`` names the first such tensor and ``count`` how many of its values are not finite.
    """

    def __init__(self, message: str, tensor: str = "", count: int = 0) -> None:  # defaults: picklable
        super().__init__(message)
        self.tensor = tensor
        self.count = count


class NonFiniteOutput(VPDError):
    """The network's output held NaN or infinite values, so no image was made of it.

    ``dtype`` is the precision it ran in: half precision overflowing is the usual cause.
    """

    def __init__(self, message: str, dtype: str = "") -> None:
        super().__init__(message)
        self.dtype = dtype
