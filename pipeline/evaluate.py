"""Evaluators, kept apart from the training loops: top-1, agreement with the teacher, KL.

Distillation is judged by how well the student agrees with its teacher, not only by
accuracy (big_vision's ``evaluators/proj/distill/distance.py`` keeps these beside, not
inside, the trainer). Every top-1 and agreement figure of the tool comes from
:func:`top1_hits` / :func:`agreement_hits`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.data.held import held_images
from pipeline.data.preprocess import Preprocess, render_inputs
from pipeline.data.shards import Manifest, read_shard

__all__ = ["Scores", "agreement", "agreement_hits", "evaluate_classifier", "predict", "predict_models", "predict_split", "scores", "sizes_of", "top1", "top1_hits"]


def top1_hits(logits: Tensor, labels: Tensor) -> Tensor:
    """1.0 where the arg-max of ``logits`` (..., C) is the label (...), else 0.0 (float32).

    Leading dims broadcast: RDM logits (M, B, C) against labels (B,) give (M, B).
    """
    return (logits.argmax(-1) == labels).float()


def agreement_hits(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """1.0 where ``logits`` (..., C) and ``teacher_logits`` (..., C) have the same arg-max."""
    return top1_hits(logits, teacher_logits.argmax(-1))


def top1(logits: Tensor, labels: Tensor) -> float:
    """Fraction of rows whose arg-max is the label (NaN for no rows)."""
    return float(top1_hits(logits, labels).mean()) if len(labels) else math.nan


def agreement(logits: Tensor, teacher_logits: Tensor) -> float:
    """Fraction of rows whose arg-max is the teacher's (NaN for no rows)."""
    return float(agreement_hits(logits, teacher_logits).mean()) if len(teacher_logits) else math.nan


class Scores(NamedTuple):
    """Means over the evaluated images; ``agreement``/``kl`` are NaN without teacher logits."""

    top1: float
    agreement: float
    kl: float  # KL(teacher ‖ model) at τ = 1, nats per image


def sizes_of(images: Tensor | Sequence[Tensor]) -> Tensor:
    """(N, 2) (height, width) of a batch (N, C, H, W) or a sequence of (C, H_i, W_i) images."""
    if isinstance(images, Tensor):
        return torch.tensor(images.shape[2:], dtype=torch.int64).expand(len(images), 2)
    return torch.tensor([tuple(im.shape[1:]) for im in images], dtype=torch.int64).reshape(-1, 2)


@torch.inference_mode()
def predict(model: nn.Module, images: Tensor | Sequence[Tensor], *, preprocess: Preprocess, batch_size: int,
            views: Tensor | None = None, channels_last: bool = False) -> Tensor:
    """float32 logits (n, C) of ``model`` on uint8 ``images`` (a batch (n, C, H, W) or n
    images of any sizes) under ``views`` (n, 5), by default the clean views of ``preprocess``.
    Inputs are rendered where the images are and moved to the model's device."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    if views is None:
        views = preprocess.clean_views(sizes_of(images))
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        x = render_inputs(batch, views[start:start + batch_size], preprocess=preprocess, channels_last=channels_last)
        out.append(model(x.to(device, non_blocking=True)).float())
    model.train(was)
    if not out:
        return torch.zeros(0, 0, device=device)
    return torch.cat(out)


def predict_models(models: Mapping[str, tuple[nn.Module, Preprocess]], manifest: Manifest, split: str, *,
                   batch_size: int, views: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """Logits (N, C) of every named ``(model, preprocess)`` and the labels (N,) of a whole
    split, reading each shard once for all of them (memory holds one shard's images and the
    logits, whatever the split's size). ``views`` (N, 5): the boxes to render (the cache's
    clean views); None: each model's own clean views."""
    device = next(next(iter(models.values()))[0].parameters()).device
    logits: dict[str, list[Tensor]] = {name: [] for name in models}
    labels = []
    for shard in manifest.split(split)["shards"]:
        a, b = shard["start"], shard["stop"]
        block = read_shard(manifest.root / shard["file"], mode=manifest.mode, start=a, stop=b)
        images = held_images(block, manifest, device)  # same size: one batch, rendered on the models' device
        for name, (model, preprocess) in models.items():
            logits[name].append(predict(model, images, preprocess=preprocess, batch_size=batch_size,
                                        views=views[a:b] if views is not None else None))
        labels.append(torch.from_numpy(block.labels))
    return {name: torch.cat(parts) for name, parts in logits.items()}, torch.cat(labels).to(device)


def predict_split(model: nn.Module, manifest: Manifest, split: str, *, preprocess: Preprocess,
                  batch_size: int) -> tuple[Tensor, Tensor]:
    """Logits (N, C) on the clean views of ``preprocess`` and labels (N,) of a whole split,
    read one shard at a time (memory does not grow with the split's images)."""
    logits, labels = predict_models({"model": (model, preprocess)}, manifest, split, batch_size=batch_size)
    return logits["model"], labels


def scores(logits: Tensor, labels: Tensor, teacher_logits: Tensor | None) -> Scores:
    """Top-1, top-1 agreement with the teacher and KL(teacher ‖ model) at τ = 1 of ``logits``."""
    if teacher_logits is None:
        return Scores(top1=top1(logits, labels), agreement=math.nan, kl=math.nan)
    t = teacher_logits.float()
    n = max(len(logits), 1)
    kl = float(F.kl_div(logits.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum")) / n
    return Scores(top1=top1(logits, labels), agreement=agreement(logits, t), kl=kl)


def evaluate_classifier(model: nn.Module, images: Tensor | Sequence[Tensor], labels: Tensor,
                        teacher_logits: Tensor | None, *, preprocess: Preprocess, batch_size: int,
                        views: Tensor | None = None, channels_last: bool = False) -> Scores:
    """Top-1, top-1 agreement with the teacher and KL(teacher ‖ model) at τ = 1 on ``views``
    (by default the clean views of ``preprocess``).

    ``model`` maps inputs to logits (a deployed student, or ``Student.backbone``).
    """
    logits = predict(model, images, preprocess=preprocess, batch_size=batch_size, views=views,
                     channels_last=channels_last)
    return scores(logits, labels, teacher_logits)
