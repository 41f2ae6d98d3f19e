"""Which model file a name means, and whether it can be read: answered before torch is imported.

Every front-end lets a user name the embedded default (``default``) or a file, and a typo in a path
should be reported at once: torch and diffusers take seconds to import, so this module imports
neither, and the CLI checks a path here before it loads anything (``bench/startup.py`` times it).
"""

from __future__ import annotations

import os
import secrets
import stat
from importlib import resources
from pathlib import Path

from .errors import ModelFileError, NoDefaultModel

DEFAULT_MODEL_NAME = "vpdsr-tiny-default.safetensors"
DEFAULT = "default"  # the name that means the embedded default model, as ``bench.quality`` takes it


def default_model_path() -> Path | None:
    """The embedded default model shipped inside the package, if this build has one."""
    path = Path(str(resources.files("vpdsr").joinpath("assets", DEFAULT_MODEL_NAME)))
    return path if path.is_file() else None


def model_path(model: str | os.PathLike | None) -> Path:
    """The file ``model`` names: ``None`` or ``default`` is the embedded default (a file called
    ``default`` is reached as ``./default``)."""
    if model is not None and os.fspath(model) != DEFAULT:
        return Path(model)
    path = default_model_path()
    if path is None:
        raise NoDefaultModel("no embedded default model ships with this version of vpdsr yet; a student file is needed")
    return path


def private_temp_path(path: Path) -> Path:
    """A hidden name beside ``path`` that no other writer uses (process id and a random part): two
    processes writing one output (two runs into a folder, a shared cache) never take, rename or
    delete each other's half-written file, as they did under one fixed ``.tmp`` name."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def check_model_file(path: Path, what: str = "model file", missing_hint: str = "") -> None:
    """Refuse a path that is not a regular file, saying what it is: a folder, a pipe or a device
    (``/dev/zero`` would never end, a FIFO waits forever for a writer) is not "not found".

    ``what`` names the kind of file the caller reads (``teacher file``, ``CLIP checkpoint``), and
    ``missing_hint`` follows "not found" with where one comes from.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise ModelFileError(f"{path}: is a link to a missing file ({os.readlink(path)})") from None
        raise ModelFileError(f"{what} not found: {path}{f' ({missing_hint})' if missing_hint else ''}") from None
    except OSError as err:  # a path through a file, a folder we may not enter, a link loop
        raise ModelFileError(f"{path}: cannot be read ({err.strerror or err})") from None
    if stat.S_ISREG(info.st_mode):
        return
    if stat.S_ISDIR(info.st_mode):
        kind = "a folder"
    elif stat.S_ISFIFO(info.st_mode):
        kind = "a pipe"
    elif stat.S_ISSOCK(info.st_mode):
        kind = "a socket"
    else:
        kind = "a device"
    link = f" (a link to {os.readlink(path)})" if path.is_symlink() else ""
    article = "an" if what[:1].lower() in "aeiou" else "a"
    raise ModelFileError(f"{path}: is {kind}, not {article} {what}{link}")
