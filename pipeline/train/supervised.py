"""Supervised training and evaluation of an image classifier on in-memory uint8 images.

Used by the ``teacher`` stage (optional fine-tune). Augmentation draws one fresh view per
image per epoch with the same sampler and replay as the cache, on the training device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.data.views import ViewPolicy, clean_views, render_views, sample_views
from pipeline.models import ImageClassifier
from pipeline.train.common import make_optimizer


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    optimizer: str
    label_smoothing: float
    augment: ViewPolicy
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    seed: int


@dataclass(frozen=True)
class EpochLog:
    epoch: int
    train_loss: float
    val_top1: float


@torch.inference_mode()
def predict(model: ImageClassifier, images: Tensor, *, image_size: int, mean: tuple[float, ...],
            std: tuple[float, ...], batch_size: int = 512) -> Tensor:
    """Logits (n, C) of the clean views of uint8 ``images`` (n, C, H, W)."""
    model.eval()
    _, _, h, w = images.shape
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        x = render_views(batch, clean_views(len(batch), h, w), out_size=image_size, mean=mean, std=std)
        out.append(model(x).float())
    return torch.cat(out) if out else torch.zeros(0, model.num_classes)


def top1(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean()) if len(labels) else math.nan


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
    """Train with cross-entropy and a cosine schedule; images stay on their device."""
    device = train_images.device
    generator = torch.Generator().manual_seed(settings.seed)
    opt = make_optimizer(model.parameters(), name=settings.optimizer, lr=settings.lr,
                         weight_decay=settings.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_images) / settings.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=settings.lr, total_steps=max(1, settings.epochs * steps_per_epoch), pct_start=0.15)
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
            x = render_views(train_images[idx.to(device)], views[idx], out_size=settings.image_size,
                             mean=settings.mean, std=settings.std)
            loss = F.cross_entropy(model(x), train_labels[idx.to(device)], label_smoothing=settings.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach() * len(idx)
            count += len(idx)
        logits = predict(model, val_images, image_size=settings.image_size, mean=settings.mean, std=settings.std)
        entry = EpochLog(epoch=epoch + 1, train_loss=float(total) / max(count, 1), val_top1=top1(logits, val_labels))
        logs.append(entry)
        if on_epoch is not None:
            on_epoch(entry)
    return logs
