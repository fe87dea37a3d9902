"""Reproducible, resumable batches: a seeded per-epoch shuffle that can start mid-epoch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochSampler(Sampler[int]):
    """Indices of a random permutation seeded with `seed + epoch`, skipping the first `start`.

    The order depends only on (seed, epoch), never on the global RNG, so a resumed run sees the
    same samples in the same order as an uninterrupted one. Accelerate calls `set_epoch` on it.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.start = 0  # samples of this epoch already consumed (by all processes together)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        return iter(order[self.start :].tolist())

    def __len__(self) -> int:
        return max(self.size - self.start, 0)


@dataclass
class DataPosition:
    """Where the run is in the data: `start` samples of epoch `epoch` have been consumed."""

    epoch: int = 0
    start: int = 0


def build_loader(
    dataset: Dataset,
    sampler: EpochSampler,
    *,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over `sampler` that drops the last incomplete batch.

    pin_memory: collate into page-locked memory, so the copy to a GPU need not wait for it.

    Dropping it keeps every optimizer step on a full batch and makes the data position a plain
    sample count. The loader gets its own generator because creating an iterator draws a worker
    base seed from it; drawing from the global RNG instead would shift dropout masks on resume.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )


def endless_batches(
    loader: DataLoader,
    sampler: EpochSampler,
    position: DataPosition,
    *,
    samples_per_batch: int,
    samples_per_epoch: int,
) -> Iterator[Any]:
    """Yield batches forever, epoch after epoch, advancing `position` as each batch is handed out.

    samples_per_batch: samples one micro-batch consumes across all processes (batch × processes).
    samples_per_epoch: the usable part of an epoch (a multiple of samples_per_batch).
    """
    while True:
        if position.start >= samples_per_epoch:
            position.epoch, position.start = position.epoch + 1, 0
        sampler.start = position.start
        if loader.generator is not None:  # worker seeds then depend on the position only
            loader.generator.manual_seed(sampler.seed + position.epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(position.epoch)  # Accelerate's loader forwards this to the sampler
        else:
            sampler.set_epoch(position.epoch)
        produced = False
        for batch in loader:
            produced = True
            position.start += samples_per_batch
            yield batch
        if not produced and position.start == 0:
            raise RuntimeError("the data loader produced no batch for a whole epoch")
        position.start = samples_per_epoch
