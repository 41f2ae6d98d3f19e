"""Drawing from a ``torch.Generator`` the same way on every device.

Draws happen on the generator's device, in float32 (which every device has), and come back to
the CPU, where parameters are kept: they are tiny, and with a CPU generator a seed gives the same
parameters whichever device the pipeline then runs on.
"""

from __future__ import annotations

import torch
from torch import Tensor


def uniform(lo: float, hi: float, n: int, generator: torch.Generator) -> Tensor:
    """(n,) float32 draws in [lo, hi)."""
    u = torch.rand(n, generator=generator, device=generator.device).cpu().double()
    return (lo + (hi - lo) * u).float()


def categorical(probs: tuple[float, ...], n: int, generator: torch.Generator) -> Tensor:
    """(n,) int64 indices into ``probs``."""
    edges = torch.tensor(probs, dtype=torch.float64).cumsum(0)
    u = torch.rand(n, generator=generator, device=generator.device).cpu().double() * edges[-1]
    return torch.searchsorted(edges, u, right=True).clamp(max=len(probs) - 1)


def choice(options: tuple[str, ...], generator: torch.Generator) -> str:
    """One of ``options``, uniformly."""
    return options[int(categorical((1.0,) * len(options), 1, generator))]


def draw_seed(generator: torch.Generator) -> int:
    """A seed for a generator of its own, for draws too large to keep (noise images)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
