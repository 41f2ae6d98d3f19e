"""GPU latency of the one-step student on SD-sized backbones with random weights, as a table.

    python -m bench.gpu                                   # sd21-base, 512 and 1024 px, fp16 and bf16
    python -m bench.gpu --backbone tiny-v2 --sizes 64 --dtypes fp32 --variants eager   # CPU smoke run

Nothing is downloaded: the backbone is built from its bundled config with random weights, which
time exactly as trained ones do. For each output size, dtype and variant (eager, channels_last,
torch.compile, both) it prints:
- the median latency of one full upscale (VAE encode, one UNet call, VAE decode) of an input
  already at output size, timed with CUDA events after warm-up (wall clock on the CPU);
- the same backbone run as a 50-step sampler (encode, 50 UNet calls, decode) in the same run, and
  the ratio, which is what one-step distillation buys;
- FLOPs of one upscale counted by ``torch.utils.flop_counter`` and the achieved TFLOP/s, over the
  device's dense peak for that dtype where it is known (``--peak-tflops`` to give it);
- peak accelerator memory (``torch.cuda.max_memory_allocated``), or the process's peak RSS on CPU.
Published one-step latencies to compare with (A100, 512 px): AdcSR 0.03 s, PiSA-SR 0.09 s,
OSEDiff 0.35 s.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from vpdsr.backbones import build_backbone
from vpdsr.model import OneStepStudent

VARIANTS = ("eager", "channels_last", "compile", "compile+channels_last")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Dense tensor-core peaks in TFLOP/s (vendor data sheets, SXM parts), by a substring of the device name.
PEAKS = {"H200": {"fp16": 989.0, "bf16": 989.0}, "H100": {"fp16": 989.0, "bf16": 989.0},
         "A100": {"fp16": 312.0, "bf16": 312.0}, "L40S": {"fp16": 362.0, "bf16": 362.0},
         "4090": {"fp16": 165.0, "bf16": 165.0}}  # fmt: skip


def build_student(backbone: str, device: torch.device, dtype: torch.dtype, variant: str) -> OneStepStudent:
    parts = build_backbone(backbone, device=device)
    student = OneStepStudent(parts.vae, parts.unet, parts.config).to(device=device, dtype=dtype).eval()
    if "channels_last" in variant:
        student = student.to(memory_format=torch.channels_last)
    if variant.startswith("compile"):
        student.vae.encoder = torch.compile(student.vae.encoder)
        student.vae.decoder = torch.compile(student.vae.decoder)
        student.unet = torch.compile(student.unet)
    return student


def multistep(student: OneStepStudent, x: torch.Tensor, steps: int) -> torch.Tensor:
    """An SD-style sampler's cost: one encode, ``steps`` UNet calls, one decode (the scheduler's
    arithmetic between calls is negligible next to them and left out)."""
    z = student.encode(x)
    for _ in range(steps):
        z = student.denoise(z)
    return student.decode(z)


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_tflops(device: torch.device, dtype: str, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p.get(dtype) for key, p in PEAKS.items() if key in name), None)


def measure(args: argparse.Namespace, device: torch.device, size: int, dtype: str, variant: str) -> dict:
    student = build_student(args.backbone, device, DTYPES[dtype], variant)
    x = torch.rand(1, 3, size, size, device=device, dtype=DTYPES[dtype]) * 2 - 1
    if "channels_last" in variant:
        x = x.contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        one = median_seconds(lambda: student(x), device, args.warmup, args.repeats)
        many = median_seconds(lambda: multistep(student, x, args.steps), device, min(args.warmup, 1),
                              max(1, args.repeats // 4))  # fmt: skip
        counter = FlopCounterMode(display=False)
        with counter:
            student(x)
    flops = counter.get_total_flops()
    peak = peak_tflops(device, dtype, args.peak_tflops)
    achieved = flops / one / 1e12
    memory = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # fmt: skip
    return {"size": size, "dtype": dtype, "variant": variant, "one_step_ms": one * 1000, "multi_ms": many * 1000,
            "ratio": many / one, "gflop": flops / 1e9, "tflops": achieved,
            "of_peak": None if peak is None else achieved / peak, "peak_gib": memory / 2**30}  # fmt: skip


def table(rows: list[dict], steps: int, memory_kind: str) -> str:
    head = (f"| output | dtype | variant | 1 step (ms) | {steps} steps (ms) | ratio | GFLOP | TFLOP/s | of peak "
            f"| {memory_kind} (GiB) |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        share = "n/a" if r["of_peak"] is None else f"{100 * r['of_peak']:.1f}%"
        lines.append(f"| {r['size']}² | {r['dtype']} | {r['variant']} | {r['one_step_ms']:.1f} | {r['multi_ms']:.1f} "
                     f"| {r['ratio']:.1f}x | {r['gflop']:.3g} | {r['tflops']:.3g} | {share} | {r['peak_gib']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="sd21-base", help="bundled backbone config (default sd21-base)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="output sizes in pixels")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=50, help="steps of the multi-step comparison (default 50)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs; the median is shown")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak for the dtype")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench.gpu: --device cuda, but this torch build sees no CUDA GPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = []
    for size in args.sizes:
        for dtype in args.dtypes:
            for variant in args.variants:
                try:
                    rows.append(measure(args, device, size, dtype, variant))
                except torch.OutOfMemoryError:
                    print(f"bench.gpu: {size}² {dtype} {variant}: out of memory", file=sys.stderr)
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                print(f"  done {size}² {dtype} {variant}", file=sys.stderr, flush=True)
    print(f"{args.backbone}, random weights, on {name}, torch {torch.__version__}\n")
    print(table(rows, args.steps, "peak memory" if device.type == "cuda" else "peak RSS"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
