"""Stage three's targets: the cached teacher (and RDM) outputs of a (row, view) pair.

Memory mode holds every row's targets on the device (:class:`Targets`, gathered per batch
by :func:`gather_targets`); stream mode never holds a whole split: its loader workers read
the cache block of each tar they stream (:func:`target_fields` says which arrays) and
hand over each batch's :class:`Batch`. Both report the split's shape in a
:class:`TargetInfo`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline.cache.logits import LogitsFormat
from pipeline.cache.rdm_store import RdmCache, RdmHead
from pipeline.cache.reader import TeacherCache
from pipeline.data.mixup import label_lambda
from pipeline.train.student import uses_features, uses_rdms
from schemas import layout as L

__all__ = ["Batch", "TargetInfo", "Targets", "gather_targets", "load_targets", "target_fields", "target_info"]


@dataclass(frozen=True)
class TargetInfo:
    """What the loop needs to know of the targets, whatever holds them."""

    num_rows: int
    num_views: int
    num_rdms: int
    emb_scale: float  # embeddings are compared divided by this (the teacher embedding RMS)


def target_fields(method: str, logits: LogitsFormat | None = None,
                  mixed: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The teacher-cache and RDM-cache arrays ``method`` learns from (views and labels are
    always read: the boxes to render and the join check). With the cache's ``logits``
    format, the arrays that hold its logits (packed, turned into logits on the device);
    without, ``L.LOGITS`` (dense logits, computed on the host when not stored). ``mixed``: a
    cache with mixed views (their partners and mix params are read too)."""
    held = (L.LOGITS,) if logits is None else tuple(f for f in logits.fields if f != L.EMBEDDINGS)
    wants_emb = uses_features(method) or (logits is not None and L.EMBEDDINGS in logits.fields)
    teacher = (L.VIEWS, L.LABELS, *held) + ((L.EMBEDDINGS,) if wants_emb else ()) + (
        (L.MIX_PARTNER, L.MIX) if mixed else ())
    rdm = (L.RDM_X_HAT,) if uses_rdms(method) else ()  # the RDMs' logits are made from x̂ (RdmHead)
    return teacher, rdm


def target_info(cache: TeacherCache, rdm: RdmCache | None, *, method: str) -> TargetInfo:
    """The train split's shape and embedding scale, without reading its rows (the scale is
    the RDMs' when ``method`` learns from them, else one streaming RMS pass)."""
    split = cache.split("train")
    if uses_rdms(method):
        if rdm is None:
            raise ValueError(f"method {method!r} learns from the RDM cache, but none was given")
        return TargetInfo(num_rows=split.num_rows, num_views=split.num_views, num_rdms=rdm.num_rdms,
                          emb_scale=rdm.embedding_scale)
    scale = (split.rms(L.EMBEDDINGS) or 1.0) if uses_features(method) else 1.0
    return TargetInfo(num_rows=split.num_rows, num_views=split.num_views, num_rdms=0, emb_scale=scale)


@dataclass(frozen=True)
class Targets:
    """Cached per-(row, view) targets, row-aligned, on the training device."""

    views: Tensor  # (N, V, 5) float32
    labels: Tensor  # (N,) int64
    teacher_logits: Tensor  # (N, V, C) float32, or (N, V, P) packed by ``logits`` when it is packed
    teacher_emb: Tensor | None  # (N, V, D) float16, for the methods with feature losses
    rdm_emb: Tensor | None  # (N, V, M, D) float16, for the methods that learn from the RDMs
    rdm_head: RdmHead | None  # makes the RDMs' (M, B, C) logits from their x̂, on the targets' device
    emb_scale: float  # embeddings are compared divided by this (the teacher embedding RMS)
    logits: LogitsFormat | None = None  # set when teacher_logits are packed (from_head, top-k)
    mix_partner: Tensor | None = None  # (N, V) int64: a mixed-view cache's partner rows
    mix: Tensor | None = None  # (N, V, 6) float32: (λ, partner box); λ = 1 where unmixed

    @property
    def num_rows(self) -> int:
        return self.views.shape[0]

    @property
    def num_views(self) -> int:
        return self.views.shape[1]

    @property
    def num_rdms(self) -> int:
        return 0 if self.rdm_emb is None else self.rdm_emb.shape[2]

    @property
    def info(self) -> TargetInfo:
        return TargetInfo(num_rows=self.num_rows, num_views=self.num_views, num_rdms=self.num_rdms,
                          emb_scale=self.emb_scale)


@dataclass(frozen=True)
class Batch:
    """The targets of one batch of (row, view) pairs."""

    labels: Tensor  # (B,)
    teacher_logits: Tensor  # (B, C)
    teacher_emb: Tensor | None  # (B, D)
    rdm_logits: Tensor | None  # (M, B, C)
    rdm_emb: Tensor | None  # (M, B, D)
    teacher_kept: Tensor | None = None  # (B, k) int64: a top-k cache's kept classes (the KD terms run over them)
    mix_labels: tuple[Tensor, Tensor] | None = None  # mixed views: (partner labels (B,), λ (B,)); CE on the mix


def gather_targets(targets: Targets, rows: Tensor, views: Tensor, *, size: int | None = None) -> Batch:
    """Targets of (row, view) pairs; ``rows``/``views`` (B,) on the targets' device. ``size``:
    the side the views are rendered at, so a CutMix label weighs the pixels pasted there
    (None: the stored λ, right at the teacher's size)."""
    rdm_emb = targets.rdm_emb[rows, views].transpose(0, 1) if targets.rdm_emb is not None else None  # (M, B, D)
    rdm_logits = targets.rdm_head(rdm_emb) if rdm_emb is not None and targets.rdm_head is not None else None
    teacher_emb = targets.teacher_emb[rows, views] if targets.teacher_emb is not None else None
    logits, kept = targets.teacher_logits[rows, views], None
    if targets.logits is not None:  # packed: logits made here, on the targets' device
        logits, kept = targets.logits.unpack(logits)
    mix_labels = None
    if targets.mix_partner is not None and targets.mix is not None:
        params = targets.mix[rows, views]
        lam = params[:, 0] if size is None else label_lambda(params, size)
        mix_labels = (targets.labels[targets.mix_partner[rows, views]], lam)
    return Batch(labels=targets.labels[rows], teacher_logits=logits, teacher_emb=teacher_emb, rdm_logits=rdm_logits,
                 rdm_emb=rdm_emb, teacher_kept=kept, mix_labels=mix_labels)


def load_targets(cache: TeacherCache, rdm: RdmCache | None, *, method: str, device: torch.device) -> Targets:
    """Memory mode: the train split's targets for ``method``, read shard by shard and moved
    to ``device`` (for CIFAR-sized data; stream mode reads blocks in its loader instead)."""
    info = target_info(cache, rdm, method=method)
    fmt = cache.logits_format
    mixed = cache.mixup is not None
    teacher_fields, rdm_fields = target_fields(method, fmt, mixed=mixed)
    train = cache.split("train").read_all(teacher_fields)
    block = rdm.split("train").read_all(rdm_fields) if rdm is not None and rdm_fields else {}

    def held(values: np.ndarray | None, dtype: type | None = None) -> Tensor | None:
        if values is None:
            return None
        return torch.from_numpy(values.astype(dtype) if dtype is not None else values).to(device)

    packed = fmt.pack(train)  # (N, V, C) logits, or (N, V, P) from which the device makes them
    views, labels = held(train[L.VIEWS]), held(train[L.LABELS])
    logits = held(packed, None if fmt.packed else np.float32)
    assert views is not None and labels is not None and logits is not None
    emb = None
    if uses_features(method):  # from_head: the packed logits are the embeddings, held once
        emb = logits if fmt.kind == "from_head" else held(train.get(L.EMBEDDINGS))
    return Targets(views=views, labels=labels, teacher_logits=logits, teacher_emb=emb,
                   rdm_emb=held(block.get(L.RDM_X_HAT)),
                   rdm_head=rdm.head.to(device) if rdm is not None and rdm_fields else None,
                   emb_scale=info.emb_scale, logits=fmt.to(device) if fmt.packed else None,
                   mix_partner=held(train[L.MIX_PARTNER]) if mixed else None, mix=held(train[L.MIX]) if mixed else None)
