"""Exponential moving average of the trained parameters: what validation and export use.

One-step students trained with adversarial and distribution-matching losses jitter from step to
step; the average of recent weights is smoother and usually better than any single step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """Shadow copies of ``params`` (name -> parameter), updated after every optimizer step.

    The decay ramps up as ``(1 + n) / (10 + n)`` over the first updates so early weights, which
    are far from anything useful, do not dominate the average for thousands of steps.
    """

    def __init__(self, params: dict[str, nn.Parameter], decay: float) -> None:
        self.params = params
        self.decay = decay
        self.updates = 0
        self.shadow = {n: p.detach().clone().float() for n, p in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), 1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.shadow, "__updates__": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) - {"__updates__"} != set(self.shadow):
            raise ValueError("EMA state does not match the trained parameters")
        self.updates = int(state["__updates__"])
        for name, value in state.items():
            if name != "__updates__":
                self.shadow[name].copy_(value)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for name, p in self.params.items():
            p.copy_(self.shadow[name].to(p.dtype))

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the model inside the block, the trained ones restored after."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(backup[name])
