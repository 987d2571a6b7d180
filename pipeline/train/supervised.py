"""Supervised training of an image classifier on in-memory uint8 images.

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
from pipeline.evaluate import predict, top1
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
    train_images: Tensor,
    train_labels: Tensor,
    val_images: Tensor,
    val_labels: Tensor,
    settings: TrainSettings,
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> list[EpochLog]:
    """Train with cross-entropy and a one-cycle schedule; images stay on their device."""
    device = train_images.device
    generator = torch.Generator().manual_seed(settings.seed)
    opt = make_optimizer(model.parameters(), settings.optim)
    steps_per_epoch = max(1, math.ceil(len(train_images) / settings.batch_size))
    sched = make_scheduler(opt, settings.optim, total_steps=settings.epochs * steps_per_epoch)
    _, _, h, w = train_images.shape
    logs = []
    for epoch in range(settings.epochs):
        model.train()
        order = torch.randperm(len(train_images), generator=generator)
        views = sample_views(num_images=len(train_images), num_views=2, height=h, width=w,
                             policy=settings.augment, generator=generator)[:, 1]
        total, count = torch.zeros((), device=device), 0
        for start in range(0, len(order), settings.batch_size):
            idx = order[start:start + settings.batch_size]
            x = render_inputs(train_images[idx.to(device)], views[idx], preprocess=settings.preprocess)
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
