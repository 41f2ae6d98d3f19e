"""Images per second of the full degradation pipeline (trainer.degradations.degrade).

    python -m bench.degradation_throughput                      # CPU, 256 px, batch 8 (from the repo root)
    python -m bench.degradation_throughput --device cuda --batch 32 --size 512

Prints one table row per stage of the pipeline as well as the whole, so a slow op shows itself.
Each row times ``--repeats`` runs after one warm-up run, with freshly sampled parameters.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from trainer.degradations import (
    DegradationConfig,
    add_gaussian_noise,
    add_poisson_noise,
    apply_blur,
    apply_jpeg,
    apply_resize,
    degrade,
    make_kernels,
    sample_kernels,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _seconds_per_call(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="HR side in pixels")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    cfg = DegradationConfig()
    b, s = args.batch, args.size
    generator = torch.Generator().manual_seed(0)
    hr = torch.rand(b, 3, s, s, device=device)
    kernels = make_kernels(sample_kernels(cfg.stage1.kernel, b, generator), device=device)
    ones, gray = torch.ones(b, device=device), torch.zeros(b, dtype=torch.bool, device=device)
    noise_gen = torch.Generator(device=device).manual_seed(0)

    rows = [
        (
            "sample + build kernels",
            lambda: make_kernels(sample_kernels(cfg.stage1.kernel, b, generator), device=device),
        ),
        ("blur 21x21 per image", lambda: apply_blur(hr, kernels)),
        ("resize bicubic x0.5", lambda: apply_resize(hr, (s // 2, s // 2), "bicubic")),
        ("gaussian noise", lambda: add_gaussian_noise(hr, ones * 0.05, gray, noise_gen)),
        ("poisson noise", lambda: add_poisson_noise(hr, ones, gray, noise_gen)),
        ("jpeg (kornia)", lambda: apply_jpeg(hr, ones * 50)),
        ("full degrade", lambda: degrade(hr, cfg, generator, args.scale)),
    ]
    threads = f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else ""
    print(f"device {device}{threads}, batch {b} x 3 x {s} x {s}, scale {args.scale}, {args.repeats} repeats")
    print(f"{'op (at HR size)':<26}{'ms/batch':>10}{'images/s':>10}")
    for name, fn in rows:
        sec = _seconds_per_call(fn, device, args.repeats)
        print(f"{name:<26}{sec * 1e3:>10.1f}{b / sec:>10.1f}")


if __name__ == "__main__":
    main()
