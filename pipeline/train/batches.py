"""Batch sources of stage three: what yields ``(rows, views, student inputs, targets)`` each epoch.

Two sources implement :class:`BatchSource`: :class:`MemoryBatches` (images held in memory,
CIFAR-sized data) and ``pipeline.train.stream.StreamBatches`` (WebDataset shards). Both
join to the cache by the global row index, take the view of a row from the loop's
``choice`` tensor and render the cached view box of that (row, view) with
:func:`~pipeline.data.preprocess.render_inputs`, so they train on the same pixels, in a
different order. Same-size images are rendered as one batch on the training device; images
of many sizes one by one (in the loader workers when streaming), then batched.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Protocol

from torch import Tensor

from pipeline.data.held import held_rows
from pipeline.data.preprocess import Preprocess, render_inputs
from pipeline.train.targets import Batch, Targets, gather_targets

__all__ = ["BatchSource", "MemoryBatches", "steps_per_epoch"]


class BatchSource(Protocol):
    """``(epoch, permutation, view choice)`` → iterator of ``(rows, views, x, batch)`` on the
    device; ``rows`` (B,) int64 global row indices, ``views`` (B,) the view index of each
    row (``choice[rows]``), ``x`` (B, C, S, S) float32 the student's normalised inputs,
    ``batch`` the cached targets of those (row, view) pairs.

    ``steps`` is the number of batches every call yields: the same on every rank (DDP needs
    equal step counts, and the LR schedule is built from it). ``rows``: the global rows the
    source trains on, ascending (the loop permutes them each epoch), or None for every row.
    """

    steps: int
    rows: Tensor | None

    def __call__(self, epoch: int, order: Tensor, choice: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor, Batch]]: ...


def steps_per_epoch(rows_per_rank: int, batch_size: int, world: int) -> int:
    """Single process: every row, the last batch partial. DDP: full batches only."""
    return rows_per_rank // batch_size if world > 1 else math.ceil(rows_per_rank / batch_size)


class MemoryBatches:
    """Batches from images held in memory: a device-resident uint8 batch (N, C, H, W) of
    same-size images (no host work in the loop), or N images (C, H_i, W_i) of any sizes
    (rendered one by one on the host, then moved).

    ``targets``: every row's cached targets and view boxes, on the device. ``rows``: train on
    these global rows only (ascending; None: every row); images and targets stay whole, so a
    mixed view's partner outside ``rows`` is still there. Rank ``r`` of ``world`` takes
    ``order[r::world]`` cut to ``n // world`` rows, so every rank has the same number of full
    batches.
    """

    def __init__(self, images: Tensor | Sequence[Tensor], targets: Targets, *, preprocess: Preprocess,
                 batch_size: int, rank: int, world: int, rows: Tensor | None = None) -> None:
        if len(images) != targets.num_rows:
            raise ValueError(f"{len(images)} images but targets for {targets.num_rows} rows")
        if rows is not None and (rows.ndim != 1 or len(rows) < 1 or int(rows.min()) < 0
                                 or int(rows.max()) >= targets.num_rows or bool((rows[1:] <= rows[:-1]).any())):
            raise ValueError(f"rows must be distinct ascending row indices in [0, {targets.num_rows})")
        self.images, self.targets, self.preprocess = images, targets, preprocess
        self.device = targets.views.device
        self.host_boxes = targets.views.cpu()  # views are looked up on the host: no device sync per batch
        self.host_partner = None if targets.mix_partner is None else targets.mix_partner.cpu()
        self.host_mix = None if targets.mix is None else targets.mix.cpu()
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.rows = None if rows is None else rows.cpu().long()
        n = len(images) if self.rows is None else len(self.rows)
        self.per_rank = n // world if world > 1 else n
        self.steps = steps_per_epoch(self.per_rank, batch_size, world)

    def _images(self, rows: Tensor) -> Tensor | list[Tensor]:
        """The images of host ``rows``: one batch on their device (same size), else a list."""
        return held_rows(self.images, rows)

    def __call__(self, epoch: int, order: Tensor, choice: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor, Batch]]:
        mine = order.cpu()[self.rank::self.world][:self.per_rank]
        choice = choice.cpu()
        for step in range(self.steps):
            rows = mine[step * self.batch_size:(step + 1) * self.batch_size]  # host
            views = choice[rows]
            boxes = self.host_boxes[rows, views]  # (B, 5), host
            mix = None
            if self.host_partner is not None and self.host_mix is not None:  # mixed views: the partners too
                mix = (self._images(self.host_partner[rows, views]), self.host_mix[rows, views])
            x = render_inputs(self._images(rows), boxes, preprocess=self.preprocess, mix=mix)
            rows_d, views_d = rows.to(self.device, non_blocking=True), views.to(self.device, non_blocking=True)
            batch = gather_targets(self.targets, rows_d, views_d, size=self.preprocess.image_size)
            yield rows_d, views_d, x.to(self.device, non_blocking=True), batch
