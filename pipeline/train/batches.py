"""Batch sources of stage three: what yields ``(rows, views, uint8 images)`` each epoch.

Two sources implement :class:`BatchSource`: :class:`MemoryBatches` (device-resident images,
CIFAR-sized data) and ``pipeline.train.stream.StreamBatches`` (WebDataset shards). Both
join to the cache by the global row index and take the view of a row from the loop's
``choice`` tensor, so they train on the same (row, view) pairs, in a different order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Protocol

from torch import Tensor

__all__ = ["BatchSource", "MemoryBatches", "steps_per_epoch"]


class BatchSource(Protocol):
    """``(epoch, permutation, view choice)`` → iterator of ``(rows, views, uint8 images)`` on
    the device; ``rows`` (B,) int64 global row indices, ``views`` (B,) the view index of each
    row (``choice[rows]``), images (B, C, H, W) uint8.

    ``steps`` is the number of batches every call yields: the same on every rank (DDP needs
    equal step counts, and the LR schedule is built from it).
    """

    steps: int

    def __call__(self, epoch: int, order: Tensor, choice: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]: ...


def steps_per_epoch(rows_per_rank: int, batch_size: int, world: int) -> int:
    """Single process: every row, the last batch partial. DDP: full batches only."""
    return rows_per_rank // batch_size if world > 1 else math.ceil(rows_per_rank / batch_size)


class MemoryBatches:
    """Batches from device-resident uint8 images (N, C, H, W): no host work in the loop.

    Rank ``r`` of ``world`` takes ``order[r::world]`` cut to ``N // world`` rows, so every
    rank has the same number of full batches.
    """

    def __init__(self, images: Tensor, batch_size: int, rank: int, world: int) -> None:
        self.images, self.batch_size, self.rank, self.world = images, batch_size, rank, world
        self.per_rank = len(images) // world if world > 1 else len(images)
        self.steps = steps_per_epoch(self.per_rank, batch_size, world)

    def __call__(self, epoch: int, order: Tensor, choice: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        device = self.images.device
        mine = order[self.rank::self.world][:self.per_rank].to(device, non_blocking=True)
        choice = choice.to(device, non_blocking=True)
        for step in range(self.steps):
            rows = mine[step * self.batch_size:(step + 1) * self.batch_size]
            yield rows, choice[rows], self.images[rows]
