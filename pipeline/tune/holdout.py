"""A validation split carved from the train split, for choices that must not see the reported
val split (``cifd tune``, the studies behind the defaults).

The held-out rows keep their cached targets, so the student is scored on them exactly as
stage three scores the reported split: top-1 and teacher agreement on the clean view (view
0). The rest of train is what the student learns from. Memory mode only (the stream source
reads whole shards; carving rows out of it would need a row filter in the loader).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor

from pipeline.data.held import held_rows
from pipeline.train.batches import MemoryBatches
from pipeline.evaluate import ValSet
from pipeline.train.targets import TargetInfo, Targets

__all__ = ["Holdout", "carve_holdout", "holdout_rows"]


class Holdout(NamedTuple):
    """The reduced training source and the carved validation set."""

    batches: MemoryBatches
    val: ValSet
    info: TargetInfo  # of the training rows (what the loop's permutation runs over)
    train_rows: Tensor  # (N - n,) int64 global rows the student trains on, ascending
    val_rows: Tensor  # (n,) int64 held-out rows, ascending


def holdout_rows(num_rows: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """``(train_rows, val_rows)``: a seeded random ``fraction`` of ``range(num_rows)`` held out
    (at least one row on each side), both sorted ascending."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction!r}")
    n_val = int(round(num_rows * fraction))
    if n_val < 1 or n_val >= num_rows:
        raise ValueError(f"holdout fraction {fraction} of {num_rows} rows leaves {n_val} validation rows; "
                         "expected at least one row on each side (raise the fraction or use more data)")
    perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def _subset_targets(targets: Targets, rows: Tensor) -> Targets:
    """The targets of ``rows`` (every row-aligned tensor field indexed; scalars kept)."""
    index = rows.to(targets.labels.device)
    n = targets.num_rows
    values = {}
    for field in dataclasses.fields(targets):
        value = getattr(targets, field.name)
        values[field.name] = value[index] if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == n \
            else value
    return dataclasses.replace(targets, **values)


def carve_holdout(batches: MemoryBatches, *, fraction: float, seed: int, batch_size: int) -> Holdout:
    """Split a memory batch source's rows into a training source and a :class:`ValSet`."""
    if not isinstance(batches, MemoryBatches):
        raise ValueError("a validation split carved from train needs distill.data: memory "
                         f"(got a {type(batches).__name__} source); set distill.data: memory to tune")
    if batches.world != 1:
        raise ValueError(f"a carved validation split is single-process only (world = {batches.world})")
    targets = batches.targets
    train_rows, val_rows = holdout_rows(targets.num_rows, fraction, seed)
    images = batches.images

    def pick(rows: Tensor) -> Tensor | list[Tensor]:
        return held_rows(images, rows)

    train_targets = _subset_targets(targets, train_rows)
    val_targets = _subset_targets(targets, val_rows)
    train = MemoryBatches(pick(train_rows), train_targets, preprocess=batches.preprocess, batch_size=batch_size,
                          rank=0, world=1)
    val = ValSet(images=pick(val_rows), views=val_targets.views[:, 0].cpu(),  # (n, 5) clean view boxes
                 labels=val_targets.labels, teacher_logits=val_targets.teacher_logits[:, 0].float())
    return Holdout(batches=train, val=val, info=train_targets.info, train_rows=train_rows, val_rows=val_rows)
