"""The training loop shared by all stages: data, degradation, steps, checkpoints, logs, export.

Reproducibility is built in rather than bolted on: every random draw of a step comes from
generators seeded by (seed, step, process) — the batch (``batches``), its degradation and the
stage's noise and timesteps — so a run resumed from a checkpoint continues exactly as the
uninterrupted run would have, and the checkpoint only needs the weights and optimizer states.
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator, DistributedDataParallelKwargs
from tqdm import tqdm

from .batches import build_step_loader, data_step, derive_seed
from .checkpoint import (
    WRITE_ERRORS,
    CheckpointState,
    WriteFailed,
    load_checkpoint,
    load_latest,
    prune_checkpoints,
    save_checkpoint,
    trained_keys,
    write_failure,
    write_reported,
)
from .config import TrainConfig
from .config_loading import ConfigError, from_dict
from .data import build_val_loader
from .degradations import degrade
from .images import save_grid
from .logbook import Logbook
from .losses import LOSSES, StudentLoss, load_sr_teacher
from .losses.sr_teacher import teacher_dtype
from .stages import NonFiniteLoss, Stage, build_stage

__all__ = ["TrainingAborted", "TrainingInterrupted", "TrainingStopped", "fill_sr_teacher_cache", "step_inputs", "train"]

# Purposes mixed into derive_seed, so the streams of one step never coincide.
_DEGRADE, _STEP, _VALIDATION = 0, 3, 4


class TrainingStopped(RuntimeError):
    """Too many steps in a row had a NaN/inf loss: the run cannot go on as configured."""


class TrainingInterrupted(RuntimeError):
    """Stopped on request (Ctrl-C, SIGTERM) after a checkpoint was written; resume with ``--resume``."""

    def __init__(self, step: int, checkpoint: Path | None, signum: int = signal.SIGINT) -> None:
        name = signal.Signals(signum).name
        if checkpoint is None:
            super().__init__(f"stopped by {name} while setting up, before step {step + 1}; nothing new was written")
        else:
            super().__init__(f"stopped by {name} after step {step}; checkpoint: {checkpoint}")
        self.step, self.checkpoint, self.signum = step, checkpoint, signum


class TrainingAborted(KeyboardInterrupt):
    """A second stop request while the first was being honoured: out at once, without a checkpoint
    of the current step (the last one written stays, and a half-written one is never taken for one).

    A KeyboardInterrupt, so that a host process's ``except Exception`` lets it through as it would
    a plain Ctrl-C.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"aborted by a second {signal.Signals(signum).name}; the last checkpoint written is kept")
        self.signum = signum


# SIGTERM is what schedulers (SLURM, Kubernetes) and `docker stop` send before they kill.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _StopFlag:
    """First Ctrl-C or SIGTERM: finish the step, checkpoint, stop. A second one: abort at once.

    The handlers are installed for the whole run and the previous ones put back afterwards, so a
    process that calls ``train`` keeps its own handling of these signals.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in _STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():  # None: set outside Python, the default is closest
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise TrainingAborted(signum)
        self.signum = signum
        name = signal.Signals(signum).name
        again = "press Ctrl-C again to abort now" if signum == signal.SIGINT else f"a second {name} aborts now"
        tqdm.write(f"{name}: stopping after this step (a checkpoint will be written); {again}", file=sys.stderr)


def _degrade(hr: torch.Tensor, cfg: TrainConfig, seed: int) -> torch.Tensor:
    lr, _ = degrade(hr, cfg.degradation, torch.Generator().manual_seed(seed), cfg.scale)
    return lr


def step_inputs(
    cfg: TrainConfig, start: int, rank: int = 0, world: int = 1, device: torch.device | str = "cpu"
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Endless ``(step, hr, lr)`` from step ``start`` on: the crops of the step and their LR, made
    by the degradation seeded by (seed, step, rank) — or read from the paired LR folders."""
    batches = iter(build_step_loader(cfg.data, cfg.scale, cfg.seed, start, rank, world))
    try:
        step = start
        while True:
            item = next(batches)
            hr = item["hr"].to(device)
            if "lr" in item:
                lr = item["lr"].to(device)
            else:
                lr = _degrade(hr, cfg, derive_seed(cfg.seed, data_step(step, cfg.data.fixed_batches), rank, _DEGRADE))
            yield step, hr, lr
            step += 1
    finally:
        _shutdown_workers(batches)


def _shutdown_workers(batches: Iterator[dict]) -> None:
    """Stop a loader iterator's workers now, the way its garbage collection would.

    Workers ignore SIGTERM (``batches._leave_signals_to_the_loop``), so whatever ends a run must
    stop them through the loader: left to multiprocessing's exit handler, which terminates daemon
    processes with SIGTERM and then joins them, they made every error a hang. A traceback keeps
    the iterator alive past that handler, hence this call instead of relying on ``del``.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's own; absent without workers
    if shutdown is not None:
        shutdown()


def fill_sr_teacher_cache(cfg: TrainConfig, *, progress: bool = True) -> int:
    """Compute the SR teacher's outputs for every fixed batch of a student config, so that
    training (here or elsewhere: the cache is plain files) finds them all; returns how many
    were computed, 0 when the cache was already complete."""
    sc = cfg.student
    if cfg.stage != "student" or not sc.sr_teacher or not sc.sr_teacher_cache:
        raise ConfigError(
            "cache-sr-teacher needs a student config with student.sr_teacher and student.sr_teacher_cache"
        )
    if not cfg.data.fixed_batches:
        raise ConfigError("cache-sr-teacher needs data.fixed_batches > 0: without it every step has new crops")
    if cfg.optim.threads:
        torch.set_num_threads(cfg.optim.threads)
    teacher = load_sr_teacher(sc.sr_teacher, cfg.scale, sc.sr_teacher_cache, dtype=teacher_dtype(sc.sr_teacher_dtype))
    with closing(step_inputs(cfg, 0)) as inputs:
        for _ in tqdm(range(min(cfg.data.fixed_batches, cfg.optim.steps)), disable=not progress, unit="batch"):
            _, _, lr = next(inputs)
            teacher(lr)
    return teacher.computed


def _validation_batches(cfg: TrainConfig) -> list[dict[str, torch.Tensor]]:
    """The validation images (first ``validation.max_images``), with their LR made once, on the CPU."""
    loader = build_val_loader(cfg.data, cfg.scale)
    if loader is None:
        return []
    batches, count = [], 0
    for i, batch in enumerate(loader):
        hr = batch["hr"][: cfg.validation.max_images - count]
        lr = batch["lr"][: len(hr)] if "lr" in batch else _degrade(hr, cfg, derive_seed(cfg.seed, i, _VALIDATION))
        batches.append({"hr": hr, "lr": lr})
        count += len(hr)
        if count >= cfg.validation.max_images:
            break
    return batches


def _resume(
    stage: Stage, state: CheckpointState, cfg: TrainConfig, resume: str, device: torch.device, export_only: bool
) -> tuple[int, int]:
    """Load the checkpoint ``resume`` names; returns its step and its count of bad steps in a row.

    A checkpoint at the last step is accepted: the run then only exports. That finishes a run whose
    final checkpoint was written but whose export failed (a full disk), without training again.
    """
    check = partial(check_resumed_config, cfg)
    if resume == "latest":
        path, info = load_latest(Path(cfg.output_dir) / "checkpoints", state, device, check)
    else:
        path = Path(resume)
        info = load_checkpoint(path, state, device, check)
    if info["step"] > cfg.optim.steps:
        raise ConfigError(f"{path} is at step {info['step']}, past optim.steps = {cfg.optim.steps}")
    if export_only and info["step"] < cfg.optim.steps:
        raise ConfigError(
            f"{path} is at step {info['step']}, before optim.steps = {cfg.optim.steps}: there is no trained model to "
            "export yet; finish the training with --resume"
        )
    return int(info["step"]), int(info.get("bad_steps", 0))


# Settings whose change on resume alters what is trained: the model built, which of its parameters
# exist and train and their shapes, the weights it starts from (frozen parts, an SD UNet under LoRA
# or a VAE decoder that does not train, are not in the checkpoint: they are rebuilt from these), the
# images it learns from (crop, batch), the stage. The weights saved would not fit, or would fit and
# be trained as another model than the exported metadata says (a scale changed half-way). Per stage,
# as each reads its own sections: a student run's dape.lora_rank means nothing.
_FIXED_ALL = ("stage", "backbone", "scale", "data.crop_size", "data.batch_size")
_FIXED = {
    "teacher": (*_FIXED_ALL, "teacher.base", "teacher.vae_steps"),
    "student": (*_FIXED_ALL, "student.teacher", "student.base", "student.init_from", "student.init_student",
                "student.timestep", "student.lora_rank", "student.lora_alpha", "student.train_vae_encoder",
                "student.train_vae_decoder"),
    "dape": (*_FIXED_ALL, "clip.path", "clip.text_path", "clip.config", "dape.lora_rank", "dape.lora_alpha"),
}  # fmt: skip
# Settings that change how the run is carried out, never what it learns: noted, then used.
_HARMLESS = ("name", "output_dir", "optim.steps", "optim.log_every", "optim.threads", "optim.max_bad_steps",
             "data.num_workers", "checkpoint.", "validation.", "data.val_")  # fmt: skip


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"section.key": value}``, lists as JSON stores them (tuples as lists)."""
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: json.loads(json.dumps(value))}


def _owns_model(key: str) -> bool:
    """Whether loss ``key`` trains a model of its own (a discriminator), saved in the checkpoint."""
    loss = LOSSES.get(key)
    return loss is not None and loss.own_model is not StudentLoss.own_model


def _as_loaded(saved: dict[str, Any], path: Path) -> dict[str, Any]:
    """The checkpoint's config with today's defaults filled in, as ``TrainConfig.to_dict`` gives it.

    One that no longer loads (a key since removed, a value now refused) is compared as stored,
    with a warning that says why: its other keys still tell what changed.
    """
    try:
        return from_dict(TrainConfig, saved).to_dict()
    except ConfigError as err:
        warnings.warn(f"{path}'s config does not load in this version ({err}); it is compared as stored",
                      stacklevel=3)  # fmt: skip
        return saved


def check_resumed_config(cfg: TrainConfig, path: Path, info: dict[str, Any]) -> None:
    """Compare the config of a resumed run with the one its checkpoint was written with.

    A change that alters what is trained (``_FIXED``, and any option of a loss that trains a model
    of its own) is refused, naming each key, before a weight is loaded: a different backbone would
    otherwise end in a state-dict error. The harmless ones (``_HARMLESS``: steps, logging, workers,
    checkpoint and validation cadence) are noted; any other change (a learning rate, a loss
    weight) applies from here on and is warned about, one line for all.

    The saved config is read through the config loader first, so a key added since the checkpoint
    was written compares as its default, not as '(unset)'.
    """
    saved, now = _flat(_as_loaded(info.get("config", {}), path)), _flat(cfg.to_dict())
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if not changed:
        return

    def what(key: str) -> str:
        return f"{key} {saved.get(key, '(unset)')!r} -> {now.get(key, '(unset)')!r}"

    fixed = [k for k in changed if k in _FIXED[cfg.stage] or (k.startswith("losses.") and _owns_model(k.split(".")[1]))]
    if fixed:
        raise ConfigError(
            f"{path} was written with another {', '.join(what(k) for k in fixed)}: that changes what is trained, so "
            "it cannot resume from this checkpoint; put the config back, or train into a new output_dir"
        )
    harmless = [k for k in changed if k.startswith(_HARMLESS)]
    if harmless:
        tqdm.write(f"resuming with changed {', '.join(what(k) for k in harmless)}", file=sys.stderr)
    others = [k for k in changed if k not in harmless]
    if others:
        warnings.warn(f"resuming with changed {', '.join(what(k) for k in others)}: these apply from "
                      f"step {info.get('step')} on", stacklevel=2)  # fmt: skip


def _postfix(logs: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3g}" for k, v in logs.items() if k != "lr")


def train(cfg: TrainConfig, resume: str | None = None, *, progress: bool = True, export_only: bool = False) -> Path:
    """Run a stage from ``cfg`` (optionally resuming) and return the path of the exported model.

    A Ctrl-C or SIGTERM anywhere in the run ends it after the current step with a checkpoint
    (TrainingInterrupted); a second one aborts at once (TrainingAborted). Resuming from the last
    step's checkpoint only exports; ``export_only`` refuses any other checkpoint.
    """
    if export_only and not resume:
        raise ConfigError("exporting needs the final checkpoint of a run: 'latest' or a checkpoint folder")
    with _StopFlag() as stop:
        return _train(cfg, resume, progress, stop, export_only)


def _train(cfg: TrainConfig, resume: str | None, progress: bool, stop: _StopFlag, export_only: bool) -> Path:
    out = Path(cfg.output_dir)
    if cfg.optim.threads:
        torch.set_num_threads(cfg.optim.threads)
    acc = Accelerator(
        mixed_precision=cfg.optim.mixed_precision,
        cpu=cfg.optim.cpu,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    rank, world = acc.process_index, acc.num_processes
    torch.manual_seed(derive_seed(cfg.seed, rank))
    np.random.seed(derive_seed(cfg.seed, rank) % 2**32)
    random.seed(derive_seed(cfg.seed, rank))

    stage = build_stage(cfg, acc)
    state = CheckpointState(
        stage.saved_modules, {n: trained_keys(m) for n, m in stage.saved_modules.items()}, stage.stateful(), stage.ema
    )
    val_batches = _validation_batches(cfg)
    start, bad_steps = 0, 0
    if resume:
        start, bad_steps = _resume(stage, state, cfg, resume, acc.device, export_only)
    steps = cfg.optim.steps

    main = acc.is_main_process
    logbook = Logbook(out, enabled=main)
    if main:
        with write_reported(out / "config.yaml", "the run's config"):
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")

    def checkpoint(step: int) -> Path | None:
        acc.wait_for_everyone()
        path = None
        if main:
            path = save_checkpoint(out / "checkpoints", step, state, {"config": cfg.to_dict(), "bad_steps": bad_steps})
            prune_checkpoints(out / "checkpoints", cfg.checkpoint.keep)
        acc.wait_for_everyone()
        return path

    def validate(step: int) -> None:
        if not val_batches:
            return
        metrics, rows = stage.validate(val_batches, step)
        if main:
            logbook.log(step, {f"val/{k}": v for k, v in metrics.items()})
            if rows and cfg.validation.grid_images:
                grid = out / "samples" / f"step-{step:08d}.png"
                with write_reported(grid, "the validation samples"):
                    save_grid(rows[: cfg.validation.grid_images], grid)
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))

    bar = tqdm(total=steps, initial=start, disable=not (main and progress), dynamic_ncols=True, unit="step")
    step = start
    if stop.requested and step < steps:  # asked during set-up (loading weights, resuming): no step is owed
        bar.close()
        raise TrainingInterrupted(start, None, stop.signum or signal.SIGINT)
    # the loader's workers end with the loop, however it ends (#24): a final checkpoint or export
    # that fails then has no worker left to wait for
    with closing(step_inputs(cfg, start, rank, world, acc.device)) as inputs:
        while step < steps:
            _, hr, lr = next(inputs)
            generator = torch.Generator(acc.device).manual_seed(derive_seed(cfg.seed, step, rank, _STEP))
            try:
                with acc.autocast():
                    logs = stage.train_step({"hr": hr, "lr": lr}, step, generator)
                bad_steps = 0
            except NonFiniteLoss as err:
                stage.zero_grad()
                bad_steps += 1
                warnings.warn(f"step {step} skipped: {err} ({bad_steps} in a row)", stacklevel=1)
                if bad_steps >= cfg.optim.max_bad_steps:
                    raise TrainingStopped(
                        f"{bad_steps} steps in a row had a NaN/inf loss (last: {err}); lower optim.lr, "
                        "check the data, or resume from an earlier checkpoint"
                    ) from None
                logs = {}
            step += 1
            bar.update(1)
            if logs:
                bar.set_postfix_str(_postfix(logs), refresh=False)
                if main and (step % cfg.optim.log_every == 0 or step == steps):
                    logbook.log(step, {k: v for k, v in logs.items() if math.isfinite(v)})
            stop_now = bool(acc.gather(torch.tensor([float(stop.requested)], device=acc.device)).sum() > 0)
            if stop_now and step < steps:  # after the last step, finishing is the quickest way out
                bar.close()
                logbook.close()
                raise TrainingInterrupted(step, checkpoint(step), stop.signum or signal.SIGINT)
            if step % cfg.checkpoint.every == 0 and step < steps:
                checkpoint(step)
            if step % cfg.validation.every == 0 or step == steps:
                validate(step)
    bar.close()
    if start < steps:  # else the run resumed from this very checkpoint, to export
        checkpoint(steps)
    logbook.close()
    acc.wait_for_everyone()
    path = _export(stage, out, steps) if main else out / f"{cfg.name}.safetensors"
    acc.wait_for_everyone()
    return path


def _export(stage: Stage, out: Path, step: int) -> Path:
    """``stage.export``, where a failed write is one WriteFailed naming the file and how to retry."""
    target = out / f"{stage.cfg.name}.safetensors"
    try:
        return stage.export(out)
    except WRITE_ERRORS as err:
        raise WriteFailed(
            f"cannot write the model ({write_failure(err, target)}); the checkpoint of step {step} is kept: "
            "the command `export` with the same config writes the model from it"
        ) from None
