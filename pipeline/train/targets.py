"""Stage three's targets: the cached teacher (and RDM) outputs of every (row, view), and
their gather for a batch of (row, view) pairs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline.cache.rdm_store import RdmCache
from pipeline.cache.reader import TeacherCache
from pipeline.train.student import uses_features, uses_rdms
from schemas import layout as L

__all__ = ["Batch", "Targets", "gather_targets", "load_targets"]


@dataclass(frozen=True)
class Targets:
    """Cached per-(row, view) targets, row-aligned, on the training device."""

    views: Tensor  # (N, V, 5) float32
    labels: Tensor  # (N,) int64
    teacher_logits: Tensor  # (N, V, C) float32
    teacher_emb: Tensor  # (N, V, D) float16
    rdm_logits: Tensor | None  # (N, V, M, C) float32
    rdm_emb: Tensor | None  # (N, V, M, D) float16
    emb_scale: float  # embeddings are compared divided by this (the teacher embedding RMS)

    @property
    def num_rows(self) -> int:
        return self.views.shape[0]

    @property
    def num_views(self) -> int:
        return self.views.shape[1]

    @property
    def num_rdms(self) -> int:
        return 0 if self.rdm_logits is None else self.rdm_logits.shape[2]


@dataclass(frozen=True)
class Batch:
    """The targets of one batch of (row, view) pairs."""

    labels: Tensor  # (B,)
    teacher_logits: Tensor  # (B, C)
    teacher_emb: Tensor  # (B, D)
    rdm_logits: Tensor | None  # (M, B, C)
    rdm_emb: Tensor | None  # (M, B, D)


def gather_targets(targets: Targets, rows: Tensor, views: Tensor) -> Batch:
    """Targets of (row, view) pairs; ``rows``/``views`` (B,) on the targets' device."""
    rdm_logits = targets.rdm_logits[rows, views].transpose(0, 1) if targets.rdm_logits is not None else None
    rdm_emb = targets.rdm_emb[rows, views].transpose(0, 1) if targets.rdm_emb is not None else None
    return Batch(labels=targets.labels[rows], teacher_logits=targets.teacher_logits[rows, views],
                 teacher_emb=targets.teacher_emb[rows, views], rdm_logits=rdm_logits, rdm_emb=rdm_emb)


def load_targets(cache: TeacherCache, rdm: RdmCache | None, *, method: str, device: torch.device) -> Targets:
    """The train split's targets for ``method``, read shard by shard and moved to ``device``.

    The embedding scale is the one the RDMs were trained with when ``method`` uses the RDM
    cache (``rdm`` is then required), else the RMS of the cached train embeddings.
    """
    split = cache.split("train")
    train = split.read_all((L.VIEWS, L.LABELS, L.LOGITS, L.EMBEDDINGS))
    rdm_logits = rdm_emb = None
    if uses_rdms(method):
        if rdm is None:
            raise ValueError(f"method {method!r} learns from the RDM cache, but none was given")
        fields = (L.RDM_LOGITS, L.RDM_X_HAT) if uses_features(method) else (L.RDM_LOGITS,)
        block = rdm.split("train").read_all(fields)
        rdm_logits = torch.from_numpy(block[L.RDM_LOGITS]).to(device)
        rdm_emb = torch.from_numpy(block[L.RDM_X_HAT]).to(device) if uses_features(method) else None
        scale = rdm.embedding_scale
    else:
        scale = split.rms(L.EMBEDDINGS) or 1.0
    return Targets(
        views=torch.from_numpy(train[L.VIEWS]).to(device), labels=torch.from_numpy(train[L.LABELS]).to(device),
        teacher_logits=torch.from_numpy(train[L.LOGITS].astype(np.float32)).to(device),
        teacher_emb=torch.from_numpy(train[L.EMBEDDINGS]).to(device), rdm_logits=rdm_logits, rdm_emb=rdm_emb,
        emb_scale=scale,
    )
