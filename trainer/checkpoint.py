"""Resumable checkpoints: weights, optimizers, schedulers, EMA, RNG states and the step.

Layout of ``<output_dir>/checkpoints/step-00001234/``::

    weights.safetensors   trainable parameters and buffers of every trained module ("name/key")
    ema.safetensors       the EMA weights, when EMA is on
    optim.pt              optimizer, scheduler and grad-scaler states (read with weights_only=True)
    rng.safetensors       torch CPU (and CUDA) generator states
    state.json            step, counters, python/numpy RNG states, the config of the run

A checkpoint is written into ``step-XXXXXXXX.partial``, flushed to disk (fsync) and renamed when
complete, so a crash while saving never leaves something that looks like a checkpoint but is not.
``state.json``, written last, records every file's size. A folder damaged anyway (a full disk, a
copy cut short, a file emptied since) is found when it is read back, before anything is applied,
and ``load_latest`` then resumes from the newest checkpoint that is whole. Data order needs no
state: it is a function of the step (see ``batches``).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config_loading import ConfigError

__all__ = [
    "CheckpointState",
    "CorruptCheckpoint",
    "WriteFailed",
    "load_checkpoint",
    "load_latest",
    "prune_checkpoints",
    "save_checkpoint",
    "trained_keys",
    "write_reported",
]

PREFIX = "step-"
PARTIAL = ".partial"
T = TypeVar("T")
# What reading a damaged file raises: truncated safetensors, an empty or cut zip/pickle (optim.pt), bad JSON.
_UNREADABLE = (
    OSError, SafetensorError, EOFError, RuntimeError, pickle.UnpicklingError, ValueError, KeyError, TypeError
)  # fmt: skip


class CorruptCheckpoint(ConfigError):
    """A checkpoint folder that cannot be read back whole: a file missing, truncated or unparsable."""

    def __init__(self, folder: Path, problem: str) -> None:
        super().__init__(f"{folder.name}: {problem}")
        self.folder, self.problem = folder, problem


class WriteFailed(RuntimeError):
    """A checkpoint or the exported model could not be written (a full disk, a lost mount, no
    permission); the message names the file and the cause, and what was written before is kept."""


# What a failed write raises: the OS, safetensors (its own type, wrapping the I/O error). torch.save's
# RuntimeError is turned into the OSError behind it where there is one (see _torch_save): any other
# RuntimeError (out of memory, a bug in a state_dict) is no write failure and keeps its traceback.
WRITE_ERRORS = (OSError, SafetensorError)


def write_failure(err: BaseException, path: Path) -> str:
    """``file: cause`` for a failed write into ``path``: the OS's words where it gave them."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename or path}: {err.strerror}"
    return f"{path}: {(str(err).strip().splitlines() or [type(err).__name__])[0][:200]}"


@contextmanager
def write_reported(path: Path, what: str) -> Iterator[None]:
    """Run the writing of ``what`` into ``path``: an OSError (a full disk, a folder in the way) ends the
    run as one WriteFailed line naming the file and the cause, as a failed checkpoint does, not as a
    traceback."""
    try:
        yield
    except OSError as err:
        raise WriteFailed(f"cannot write {what} ({write_failure(err, path)})") from None


class CheckpointState:
    """What the loop hands to save/load: modules (with the keys to keep) and optimizer-like states."""

    def __init__(self, modules: dict[str, nn.Module], keys: dict[str, list[str]], stateful: dict[str, Any],
                 ema: Any = None) -> None:  # fmt: skip
        self.modules, self.keys, self.stateful, self.ema = modules, keys, stateful, ema


def trained_keys(module: nn.Module) -> list[str]:
    """State-dict keys that training changes: trainable parameters and all buffers.

    Frozen base weights (an SD UNet under LoRA) are left out, so checkpoints stay small; they
    are rebuilt from the same source when the run is resumed.
    """
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    names |= {n for n, _ in module.named_buffers()}
    return sorted(k for k in module.state_dict() if k in names)


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, mt, gauss = plain["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(root: Path, step: int, state: CheckpointState, extra: dict[str, Any]) -> Path:
    """Write the checkpoint for ``step`` completed steps atomically; returns its folder.

    A write that fails raises WriteFailed naming the file and the cause, after removing what it
    wrote: on a full disk the partial folder would only hold space the next attempt needs, and
    the checkpoints already published are not touched.
    """
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / (final.name + PARTIAL)
    try:
        _write(root, tmp, final, step, state, extra)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, WRITE_ERRORS):
            raise WriteFailed(
                f"cannot write the checkpoint of step {step} ({write_failure(err, tmp)}); the last one written is kept"
            ) from None
        raise  # not a write failure (out of memory, a bug): its own traceback
    return final


def _write(root: Path, tmp: Path, final: Path, step: int, state: CheckpointState, extra: dict[str, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights = {}
    for name, module in state.modules.items():
        sd = module.state_dict()
        weights.update({f"{name}/{k}": sd[k].detach().to("cpu").contiguous() for k in state.keys[name]})
    save_file(weights, str(tmp / "weights.safetensors"))
    if state.ema is not None:
        save_file(
            {k: v.to("cpu").contiguous() for k, v in state.ema.state_dict().items()}, str(tmp / "ema.safetensors")
        )
    _torch_save({name: obj.state_dict() for name, obj in state.stateful.items()}, tmp / "optim.pt")
    rng_tensors, rng_plain = _rng_state()
    save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / "rng.safetensors"))
    sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    info = {"step": step, "rng": rng_plain, "files": sizes, **extra}
    (tmp / "state.json").write_text(json.dumps(info), encoding="utf-8")
    _publish(tmp, final)


class _KeepsWriteError:
    """A binary file that remembers the OSError of a failed write, which torch.save would otherwise
    report only as a RuntimeError in its own words ("unexpected pos 704 vs 598")."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)``, where a failed write raises the OSError itself (a full disk)."""
    with path.open("wb") as file:
        writer = _KeepsWriteError(file)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise writer.error from None


def _fsync(path: Path) -> None:
    folder = path.is_dir()
    if folder and not hasattr(os, "O_DIRECTORY"):
        return  # Windows cannot open a folder; NTFS journals the rename itself
    fd = os.open(path, os.O_DIRECTORY if folder else os.O_RDWR)  # Windows' fsync needs a writable handle
    try:
        os.fsync(fd)
    except OSError as err:
        if not folder or err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise  # some network and FUSE filesystems cannot sync a folder; its files are synced
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the written folder to its final name, its data on disk first.

    Without the fsyncs, a power cut or a killed VM soon after the rename can leave a folder that
    looks complete but holds empty or truncated files: filesystems (ext4, xfs) may commit the
    rename before the delayed data. The parent folder is synced so the rename itself persists.
    """
    for file in tmp.iterdir():
        _fsync(file)
    _fsync(tmp)
    if final.exists():  # the same step saved again after a resume: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)


@dataclass
class _Saved:
    """A checkpoint read into memory, so that it is known to be whole before any of it is applied."""

    info: dict[str, Any]
    weights: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    stateful: dict[str, Any]
    rng: dict[str, torch.Tensor]


def _read(folder: Path, name: str, reader: Callable[[Path], T]) -> T:
    """``reader(folder / name)``, where a missing or unreadable file is a CorruptCheckpoint naming it."""
    path = folder / name
    if not path.is_file():
        raise CorruptCheckpoint(folder, f"{name} is missing")
    try:
        return reader(path)
    except _UNREADABLE as err:
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise CorruptCheckpoint(folder, f"{name} is unreadable ({detail})") from None


def _read_info(path: Path) -> dict[str, Any]:
    info = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(info, dict) or not isinstance(info.get("step"), int) or {"python", "numpy"} - set(info["rng"]):
        raise ValueError("not the state of a checkpoint")
    return info


def _read_checkpoint(folder: Path, device: torch.device) -> _Saved:
    """Every file of ``folder``; sizes are checked first, so that a file cut short is named as
    such rather than by a parser's error."""
    info = _read(folder, "state.json", _read_info)
    files = info.get("files", {})  # checkpoints written before #13 have no sizes
    if not isinstance(files, dict):
        raise CorruptCheckpoint(folder, "state.json's file list is not a mapping")
    for name, size in files.items():
        actual = _read(folder, name, lambda p: p.stat().st_size)
        if actual != size:
            raise CorruptCheckpoint(folder, f"{name} is {actual} bytes, {size} were written")
    return _Saved(
        info,
        _read(folder, "weights.safetensors", load_file),
        _read(folder, "ema.safetensors", load_file) if (folder / "ema.safetensors").exists() else None,
        _read(folder, "optim.pt", lambda p: torch.load(p, map_location=device, weights_only=True)),
        _read(folder, "rng.safetensors", load_file),
    )


def _apply(saved: _Saved, state: CheckpointState, path: Path, device: torch.device) -> None:
    for name, module in state.modules.items():
        prefix = name + "/"
        own = {k[len(prefix) :]: v for k, v in saved.weights.items() if k.startswith(prefix)}
        if sorted(own) != state.keys[name]:
            missing = sorted(set(state.keys[name]) - set(own))
            extra = sorted(set(own) - set(state.keys[name]))
            raise ConfigError(
                f"{path} does not fit this run's {name!r} (missing {missing[:3]}, unexpected {extra[:3]}); "
                "was it written with another config?"
            )
        module.load_state_dict(own, strict=False)
    if state.ema is not None:
        if saved.ema is None:
            raise ConfigError(f"{path} has no EMA weights but this run uses EMA (optim.ema_decay > 0)")
        state.ema.load_state_dict({k: v.to(device) for k, v in saved.ema.items()})
    for name, obj in state.stateful.items():
        if name not in saved.stateful:
            raise ConfigError(f"{path} has no state for {name!r}; was it written with another config?")
        obj.load_state_dict(saved.stateful[name])
    _set_rng_state(saved.rng, saved.info["rng"])


def load_checkpoint(
    path: Path, state: CheckpointState, device: torch.device, check: Callable[[Path, dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote; returns the contents of ``state.json``.

    Every file is read before anything is applied: a damaged checkpoint raises CorruptCheckpoint
    and leaves the run as it was. ``check(path, info)`` may refuse the checkpoint by its
    ``state.json`` (the config it was written with) before any weight is applied.
    """
    if path.name.endswith(PARTIAL) or not path.is_dir():
        raise ConfigError(f"{path} is not a complete checkpoint folder")
    saved = _read_checkpoint(path, device)
    if check is not None:
        check(path, saved.info)
    _apply(saved, state, path, device)
    return saved.info


def load_latest(
    root: Path, state: CheckpointState, device: torch.device, check: Callable[[Path, dict[str, Any]], None] | None = None
) -> tuple[Path, dict[str, Any]]:
    """Restore the newest checkpoint under ``root`` that reads back whole; returns it and its state.

    Newer ones that do not (a full disk, a power cut before fsync reached the disk, damage since)
    are skipped with one warning that names each and why, rather than ending the run: resuming a
    few hundred steps earlier beats not resuming. Only an unreadable checkpoint is skipped; one
    that does not fit the config still stops the resume (ConfigError), as does one that ``check``
    refuses (see ``load_checkpoint``).
    """
    skipped = []
    for folder in reversed(_checkpoints(root)):
        try:
            saved = _read_checkpoint(folder, device)
        except CorruptCheckpoint as err:
            skipped.append(str(err))
            continue
        if skipped:
            warnings.warn(f"skipped unreadable checkpoint {'; '.join(skipped)}; resuming from {folder.name}",
                          stacklevel=2)  # fmt: skip
        if check is not None:
            check(folder, saved.info)
        _apply(saved, state, folder, device)
        return folder, saved.info
    unreadable = f" (unreadable: {'; '.join(skipped)})" if skipped else ""
    raise ConfigError(f"no complete checkpoint to resume from under {root}{unreadable}")


def _checkpoints(root: Path) -> list[Path]:
    """The published checkpoint folders under ``root``, oldest first (``.partial`` ones are unfinished)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints."""
    for old in _checkpoints(root)[:-keep]:
        shutil.rmtree(old)
