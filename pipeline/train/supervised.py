"""Supervised training of an image classifier (the ``teacher`` stage's optional fine-tune).

Augmentation draws one fresh view per image per epoch with the same sampler and replay as
the cache, from the loop's seeded generator: every epoch draws the order, then the boxes of
every row (N × 5 float32, from the manifest's image sizes), so both sources below train on
the same (row, box) pairs; only the order differs. The schedule is one-cycle
(``pipeline.train.optim``); the validation top-1 after each epoch comes from a
:class:`~pipeline.evaluate.ValSource`, held or streamed one shard at a time.

Two :class:`LabelledSource` implementations:

* :class:`HeldLabelled`: the split decoded in memory (a device batch of same-size images,
  or host images of any sizes rendered one by one);
* :class:`LabelledStream`: the split's shards streamed each epoch (shard order reseeded per
  epoch, split across loader workers, a shuffle buffer), as stage three's stream mode does
  it without a cache: memory holds a few samples per worker, whatever the split's size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from torch import Tensor

from pipeline.data.held import held_rows
from pipeline.data.preprocess import Preprocess, render_inputs
from pipeline.data.shards import CorruptSampleError, Manifest, decode_image
from pipeline.data.views import ViewPolicy, sample_views
from pipeline.evaluate import ValSource, evaluate_classifier
from pipeline.models import ImageClassifier
from pipeline.runtime import derived_seed
from pipeline.train.optim import clip_gradients, make_optimizer, make_scheduler
from pipeline.data.streaming import check_rows_seen, exact_batches, sample_row, shard_stream
from schemas.config import OptimConfig
from schemas.layout import LABEL_EXT

__all__ = ["EpochLog", "HeldLabelled", "LabelledSource", "LabelledStream", "TrainSettings", "train_classifier"]


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    eval_batch_size: int
    optim: OptimConfig
    label_smoothing: float
    augment: ViewPolicy
    preprocess: Preprocess
    seed: int


@dataclass(frozen=True)
class EpochLog:
    epoch: int
    train_loss: float
    val_top1: float


class LabelledSource(Protocol):
    """``(epoch, order (N,), boxes (N, 5))`` → ``steps`` batches ``(rows, x, labels)``: ``rows``
    (B,) int64 host row indices, and on the device ``x`` (B, C, S, S) float32 the model's
    inputs rendered from each row's box and ``labels`` (B,)."""

    steps: int

    def __call__(self, epoch: int, order: Tensor, boxes: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]: ...


class HeldLabelled:
    """Batches of a split held in memory, in the loop's ``order``: ``images`` a device batch
    (N, C, H, W) uint8 of same-size images or N host images (C, H_i, W_i); ``labels`` (N,) on
    the training device."""

    def __init__(self, images: Tensor | Sequence[Tensor], labels: Tensor, *, preprocess: Preprocess,
                 batch_size: int) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.preprocess, self.batch_size = images, labels, preprocess, batch_size
        self.steps = max(1, math.ceil(len(labels) / batch_size))

    def __call__(self, epoch: int, order: Tensor, boxes: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        device = self.labels.device
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            x = render_inputs(held_rows(self.images, idx), boxes[idx], preprocess=self.preprocess).to(device)
            yield idx, x, self.labels[idx.to(device)]


class _LabelJoin:
    """A worker's map of a streamed sample to ``(row, image, box, label)``: the row's box of
    this epoch; the image rendered here when images have many sizes (same-size images travel
    as uint8 and are rendered as one batch on the device). Refuses a sample whose size is not
    the manifest's (its box was drawn on that size) or whose label is not a class."""

    def __init__(self, boxes: np.ndarray, sizes: np.ndarray, num_classes: int, mode: str,
                 render: Preprocess | None) -> None:
        self.boxes, self.sizes, self.num_classes, self.mode, self.render = boxes, sizes, num_classes, mode, render

    def __call__(self, sample: dict) -> tuple[int, np.ndarray | Tensor, np.ndarray, int]:
        row, shard, where, ext = sample_row(sample)
        if row >= len(self.boxes):
            raise CorruptSampleError(f"{where}: row {row} is past the split's {len(self.boxes)} rows; "
                                     "the shards do not match their manifest: rerun `cifd prepare`")
        image: np.ndarray | Tensor = decode_image(sample[ext], mode=self.mode, where=where)
        if tuple(image.shape[1:]) != tuple(int(v) for v in self.sizes[row]):
            raise CorruptSampleError(f"{where}: image is {tuple(image.shape[1:])} (height, width) but the manifest "
                                     f"says {tuple(int(v) for v in self.sizes[row])}; rerun `cifd prepare`")
        try:
            label = int(sample[LABEL_EXT])
        except ValueError as exc:
            raise CorruptSampleError(f"{where}: label {sample[LABEL_EXT]!r} is not an integer; "
                                     "rerun `cifd prepare`") from exc
        if not 0 <= label < self.num_classes:
            raise CorruptSampleError(f"{where}: label {label} is not one of the {self.num_classes} classes; "
                                     "rerun `cifd prepare`")
        box = self.boxes[row]
        if self.render is not None:  # images of many sizes: rendered here, one by one
            image = render_inputs([torch.from_numpy(image)], torch.from_numpy(box)[None], preprocess=self.render)[0]
        return row, image, box, label


class LabelledStream:
    """Batches of a split streamed from its shards each epoch (``order`` is unused: the order
    comes from the per-epoch shard permutation, the workers' interleaving and the shuffle
    buffer). Every row is yielded exactly once per epoch, in ``steps`` batches (the last one
    partial); a stream that gives other rows is refused. Single process (no DDP)."""

    def __init__(self, manifest: Manifest, split: str, *, preprocess: Preprocess, batch_size: int, workers: int,
                 device: torch.device, seed: int, shuffle_buffer: int) -> None:
        entry = manifest.split(split)
        self.urls = [str(manifest.root / s["file"]) for s in entry["shards"]]
        self.num_rows = int(entry["num_samples"])
        self.sizes = manifest.sizes(split).astype(np.int32)
        self.num_classes, self.mode = len(manifest.classes), manifest.mode
        self.same_size = manifest.image_shape is not None
        self.preprocess, self.batch_size, self.workers, self.device = preprocess, batch_size, workers, device
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.steps = max(1, math.ceil(self.num_rows / batch_size))

    def __call__(self, epoch: int, order: Tensor, boxes: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        seen_rank = wds.utils.pytorch_worker_info()[:2]
        if seen_rank != (0, 1):
            raise RuntimeError(f"webdataset sees rank {seen_rank[0]} of {seen_rank[1]}: the teacher fine-tune runs "
                               "in one process; run `cifd teacher` without torchrun")
        join = _LabelJoin(boxes.cpu().numpy(), self.sizes, self.num_classes, self.mode,
                          None if self.same_size else self.preprocess)
        chunks = shard_stream(self.urls, seed=derived_seed(self.seed, epoch), join=join,
                              shuffle_buffer=self.shuffle_buffer, batch_size=self.batch_size)
        loader = wds.WebLoader(chunks, batch_size=None, shuffle=False, num_workers=self.workers,
                               pin_memory=self.device.type == "cuda", persistent_workers=False)
        seen = torch.zeros(self.num_rows, dtype=torch.int32)
        done = 0
        for rows, images, host_boxes, labels in exact_batches(loader, batch_size=self.batch_size, steps=self.steps,
                                                              partial_last=True):
            assert rows is not None and images is not None and host_boxes is not None and labels is not None
            seen[rows] += 1
            done += 1
            images = images.to(self.device, non_blocking=True)
            x = render_inputs(images, host_boxes, preprocess=self.preprocess) if self.same_size else images
            yield rows, x, labels.to(self.device, non_blocking=True)
        check_rows_seen(seen, batches=done, steps=self.steps, batch_size=self.batch_size, world=1, rank=0,
                        epoch=epoch)


def train_classifier(
    model: ImageClassifier,
    *,
    batches: LabelledSource,
    sizes: Tensor,
    val: ValSource,
    settings: TrainSettings,
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> list[EpochLog]:
    """Train with cross-entropy and a one-cycle schedule on ``batches`` (a split of images of
    ``sizes`` (N, 2)); the top-1 on ``val``'s clean views after each epoch."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(settings.seed)
    opt = make_optimizer(model.parameters(), settings.optim)
    sched = make_scheduler(opt, settings.optim, total_steps=settings.epochs * batches.steps)
    logs = []
    for epoch in range(settings.epochs):
        model.train()
        order = torch.randperm(len(sizes), generator=generator)
        boxes = sample_views(sizes=sizes, num_views=2, policy=settings.augment, generator=generator,
                             image_size=settings.preprocess.image_size, crop_pct=settings.preprocess.crop_pct)[:, 1]
        total, count = torch.zeros((), device=device), 0
        for _, x, labels in batches(epoch, order, boxes):
            loss = F.cross_entropy(model(x), labels, label_smoothing=settings.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(model.parameters(), settings.optim)
            opt.step()
            sched.step()
            total += loss.detach() * len(labels)
            count += len(labels)
        top1 = evaluate_classifier(model, val, preprocess=settings.preprocess, batch_size=settings.eval_batch_size).top1
        entry = EpochLog(epoch=epoch + 1, train_loss=float(total) / max(count, 1), val_top1=top1)
        logs.append(entry)
        if on_epoch is not None:
            on_epoch(entry)
    return logs
