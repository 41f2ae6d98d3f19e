"""Seconds per training step of the committed tiny configs, to plan CPU (or GPU) training runs.

    python -m bench.trainer_step_time --data photos [--batch 4 --crop 128 --threads 2]   # photos: a folder of yours

Times whole steps as the loop runs them (next batch, degradation, forward, backward, optimizer
steps) for the teacher's VAE phase, its UNet phase and the student with tiny-student.yaml's
losses, after one warm-up step. Without ``--teacher`` the student is timed against a randomly
initialised teacher file, which costs the same.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from trainer.batches import build_step_loader, derive_seed
from trainer.config import load_config
from trainer.degradations import degrade
from trainer.stages import build_stage

CONFIGS = Path(__file__).resolve().parent.parent / "trainer" / "configs"


def time_steps(config: str, overrides: list[str], first_step: int, steps: int) -> list[float]:
    cfg = load_config(CONFIGS / config, overrides)
    stage = build_stage(cfg, Accelerator(cpu=cfg.optim.cpu))
    batches = iter(build_step_loader(cfg.data, cfg.scale, cfg.seed, first_step))
    times = []
    for step in range(first_step, first_step + steps + 1):
        start = time.perf_counter()
        hr = next(batches)["hr"]
        lr, _ = degrade(hr, cfg.degradation, torch.Generator().manual_seed(derive_seed(0, step)), cfg.scale)
        stage.train_step({"hr": hr, "lr": lr}, step, torch.Generator().manual_seed(step))
        times.append(time.perf_counter() - start)
    return times[1:]  # the first step pays for allocations and lazy initialisation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder of HR training images")
    parser.add_argument("--teacher", help="teacher file for the student (default: a random one)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--workers", type=int, default=1, help="data-loader worker processes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = [f"data.hr_dirs=[{args.data}]", f"data.crop_size={args.crop}", f"data.batch_size={args.batch}",
            f"data.num_workers={args.workers}", "optim.cpu=true"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        teacher = args.teacher
        if teacher is None:
            cfg = load_config(CONFIGS / "tiny-teacher.yaml", data + [f"output_dir={tmp}"])
            teacher = str(build_stage(cfg, Accelerator(cpu=True)).export(Path(tmp)))
        runs = {
            "teacher, VAE phase": ("tiny-teacher.yaml", data, 0),
            "teacher, UNet phase": ("tiny-teacher.yaml", data, 10_000),
            "student (tiny-student.yaml losses, GAN on)": (
                "tiny-student.yaml", data + [f"student.teacher={teacher}", "losses.adversarial.start_step=0"], 0),
        }  # fmt: skip
        print(f"batch {args.batch} x {args.crop}px, {torch.get_num_threads()} threads, {args.workers} loader workers")
        for label, (config, overrides, first) in runs.items():
            if first:  # any step past teacher.vae_steps is in the UNet phase
                overrides = overrides + ["optim.steps=20000"]
            times = time_steps(config, overrides, first, args.steps)
            print(
                f"{label:45s} median {statistics.median(times):6.2f} s/step"
                f"  (min {min(times):.2f}, max {max(times):.2f})"
            )


if __name__ == "__main__":
    main()
