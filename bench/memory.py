"""Peak memory against output size, tiled and untiled, each measured in a fresh process.

    python -m bench.memory                       # 512, 1024, 2048 and 4096 px output, the default model
    python -m bench.memory --sizes 64 128        # a quick run

For each square output size the model (the embedded default, or ``--model``) upscales an input at
its own scale through ``VPDPipeline.__call__``, colour fix included, once with ``--tile`` px tiles
and once untiled, each in a new Python process so that one run's allocations cannot hide in
another's peak. Each row gives:
- the process's peak RSS, and that peak above the RSS with the model loaded;
- on CUDA, ``torch.cuda.max_memory_allocated``: the accelerator's part, which tiling bounds;
- the largest tensor moved to the compute device in one piece (``vpdsr.layerwise._to_device``):
  one tile's layer input with its halo, the part that depends on the tile and not on the image,
  so it must stay flat down the tiled rows. On the CPU host and device are one RAM: the
  whole-image activations that wait between layers grow with the image there, tiled or not.
Untiled runs are left out once the growth measured so far says they would not fit; the size at
which untiled runs out is extrapolated from that growth (a straight line through the untiled
peaks against output pixels), and the output says it is an estimate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

MB = 1e6
# Extrapolations stop short of the whole memory: the OS and other processes hold some of it.
FIT_MARGIN = 0.8


@dataclass(frozen=True)
class Spec:
    """One measurement, as passed to the child process."""

    size: int  # output side in pixels
    tile: int  # 0: untiled
    model: str | None
    device: str


def _rss_now() -> float:
    """Resident memory of this process in bytes (Linux); the peak so far elsewhere."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return _rss_peak()


def _rss_peak() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere


def measure(spec: Spec) -> dict:
    """Run one upscale in this process and report its memory; meant for a fresh child process."""
    import torch

    from vpdsr import layerwise, load_pipeline

    pipe = load_pipeline(spec.model, device=spec.device, dtype="fp32" if spec.device == "cpu" else "auto")
    scale = float(pipe.meta.scale)
    side = max(1, round(spec.size / scale))
    image = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    largest = 0
    moved = layerwise._to_device

    def counting(t: torch.Tensor, device: torch.device) -> torch.Tensor:
        nonlocal largest
        largest = max(largest, t.numel() * t.element_size())
        return moved(t, device)

    layerwise._to_device = counting
    cuda = pipe.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _rss_now()
    start = time.perf_counter()
    out = pipe(image, tile=spec.tile)
    if cuda:
        torch.cuda.synchronize()
    return {
        "spec": asdict(spec), "input": side, "output": list(out.shape[2:]), "seconds": time.perf_counter() - start,
        "peak_rss": _rss_peak(), "base_rss": base, "largest_move": largest,
        "cuda_peak": torch.cuda.max_memory_allocated() if cuda else None,
        "cuda_total": torch.cuda.get_device_properties(pipe.device).total_memory if cuda else None,
    }  # fmt: skip


def run_child(spec: Spec) -> dict:
    """``measure`` in a new interpreter: its peak RSS is this measurement's alone."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "bench.memory", "--child", json.dumps(asdict(spec))],
                          capture_output=True, text=True, env=env)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"the measurement {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_memory() -> float:
    """Physical RAM in bytes."""
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares ``(intercept, slope)`` of peak bytes against output megapixels; None below two sizes."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - slope * mx, slope


def _peak(result: dict) -> float:
    """What an untiled run fills: device memory on CUDA, RSS elsewhere."""
    return result["cuda_peak"] if result["cuda_peak"] is not None else result["peak_rss"]


def _row(result: dict) -> str:
    spec, out = result["spec"], result["output"]
    tile = f"{spec['tile']} px" if spec["tile"] else "untiled"
    move = f"{result['largest_move'] / MB:.3g}" if result["largest_move"] else "-"
    cuda = f"{result['cuda_peak'] / MB:.0f}" if result["cuda_peak"] is not None else "-"
    above = (result["peak_rss"] - result["base_rss"]) / MB
    return (f"| {out[1]}x{out[0]} | {result['input']}² | {tile} | {result['peak_rss'] / MB:.0f} | {above:.0f} | "
            f"{move} | {cuda} | {result['seconds']:.1f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="output sides in px")
    parser.add_argument("--tile", type=int, default=256, help="tile size of the tiled runs, output px (default 256)")
    parser.add_argument("--model", default=None, help="student file (default: the embedded default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(Spec(**json.loads(args.child)))))
        return 0
    print("| output | input | tiles | peak RSS MB | above model MB | largest tile moved MB | CUDA peak MB | s |")
    print("|---|---|---|---|---|---|---|---|")
    untiled: list[tuple[float, float]] = []
    limit = None
    for size in sorted(args.sizes):
        print(_row(run_child(Spec(size, args.tile, args.model, args.device))), flush=True)
        fit = fit_line(untiled)
        if limit is not None and fit is not None and fit[0] + fit[1] * (size / 1e3) ** 2 > FIT_MARGIN * limit:
            print(f"| {size}x{size} | | untiled | left out: the fit says it would not fit in memory | | | | |")
            continue
        result = run_child(Spec(size, 0, args.model, args.device))
        limit = result["cuda_total"] or machine_memory()
        untiled.append(((result["output"][0] * result["output"][1]) / 1e6, _peak(result)))
        print(_row(result), flush=True)
    print()
    fit = fit_line(untiled)
    where = "accelerator memory" if args.device.startswith("cuda") else "RAM"
    if fit is None or fit[1] <= 0 or limit is None:
        print("untiled runs out: not estimated (needs untiled runs at two sizes or more)")
        return 0
    megapixels = max(0.0, (limit - fit[0]) / fit[1])
    side = int(math.sqrt(megapixels * 1e6))
    print(f"untiled runs out at about {side}x{side} px output ({megapixels:.0f} megapixels): estimated, not run, "
          f"from the measured growth of {fit[1] / MB:.0f} MB per output megapixel over {fit[0] / MB:.0f} MB, "
          f"against {limit / 1e9:.1f} GB of {where}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
