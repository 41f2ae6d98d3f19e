"""How many CPU threads a CPU upscale uses, and why not simply one per core.

torch runs each CPU kernel on an OpenMP team of ``torch.get_num_threads()`` threads (one per core
by default), and every kernel ends at a barrier where the team waits for its slowest thread. A
one-step upscale is thousands of short kernels. On a machine busy with other work, one of our
threads is often off the CPU, and the others wait at each barrier for the scheduler to bring it
back; GNU OpenMP's default wait policy even spins there, burning the time slice the missing
thread needs. Measured on 2 cores with a load average of ~7 from other jobs (128 -> 512, the
embedded default): 13 s an image with 2 spinning threads, 4-5 s with 2 sleeping ones
(``OMP_WAIT_POLICY=PASSIVE``), 3 s with 1 thread; on an idle machine 2 threads are the fastest.

So a CPU run takes as many threads as there are cores that no other runnable task is using right
now (at least one), unless the user chose a number (``OMP_NUM_THREADS``). The choice is made per
call and undone after it, so a host process (ComfyUI, the demo) keeps its own setting.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["PASSIVE_WAIT", "auto_threads", "cpu_threads", "usable_cores"]

# Set by the CLI (and the speed benchmark) before torch loads, unless the user set it: OpenMP
# reads it once, when the runtime starts, so a library cannot change it later.
PASSIVE_WAIT = {"OMP_WAIT_POLICY": "PASSIVE"}

_SAMPLES, _SAMPLE_GAP_S = 5, 0.001


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max", encoding="ascii").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _other_runnable() -> int | None:
    """Runnable tasks other than this one right now (Linux's /proc/loadavg), the median of a few
    snapshots a millisecond apart; None where the system does not say."""
    counts = []
    for _ in range(_SAMPLES):
        try:
            running = Path("/proc/loadavg").read_text(encoding="ascii").split()[3]
        except (OSError, IndexError):
            return None
        counts.append(int(running.split("/")[0]) - 1)  # the reading thread is one of them
        time.sleep(_SAMPLE_GAP_S)
    return max(0, sorted(counts)[len(counts) // 2])


def auto_threads() -> int:
    """Threads for a CPU run now: the cores that other runnable tasks leave free, at least one and
    at most the usable ones (the count of runnable tasks is system-wide, so it is taken from all cores)."""
    cores = usable_cores()
    others = _other_runnable()
    return cores if others is None else max(1, min(cores, (os.cpu_count() or cores) - others))


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Run the body with ``threads`` intra-op threads (``None``: choose with :func:`auto_threads`,
    or keep torch's setting where ``OMP_NUM_THREADS`` says the user chose), then restore the old count."""
    import torch  # here, so that the CLI reads PASSIVE_WAIT before torch (and OpenMP) load

    before = torch.get_num_threads()
    if threads is None:
        threads = before if os.environ.get("OMP_NUM_THREADS") else auto_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
