"""The trainer under faults: damaged checkpoints, SIGTERM, a second interrupt (issue #13).

Runs are a few steps of the tiny teacher (no teacher file needed), set up as in test_trainer.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests import test_trainer
from tests.test_trainer import REPO, TEACHER, common
from trainer import checkpoint as checkpoint_module
from trainer import cli, loop
from trainer.checkpoint import CheckpointState, CorruptCheckpoint, load_checkpoint, save_checkpoint, trained_keys
from trainer.config import ConfigError, load_config
from trainer.loop import TrainingAborted, check_resumed_config, train
from trainer.stages.teacher import TeacherStage

# test_trainer's fixtures, found by pytest under these names: its training photos, and one thread
images, _one_thread = test_trainer.images, test_trainer._one_thread


def _teacher(images: Path, out: Path, *overrides: str) -> list[str]:
    """The tiny teacher's overrides: two VAE steps, then the UNet; every checkpoint kept."""
    return common(images, out) + ["teacher.vae_steps=2", "checkpoint.keep=10", *overrides]


def _toy_state() -> CheckpointState:
    """A Linear and its optimizer: enough for the checkpoint files, without building a model."""
    layer = nn.Linear(3, 2)
    opt = torch.optim.Adam(layer.parameters())
    layer(torch.ones(1, 3)).sum().backward()
    opt.step()
    return CheckpointState({"m": layer}, {"m": trained_keys(layer)}, {"opt": opt})


# ----------------------------------------------------------------------------- damaged checkpoints


def test_resume_latest_falls_back_past_corrupt_checkpoints(images, tmp_path):
    """Checkpoints 1-3, then the run dies before the last; 3 has its weights cut short and 2 an empty
    optim.pt (and, as written before sizes were recorded, no sizes: the reader itself finds it).
    The resume warns once naming both, goes on from 1 and ends where the uninterrupted run did."""
    out = tmp_path / "run"
    cfg = load_config(TEACHER, _teacher(images, out, "optim.steps=4", "checkpoint.every=1"))
    expected = load_file(train(cfg, progress=False))
    ckpts = out / "checkpoints"
    (ckpts / "step-00000004").rename(tmp_path / "lost")  # as if killed before the final checkpoint
    weights = ckpts / "step-00000003" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (ckpts / "step-00000002" / "optim.pt").write_bytes(b"")
    state = ckpts / "step-00000002" / "state.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "files"}))

    skipped = (r"skipped unreadable checkpoint step-00000003: weights.safetensors is 1000 bytes, \d+ were written; "
               r"step-00000002: optim.pt is unreadable \(.+\); resuming from step-00000001$")  # fmt: skip
    with pytest.warns(UserWarning, match=skipped) as caught:
        got = load_file(train(cfg, resume="latest", progress=False))
    assert len([w for w in caught if "checkpoint" in str(w.message)]) == 1
    assert got.keys() == expected.keys()
    assert not [k for k in expected if not torch.equal(got[k], expected[k])]
    assert weights.stat().st_size == (tmp_path / "lost" / "weights.safetensors").stat().st_size  # rewritten whole


def test_no_complete_checkpoint_is_one_clear_error(images, tmp_path, capsys):
    out = tmp_path / "run"
    for step in (1, 2):
        save_checkpoint(out / "checkpoints", step, _toy_state(), {"config": {"stage": "teacher"}})
    (out / "checkpoints" / "step-00000002" / "state.json").write_text("")
    (out / "checkpoints" / "step-00000001" / "rng.safetensors").unlink()
    assert cli.main(["--config", str(TEACHER), "--resume", "latest", "--no-progress", *_teacher(images, out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "error: no complete checkpoint to resume from under" in err
    assert "step-00000002: state.json is unreadable" in err and "step-00000001: rng.safetensors is missing" in err


def test_a_named_corrupt_checkpoint_is_refused_before_anything_is_applied(tmp_path):
    saved = save_checkpoint(tmp_path, 1, _toy_state(), {})
    weights = saved / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-3])
    target = _toy_state()
    before = {k: v.clone() for k, v in target.modules["m"].state_dict().items()}
    with pytest.raises(CorruptCheckpoint, match=r"step-00000001: weights.safetensors is \d+ bytes, \d+ were written"):
        load_checkpoint(saved, target, torch.device("cpu"))
    assert all(torch.equal(v, before[k]) for k, v in target.modules["m"].state_dict().items())
    (saved / "state.json").unlink()
    with pytest.raises(ConfigError, match="state.json is missing"):
        load_checkpoint(saved, target, torch.device("cpu"))


def test_checkpoint_files_and_folders_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    fsync, replace = checkpoint_module._fsync, os.replace

    def recorded_fsync(path: Path) -> None:
        events.append(("fsync", path.name))
        fsync(path)

    def recorded_replace(src: os.PathLike, dst: os.PathLike) -> None:
        events.append(("replace", Path(src).name))
        replace(src, dst)

    monkeypatch.setattr(checkpoint_module, "_fsync", recorded_fsync)
    monkeypatch.setattr(checkpoint_module.os, "replace", recorded_replace)
    final = save_checkpoint(tmp_path / "checkpoints", 5, _toy_state(), {})
    renamed = events.index(("replace", "step-00000005.partial"))
    before = {name for kind, name in events[:renamed] if kind == "fsync"}
    assert {p.name for p in final.iterdir()} | {"step-00000005.partial"} == before
    assert events[renamed + 1 :] == [("fsync", "checkpoints")]


# ----------------------------------------------------------------------------- signals


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGTERM delivery are POSIX")
def test_sigterm_finishes_the_step_and_leaves_a_resumable_checkpoint(images, tmp_path):
    """SIGTERM to the whole process group, as SLURM sends it (a loader worker gets it too)."""
    out = tmp_path / "run"
    command = [sys.executable, str(REPO / "trainer" / "run.py"), "--config", str(TEACHER), "--no-progress",
               *_teacher(images, out, "optim.steps=100000", "data.num_workers=1", "optim.threads=1")]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        log = out / "log.csv"
        while proc.poll() is None and not (log.is_file() and len(log.read_text().splitlines()) > 1):
            time.sleep(0.2)  # until the first step is logged
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM after step ") and last.endswith("; continue with: --resume latest")
    step = int(last.split("after step ")[1].split(";")[0])
    assert (out / "checkpoints" / f"step-{step:08d}").is_dir()
    cfg = load_config(TEACHER, _teacher(images, out, f"optim.steps={step + 1}"))
    assert train(cfg, resume="latest", progress=False).is_file()
    assert f"{step + 1},loss," in (out / "log.csv").read_text()


def test_a_second_interrupt_exits_at_once_with_one_line_and_restores_the_handlers(images, tmp_path, capsys,
                                                                                   monkeypatch):
    original = TeacherStage.train_step

    def interrupted_twice(self, batch, step, generator):
        if step == 1:
            signal.raise_signal(signal.SIGTERM)  # handled at once: the step is to finish...
            signal.raise_signal(signal.SIGINT)  # ...but the user insists
        return original(self, batch, step, generator)

    monkeypatch.setattr(TeacherStage, "train_step", interrupted_twice)
    own = lambda signum, frame: None  # noqa: E731  (the embedding process's own handler)
    previous_term = signal.signal(signal.SIGTERM, own)
    previous_int = signal.getsignal(signal.SIGINT)  # Python's own, or SIG_IGN under nohup / `cmd &`
    try:
        out = tmp_path / "run"
        assert cli.main(["--config", str(TEACHER), "--no-progress", *_teacher(images, out, "optim.steps=5")]) == 130
        assert signal.getsignal(signal.SIGTERM) is own and signal.getsignal(signal.SIGINT) is previous_int
    finally:
        signal.signal(signal.SIGTERM, previous_term)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "SIGTERM: stopping after this step (a checkpoint will be written); a second SIGTERM aborts now",
        "aborted by a second SIGINT; the last checkpoint written is kept",
    ]
    assert not (out / "checkpoints").exists()
    assert issubclass(TrainingAborted, KeyboardInterrupt)  # what a host's `except Exception` lets through


# ----------------------------------------------------------------------------- write faults (#24)

# The trainer's command line with the second checkpoint's weights failing to write as on a full disk.
_FULL_DISK_ON_SECOND_CHECKPOINT = """
import errno, os, sys
from trainer import checkpoint, cli
real, calls = checkpoint.save_file, []
def save_file(tensors, path, *args, **kwargs):
    if path.endswith("weights.safetensors"):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return real(tensors, path, *args, **kwargs)
checkpoint.save_file = save_file
sys.exit(cli.main(sys.argv[1:]))
"""


def _reported(stderr: str) -> bool:
    """Whether the run has reported its error: our one line, or (before #24) a traceback's last."""
    return "error:" in stderr or "Error:" in stderr


def _live_in_group(pgid: int) -> list[int]:
    """The processes of group ``pgid`` that still run. Zombies do not count: where PID 1 reaps no
    orphans (some containers), a worker that ended stays one, and os.killpg(pgid, 0) still finds it."""
    proc = Path("/proc")
    if not proc.is_dir():  # no /proc (macOS): the group's existence, which launchd keeps honest
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    live = []
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp
        except OSError:  # ended while listed
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


@pytest.mark.skipif(sys.platform == "win32", reason="loader workers start by fork on POSIX only")
def test_a_failed_checkpoint_write_with_loader_workers_ends_the_run_in_one_line(images, tmp_path):
    """Workers ignore SIGTERM (so a scheduler's SIGTERM lets the step finish), and multiprocessing's
    exit handler terminated them and waited forever: any error hung the run once workers existed."""
    out = tmp_path / "run"
    command = [sys.executable, "-c", _FULL_DISK_ON_SECOND_CHECKPOINT, "--config", str(TEACHER), "--no-progress",
               *_teacher(images, out, "optim.steps=6", "checkpoint.every=1", "data.num_workers=2", "optim.threads=1")]  # fmt: skip
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        deadline = time.monotonic() + 600  # set-up on a busy machine; the hang lasted forever
        while proc.poll() is None and not _reported(log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.wait(timeout=30)  # once the error is reported, the run, workers included, is over within seconds
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run hung after reporting the failed checkpoint write: {log.read_text()[-500:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the workers too
            proc.wait()
    err = log.read_text()
    assert proc.returncode == 1, err
    deadline = time.monotonic() + 10  # the loader workers end with the run, not some time later
    while _live_in_group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _live_in_group(proc.pid), "loader workers outlived the run"
    assert "Traceback" not in err
    partial = out / "checkpoints" / "step-00000002.partial"
    assert err.strip().splitlines()[-1] == (
        f"error: cannot write the checkpoint of step 2 ({partial / 'weights.safetensors'}: "
        f"{os.strerror(errno.ENOSPC)}); the last one written is kept"
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]  # nothing half-written
    cfg = load_config(TEACHER, _teacher(images, out, "optim.steps=3"))
    assert train(cfg, resume="latest", progress=False).is_file()  # the last good one resumes


def test_a_failed_export_is_finished_from_the_final_checkpoint(images, tmp_path, capsys, monkeypatch):
    """The final checkpoint was written, the export was not: `--resume latest` refused ("step 3 is not
    before optim.steps = 3"), so the trained model could not be had without training again."""
    expected = load_file(train(load_config(TEACHER, _teacher(images, tmp_path / "clean", "optim.steps=3")),
                               progress=False))  # fmt: skip
    out = tmp_path / "run"
    args = ["--config", str(TEACHER), "--no-progress", *_teacher(images, out, "optim.steps=3")]
    real_export = TeacherStage.export

    def disk_full(self: TeacherStage, out_dir: Path) -> Path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out_dir / "tiny-teacher.safetensors.tmp"))

    monkeypatch.setattr(TeacherStage, "export", disk_full)
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"error: cannot write the model ({out / 'tiny-teacher.safetensors.tmp'}: {os.strerror(errno.ENOSPC)}); "
        "the checkpoint of step 3 is kept: the command `export` with the same config writes the model from it"
    )
    monkeypatch.setattr(TeacherStage, "export", real_export)
    assert cli.main(["export", "--resume", "latest", *args]) == 0  # or `export` alone: latest is its default
    got = load_file(out / "tiny-teacher.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003"]  # not trained again


def test_export_refuses_a_checkpoint_before_the_last_step(images, tmp_path, capsys):
    out = tmp_path / "run"
    train(load_config(TEACHER, _teacher(images, out, "optim.steps=3", "checkpoint.every=1")), progress=False)
    checkpoint = out / "checkpoints" / "step-00000002"
    assert cli.main(["export", "--resume", str(checkpoint), "--config", str(TEACHER), "--no-progress",
                     *_teacher(images, out, "optim.steps=3", "checkpoint.every=1")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is at step 2, before optim.steps = 3: there is no trained model to export" in err



class _Broken:
    """An optimizer-like state whose state_dict fails as a bug or an out-of-memory would."""

    def state_dict(self) -> dict:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_an_error_that_is_no_write_failure_is_not_reported_as_one(tmp_path):
    """Every RuntimeError counted as a failed write: an out-of-memory or a bug in state_dict() or the
    export printed 'cannot write the checkpoint' with its traceback hidden."""
    state = _toy_state()
    state.stateful["broken"] = _Broken()
    with pytest.raises(RuntimeError, match="CUDA out of memory") as raised:
        save_checkpoint(tmp_path, 1, state, {})
    assert type(raised.value) is RuntimeError and list(tmp_path.iterdir()) == []  # no partial folder left

    class Stage:
        cfg = load_config(None, ["stage=teacher"])

        def export(self, out_dir: Path) -> Path:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(RuntimeError, match="CUDA out of memory") as raised:
        loop._export(Stage(), tmp_path, 3)
    assert type(raised.value) is RuntimeError


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device that is always full")
@pytest.mark.parametrize("size", [10, 10**6])  # buffered until the close, and written at once
def test_torch_save_on_a_full_disk_raises_the_os_error(size):
    """torch.save words a full disk as a RuntimeError of its own ("unexpected pos 704 vs 598")."""
    with pytest.raises(OSError) as raised:
        checkpoint_module._torch_save({"a": torch.zeros(size)}, Path("/dev/full"))
    assert raised.value.errno == errno.ENOSPC



def _config_yaml_is_a_folder(out: Path) -> tuple[Path, str]:
    (out / "config.yaml").mkdir(parents=True)
    return out / "config.yaml", "the run's config"


def _log_csv_is_on_a_full_disk(out: Path) -> tuple[Path, str]:
    out.mkdir(parents=True)
    (out / "log.csv").symlink_to("/dev/full")  # opens, and every write fails with ENOSPC
    return out / "log.csv", "the training log"


def _samples_is_a_file(out: Path) -> tuple[Path, str]:
    out.mkdir(parents=True)
    (out / "samples").write_bytes(b"")
    return out / "samples", "the validation samples"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device that is always full")
@pytest.mark.parametrize("fault", [_config_yaml_is_a_folder, _log_csv_is_on_a_full_disk, _samples_is_a_file])
def test_a_failed_write_of_the_config_log_or_samples_is_one_line(images, tmp_path, capsys, fault):
    """config.yaml, log.csv, TensorBoard's files and the sample grids ended a run on a full disk with
    a traceback; they are one line naming the file and the cause, as a failed checkpoint is."""
    out = tmp_path / "run"
    path, what = fault(out)
    args = ["--config", str(TEACHER), "--no-progress", *_teacher(images, out, "optim.steps=3")]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: cannot write {what} ({path}: "), err


# ----------------------------------------------------------------------------- resume with a changed config (#24)


@pytest.fixture(scope="module")
def two_steps(images, tmp_path_factory) -> Path:
    """A tiny teacher run's output folder with the checkpoint of step 3 (of 6, as if interrupted)."""
    out = tmp_path_factory.mktemp("changed") / "run"
    train(load_config(TEACHER, _teacher(images, out, "optim.steps=3")), progress=False)
    return out


@pytest.mark.parametrize(
    ("override", "named"),
    [("backbone=tiny-v2", "backbone 'tiny' -> 'tiny-v2'"), ("scale=2", "scale 4 -> 2"),
     ("data.crop_size=48", "data.crop_size 32 -> 48"), ("data.batch_size=3", "data.batch_size 2 -> 3")],
)  # fmt: skip
def test_a_resume_that_changes_what_is_trained_is_refused_by_name(images, two_steps, tmp_path, capsys, override,
                                                                  named):  # fmt: skip
    """A different backbone ended in load_state_dict's traceback; a changed scale, crop or batch resumed
    silently, and the exported metadata then claimed a scale that was only partly trained."""
    run = tmp_path / "run"
    shutil.copytree(two_steps, run)
    args = ["--config", str(TEACHER), "--resume", "latest", "--no-progress",
            *_teacher(images, run, "optim.steps=6", override)]  # fmt: skip
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"was written with another {named}: that changes what is trained" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003"]  # nothing trained


def test_a_resume_with_harmless_changes_notes_each_and_goes_on(images, two_steps, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_steps, run)
    args = ["--config", str(TEACHER), "--resume", "latest", "--no-progress",
            *_teacher(images, run, "optim.steps=4", "data.num_workers=1", "optim.lr=0.0003")]  # fmt: skip
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "resuming with changed data.num_workers 0 -> 1, optim.steps 3 -> 4" in err
    assert "warning: resuming with changed optim.lr 0.0002 -> 0.0003: these apply from step 3 on" in err
    assert (run / "checkpoints" / "step-00000004").is_dir()


@pytest.mark.parametrize(
    ("stage", "override", "named"),
    [("student", "student.lora_rank=4", "student.lora_rank 0 -> 4"),
     ("student", "student.train_vae_decoder=true", "student.train_vae_decoder False -> True"),
     ("student", "student.init_from=base", "student.init_from 'teacher' -> 'base'"),
     ("student", "student.timestep=500", "student.timestep 999 -> 500"),
     ("dape", "dape.lora_rank=4", "dape.lora_rank 8 -> 4"),
     ("teacher", "teacher.base=sd", "teacher.base None -> 'sd'")],
)  # fmt: skip
def test_a_resume_that_changes_the_trained_parameters_is_refused(stage, override, named):
    """LoRA ranks, the trained VAE parts, the initial weights and the timestep only warned: they
    change which parameters exist, their shapes, or the frozen weights rebuilt around them."""
    saved = load_config(None, [f"stage={stage}"]).to_dict()
    with pytest.raises(ConfigError, match=f"was written with another {named}: that changes what is trained"):
        check_resumed_config(load_config(None, [f"stage={stage}", override]), Path("ckpt"), {"config": saved})


def test_a_key_added_since_the_checkpoint_compares_as_its_default(recwarn):
    """The saved config was compared as stored: a key added to TrainConfig since showed as '(unset)'
    and, among the fixed ones, would have refused every older checkpoint."""
    saved = load_config(None, ["stage=student"]).to_dict()
    del saved["student"]["lora_rank"], saved["student"]["sr_teacher_dtype"], saved["data"]["crop_size"]
    check_resumed_config(load_config(None, ["stage=student"]), Path("ckpt"), {"config": saved, "step": 3})
    assert not recwarn.list


def test_two_runs_sharing_the_sr_teacher_cache_write_their_own_temporary_files(tmp_path, monkeypatch):
    """One fixed ``{key}.safetensors.tmp`` per entry: a run storing the crop another run was storing
    renamed that run's file away, and the other's rename failed with FileNotFoundError."""
    from trainer.losses import sr_teacher

    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Upsample(scale_factor=2))
    first, second = sr_teacher.SRTeacher(model, 2, tmp_path), sr_teacher.SRTeacher(model, 2, tmp_path)
    lr, real_save, nested = torch.rand(1, 3, 4, 4), sr_teacher.save_file, []

    def other_run_meanwhile(tensors: dict[str, torch.Tensor], filename: Path) -> None:
        real_save(tensors, filename)
        if not nested:  # while the first run holds its temporary file, the second computes the same crop
            nested.append(filename)
            second(lr)

    monkeypatch.setattr(sr_teacher, "save_file", other_run_meanwhile)
    assert torch.equal(first(lr), second(lr))
    assert [p.suffix for p in tmp_path.iterdir()] == [".safetensors"] and first.computed == second.computed == 1
