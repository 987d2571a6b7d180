"""The per-method training loss of stage three, from a small typed record of weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.losses import (
    cifd_loss,
    comparative_kd,
    dgkd_loss,
    hinton_kd,
    kd_dropout_mask,
    kd_kl,
)
from pipeline.train.student import StudentOutput
from pipeline.train.targets import Batch

__all__ = ["LossWeights", "method_loss", "rdm_weight_tensor"]


@dataclass(frozen=True)
class LossWeights:
    """What the student loss needs (DESIGN §2): τ, α (KD), λ_CE, λ_KL, λ_n (null: all 1),
    β (feature weight), λ_I (rate weight), KD-dropout rate, the feature distance, and the
    comparative-KD weight (added to any method when > 0)."""

    temperature: float
    kd_alpha: float
    ce_weight: float
    kl_weight: float
    rdm_weights: tuple[float, ...] | None
    feature_weight: float
    rate_weight: float
    kd_dropout: float
    distortion: str
    ckd_weight: float


def rdm_weight_tensor(weights: LossWeights, num_rdms: int, device: torch.device) -> Tensor:
    """λ_n as a (M,) float32 tensor on ``device`` (built once per run, not per step)."""
    values = weights.rdm_weights if weights.rdm_weights is not None else (1.0,) * num_rdms
    if len(values) != num_rdms:
        raise ValueError(f"distill.rdm_weights has {len(values)} values but the RDM cache holds {num_rdms} RDMs; "
                         "give one weight per RDM, or null")
    return torch.tensor(values, dtype=torch.float32, device=device)


def method_loss(
    method: str, *, out: StudentOutput, batch: Batch, weights: LossWeights, rdm_weights: Tensor,
    emb_scale: float, generator: torch.Generator,
) -> Tensor:
    """The training loss of ``method`` on one batch (a scalar, float32).

    ``rdm_weights`` (M,) from :func:`rdm_weight_tensor`; embeddings are compared divided by
    ``emb_scale``; ``generator`` draws the KD-dropout mask and the comparative-KD pairs.
    """
    logits = out.logits.float()
    w = weights
    if method == "ce":
        loss = F.cross_entropy(logits, batch.labels)
    elif method == "kd":
        loss = hinton_kd(student_logits=logits, teacher_logits=batch.teacher_logits, labels=batch.labels,
                         temperature=w.temperature, alpha=w.kd_alpha, teacher_kept=batch.teacher_kept).total
    elif method in ("dgkd", "cifd"):
        m = 0 if batch.rdm_logits is None else batch.rdm_logits.shape[0]
        if rdm_weights.shape[0] != m:
            raise ValueError(f"{rdm_weights.shape[0]} RDM weights for a batch with targets of {m} RDMs")
        keep = kd_dropout_mask(num_targets=1 + m, rate=w.kd_dropout, generator=generator, device=logits.device)
        rdm_logits = batch.rdm_logits if batch.rdm_logits is not None else logits.new_zeros(0, *logits.shape)
        if method == "dgkd":
            loss = dgkd_loss(student_logits=logits, labels=batch.labels, teacher_logits=batch.teacher_logits,
                             assistant_logits=rdm_logits, assistant_weights=rdm_weights, ce_weight=w.ce_weight,
                             kl_weight=w.kl_weight, temperature=w.temperature, keep=keep).total
        else:
            if out.projected is None:
                raise ValueError("method 'cifd' needs the student's embedding projected to the teacher's width")
            assert batch.teacher_emb is not None  # target_fields reads embeddings for the feature methods
            x = batch.teacher_emb.float() / emb_scale
            xr = batch.rdm_emb.float() / emb_scale if batch.rdm_emb is not None else x.new_zeros(0, *x.shape)
            loss = cifd_loss(student_logits=logits, labels=batch.labels, teacher_logits=batch.teacher_logits,
                             rdm_logits=rdm_logits, student_embedding_proj=out.projected.float(),
                             teacher_embedding=x, rdm_embeddings=xr, student_bits=out.bits, rdm_weights=rdm_weights,
                             ce_weight=w.ce_weight, kl_weight=w.kl_weight, temperature=w.temperature,
                             feature_weight=w.feature_weight, rate_weight=w.rate_weight,
                             distortion=w.distortion, keep=keep).total
        if batch.teacher_kept is not None:  # a top-k cache: the teacher's KL over its kept classes instead
            full = kd_kl(student_logits=logits, teacher_logits=batch.teacher_logits, temperature=w.temperature)
            kept = kd_kl(student_logits=logits, teacher_logits=batch.teacher_logits, temperature=w.temperature,
                         kept=batch.teacher_kept)
            loss = loss + w.kl_weight * keep[0].float() * (kept - full)
    else:
        raise ValueError(f"unknown method {method!r}; expected ce, kd, dgkd or cifd")
    if w.ckd_weight > 0:
        loss = loss + w.ckd_weight * comparative_kd(student_logits=logits, teacher_logits=batch.teacher_logits,
                                                    generator=generator)
    return loss
