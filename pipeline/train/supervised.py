"""Supervised training of an image classifier on in-memory uint8 images (a device batch of
same-size images, or host images of any sizes rendered one by one).

Used by the ``teacher`` stage (optional fine-tune). Augmentation draws one fresh view per
image per epoch with the same sampler and replay as the cache, on the training device.
The schedule is one-cycle (``pipeline.train.optim``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.data.preprocess import Preprocess, render_inputs
from pipeline.data.views import ViewPolicy, sample_views
from pipeline.evaluate import predict, sizes_of, top1
from pipeline.models import ImageClassifier
from pipeline.train.optim import clip_gradients, make_optimizer, make_scheduler
from schemas.config import OptimConfig


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


def train_classifier(
    model: ImageClassifier,
    *,
    train_images: Tensor | list[Tensor],
    train_labels: Tensor,
    val_images: Tensor | list[Tensor],
    val_labels: Tensor,
    settings: TrainSettings,
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> list[EpochLog]:
    """Train with cross-entropy and a one-cycle schedule; images stay on their device."""
    device = train_labels.device
    sizes = sizes_of(train_images)
    batched = isinstance(train_images, Tensor)
    generator = torch.Generator().manual_seed(settings.seed)
    opt = make_optimizer(model.parameters(), settings.optim)
    steps_per_epoch = max(1, math.ceil(len(train_images) / settings.batch_size))
    sched = make_scheduler(opt, settings.optim, total_steps=settings.epochs * steps_per_epoch)
    logs = []
    for epoch in range(settings.epochs):
        model.train()
        order = torch.randperm(len(train_images), generator=generator)
        views = sample_views(sizes=sizes, num_views=2, policy=settings.augment, generator=generator,
                             image_size=settings.preprocess.image_size, crop_pct=settings.preprocess.crop_pct)[:, 1]
        total, count = torch.zeros((), device=device), 0
        for start in range(0, len(order), settings.batch_size):
            idx = order[start:start + settings.batch_size]
            images = train_images[idx.to(device)] if batched else [train_images[i] for i in idx.tolist()]
            x = render_inputs(images, views[idx], preprocess=settings.preprocess).to(device)
            loss = F.cross_entropy(model(x), train_labels[idx.to(device)], label_smoothing=settings.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(model.parameters(), settings.optim)
            opt.step()
            sched.step()
            total += loss.detach() * len(idx)
            count += len(idx)
        logits = predict(model, val_images, preprocess=settings.preprocess, batch_size=settings.eval_batch_size)
        entry = EpochLog(epoch=epoch + 1, train_loss=float(total) / max(count, 1), val_top1=top1(logits, val_labels))
        logs.append(entry)
        if on_epoch is not None:
            on_epoch(entry)
    return logs
