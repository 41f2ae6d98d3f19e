"""Errors that front-ends show to people as they are.

Every message names the problem and what to do about it, so the ComfyUI node, the Gradio demo
and the CLI can print ``str(err)`` instead of a traceback from deep inside torch.
"""


class VPDError(Exception):
    """Base class: anything raised on purpose by vpdsr for bad input or a bad environment."""


class ModelFileError(VPDError):
    """A model file is missing, corrupt, of the wrong kind, or needs weights that are absent."""


class ImageError(VPDError):
    """An image is unreadable, corrupt, of an unsupported kind, or larger than the pixel limit."""


class Cancelled(VPDError):
    """The caller's ``should_stop`` hook asked to stop; partial results are discarded."""


class OutOfMemory(VPDError):
    """Even the smallest tile did not fit in the device's memory."""
