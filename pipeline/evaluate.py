"""Evaluators, kept apart from the training loops: top-1, agreement with the teacher, KL.

Distillation is judged by how well the student agrees with its teacher, not only by
accuracy (big_vision's ``evaluators/proj/distill/distance.py`` keeps these beside, not
inside, the trainer). Every top-1 and agreement figure of the tool comes from
:func:`top1_hits` / :func:`agreement_hits`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.data.held import held_images
from pipeline.data.preprocess import Preprocess, render_inputs
from pipeline.data.shards import Manifest, read_shard

__all__ = ["RowJoin", "ScoreSums", "Scores", "ShardChunks", "ValSet", "ValSource", "agreement_hits",
           "evaluate_classifier", "predict", "score_models", "scores", "sizes_of", "top1", "top1_hits"]


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


class Scores(NamedTuple):
    """Means over the evaluated images; ``agreement``/``kl`` are NaN without teacher logits."""

    top1: float
    agreement: float
    kl: float  # KL(teacher ‖ model) at τ = 1, nats per image


class ScoreSums:
    """The sums behind :class:`Scores`, added one chunk of images at a time: hits, agreements
    with the teacher and KL(teacher ‖ model) at τ = 1, so a split of any size is scored with
    the memory of one chunk."""

    def __init__(self) -> None:
        self.count = 0
        self.hits = 0.0
        self.agreements = 0.0
        self.kl = 0.0
        self.with_teacher = True  # every chunk so far came with teacher logits

    def add(self, logits: Tensor, labels: Tensor, teacher_logits: Tensor | None) -> ScoreSums:
        """Add a chunk: ``logits`` (n, C), ``labels`` (n,), ``teacher_logits`` (n, C) or None."""
        self.count += len(labels)
        self.hits += float(top1_hits(logits, labels).sum())
        if teacher_logits is None:
            self.with_teacher = False
            return self
        t = teacher_logits.float()
        self.agreements += float(agreement_hits(logits, t).sum())
        self.kl += float(F.kl_div(logits.float().log_softmax(-1), t.log_softmax(-1), log_target=True,
                                  reduction="sum"))
        return self

    def result(self) -> Scores:
        """Means over every image added (NaN for none; agreement/KL NaN if a chunk had no teacher)."""
        if not self.count:
            return Scores(top1=math.nan, agreement=math.nan, kl=math.nan)
        n = self.count
        if not self.with_teacher:
            return Scores(top1=self.hits / n, agreement=math.nan, kl=math.nan)
        return Scores(top1=self.hits / n, agreement=self.agreements / n, kl=self.kl / n)


def scores(logits: Tensor, labels: Tensor, teacher_logits: Tensor | None) -> Scores:
    """Top-1, top-1 agreement with the teacher and KL(teacher ‖ model) at τ = 1 of ``logits``."""
    return ScoreSums().add(logits, labels, teacher_logits).result()


class ValSet(NamedTuple):
    """Clean-view evaluation data, held: uint8 images (a device batch of same-size images, or
    n host images of any sizes), their view boxes (n, 5) (None: each model's own clean view),
    labels (n,) and teacher logits (n, C) float32 (None: no teacher) on the device. It is its
    own single chunk; :class:`ShardChunks` streams a split as one such chunk per shard."""

    images: Tensor | list[Tensor]  # (n, C, H, W) uint8, or n × (C, H_i, W_i)
    views: Tensor | None  # (n, 5) clean view boxes
    labels: Tensor  # (n,)
    teacher_logits: Tensor | None  # (n, C) float32

    def chunks(self) -> Iterator[ValSet]:
        yield self


class ValSource(Protocol):
    """Where evaluation data comes from: a held :class:`ValSet` or a streamed :class:`ShardChunks`."""

    def chunks(self) -> Iterator[ValSet]: ...


class RowJoin(Protocol):
    """What a streamed chunk joins to its rows ``start:stop`` of labels (n,) (numpy): each
    row's view box (n, 5) and the teacher's logits (n, C) on the device
    (:class:`pipeline.cache.join.CleanViewJoin` reads them from a teacher cache)."""

    def __call__(self, start: int, stop: int, labels: np.ndarray) -> tuple[Tensor, Tensor]: ...


class ShardChunks:
    """A split streamed one shard at a time: memory holds one shard, whatever the split's size.

    Each chunk is a shard's decoded images and labels; with a ``join``, also the rows' view
    boxes and teacher logits (the cache's clean view and the teacher's outputs on it). Without
    one, models see their own clean views and there is no teacher."""

    def __init__(self, manifest: Manifest, split: str, device: torch.device, join: RowJoin | None = None) -> None:
        self.manifest, self.split, self.device, self.join = manifest, split, device, join

    def chunks(self) -> Iterator[ValSet]:
        for shard in self.manifest.split(self.split)["shards"]:
            a, b = shard["start"], shard["stop"]
            block = read_shard(self.manifest.root / shard["file"], mode=self.manifest.mode, start=a, stop=b)
            views, teacher_logits = self.join(a, b, block.labels) if self.join is not None else (None, None)
            yield ValSet(images=held_images(block, self.manifest, self.device), views=views,
                         labels=torch.from_numpy(block.labels).to(self.device), teacher_logits=teacher_logits)


def score_models(models: Mapping[str, tuple[nn.Module, Preprocess]], source: ValSource, *, batch_size: int,
                 channels_last: bool = False) -> tuple[dict[str, Scores], Scores]:
    """Scores of every named ``(model, preprocess)``, and the teacher's own (its top-1), over
    ``source``: each chunk is read once for all the models and dropped before the next."""
    sums = {name: ScoreSums() for name in models}
    teacher = ScoreSums()
    for chunk in source.chunks():
        for name, (model, preprocess) in models.items():
            logits = predict(model, chunk.images, preprocess=preprocess, batch_size=batch_size, views=chunk.views,
                             channels_last=channels_last)
            sums[name].add(logits, chunk.labels, chunk.teacher_logits)
        if chunk.teacher_logits is not None:
            teacher.add(chunk.teacher_logits, chunk.labels, chunk.teacher_logits)
    return {name: s.result() for name, s in sums.items()}, teacher.result()


def evaluate_classifier(model: nn.Module, source: ValSource, *, preprocess: Preprocess, batch_size: int,
                        channels_last: bool = False) -> Scores:
    """Top-1, top-1 agreement with the teacher and KL(teacher ‖ model) at τ = 1 of ``model``
    (a deployed student, or ``Student.backbone``) over ``source``'s views."""
    return score_models({"model": (model, preprocess)}, source, batch_size=batch_size,
                        channels_last=channels_last)[0]["model"]
