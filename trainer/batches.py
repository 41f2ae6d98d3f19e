"""Training batches whose order and crops are a pure function of (seed, step).

A resumed run must see exactly the batches the interrupted one would have seen. Saving a
DataLoader's state does not give that (worker RNGs, prefetching), so nothing is saved instead:
the batch for global batch number ``b`` is drawn from a permutation seeded by (seed, epoch), and
each item's random crop and flip are seeded by (seed, b, position). Any worker can make any
item, and resuming at step ``s`` simply starts counting at ``s``. Every process of a multi-GPU
run takes every ``world``-th batch, so together they see each batch once.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .data import DataConfig, build_train_dataset

__all__ = ["SeededItems", "StepBatchSampler", "build_step_loader", "data_step", "derive_seed"]


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, step, rank, purpose...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


class SeededItems(Dataset):
    """Wraps a dataset whose ``__getitem__`` uses torch's global RNG: item ``(index, seed)`` is
    made under that seed, leaving the caller's RNG state untouched."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless batches of ``(index, item_seed)`` keys, starting at a given step."""

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        rank: int = 0,
        world: int = 1,
        period: int = 0,
    ) -> None:
        if size < batch_size:
            raise ValueError(f"{size} images cannot fill a batch of {batch_size}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_step, self.rank, self.world = start_step, rank, world
        self.period = period  # > 0: step s repeats the batch of step s mod period (data.fixed_batches)

    def batch(self, global_batch: int) -> list[tuple[int, int]]:
        per_epoch = self.size // self.batch_size
        epoch, k = divmod(global_batch, per_epoch)
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch, 1)))
        chosen = order[k * self.batch_size : (k + 1) * self.batch_size].tolist()
        return [(i, derive_seed(self.seed, global_batch, j, 2)) for j, i in enumerate(chosen)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.batch(data_step(step, self.period) * self.world + self.rank)
            step += 1


def data_step(step: int, period: int) -> int:
    """The step whose crops and degradation step ``step`` uses: itself, or with
    ``data.fixed_batches`` = period > 0, its place in the repeating cycle."""
    return step % period if period else step


def _leave_signals_to_the_loop(worker_id: int) -> None:
    """Loader workers ignore Ctrl-C and SIGTERM, which a terminal or a scheduler (SLURM) sends to every
    process of the job: the loop finishes the step, checkpoints and shuts the loader down, whereas a
    worker killed by SIGTERM would make torch raise in the main process in the middle of that step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_step_loader(
    cfg: DataConfig, scale: int, seed: int, start_step: int, rank: int = 0, world: int = 1
) -> DataLoader:
    """An endless loader of training batches from step ``start_step`` on (see module docstring)."""
    dataset = build_train_dataset(cfg, scale)
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, seed, start_step, rank, world, cfg.fixed_batches)
    return DataLoader(SeededItems(dataset), batch_sampler=sampler, num_workers=cfg.num_workers,
                      worker_init_fn=_leave_signals_to_the_loop)  # fmt: skip
