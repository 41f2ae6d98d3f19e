"""CPU/GPU time and peak memory of one upscale, as a table.

    python -m bench.speed [--model FILE] [--device cpu] [--sizes 128 512] [--tile 512]

Each size runs in a fresh process so that the peak resident memory is that size's own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _measure(model: str | None, device: str, size: int, scale: int, tile: int | None, repeats: int) -> dict:
    import torch

    from vpdsr import load_pipeline

    pipe = load_pipeline(model, device=device)
    x = torch.rand(1, 3, size, size)
    pipe(x[:, :, :32, :32], scale=scale)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipe(x, scale=scale, tile=tile)
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if pipe.device.type == "cuda" else None
    return {"size": size, "out": size * scale, "tile": tile, "seconds": min(times), "peak_rss_mb": peak_mb, "gpu_mb": gpu_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="student file (default: the embedded default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--tile", type=int, default=512, help="tile size for outputs above 1 megapixel")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        tile = args.tile if (args.one * args.scale) ** 2 > 1024 * 1024 else 0
        print(json.dumps(_measure(args.model, args.device, args.one, args.scale, tile, args.repeats)))
        return
    rows = []
    for size in args.sizes:
        cmd = [sys.executable, "-m", "bench.speed", "--one", str(size), "--device", args.device, "--scale", str(args.scale),
               "--tile", str(args.tile), "--repeats", str(args.repeats)] + (["--model", args.model] if args.model else [])  # fmt: skip
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]))
    print("| input | output | tile | seconds | peak RSS (MB) | peak GPU (MB) |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        gpu = f"{r['gpu_mb']:.0f}" if r["gpu_mb"] is not None else "-"
        print(f"| {r['size']}² | {r['out']}² | {r['tile'] or 'none'} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | {gpu} |")


if __name__ == "__main__":
    main()
