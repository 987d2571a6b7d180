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

__all__ = ["LossWeights", "feature_ramp", "method_loss", "rdm_weight_tensor"]


@dataclass(frozen=True)
class LossWeights:
    """What the student loss needs (DESIGN §2): τ, α (KD), λ_CE, λ_KL, λ_n (null: all 1),
    β (feature weight), λ_I (rate weight), KD-dropout rate, the feature distance, the
    comparative-KD weight (added to any method when > 0), the β warm-up (the fraction of the
    run's steps over which β rises linearly from 0; 0: β from the first step), and the
    feature normalisation: ``global`` compares û with the targets divided by the teacher
    embedding's RMS over the cache (û unnormalised); ``sample`` divides û and every target by
    its own RMS, so the distance is 2 − 2·cos (bounded, invariant to either side's scale)."""

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
    feature_warmup: float = 0.0
    feature_norm: str = "global"


def _unit_rms(x: Tensor) -> Tensor:
    """Each vector (last dim) divided by its own RMS: (..., D) → (..., D), float32."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True).clamp_min(1e-12))


def feature_ramp(weights: LossWeights, step: int, total_steps: int) -> float:
    """The factor on β at global step ``step`` (0-based) of ``total_steps``: linear from
    1/warm-up-steps to 1 over ``feature_warmup · total_steps`` steps, then 1."""
    warm = weights.feature_warmup * total_steps
    return 1.0 if warm <= 0 else min(1.0, (step + 1) / warm)


def rdm_weight_tensor(weights: LossWeights, num_rdms: int, device: torch.device) -> Tensor:
    """λ_n as a (M,) float32 tensor on ``device`` (built once per run, not per step)."""
    values = weights.rdm_weights if weights.rdm_weights is not None else (1.0,) * num_rdms
    if len(values) != num_rdms:
        raise ValueError(f"distill.rdm_weights has {len(values)} values but the RDM cache holds {num_rdms} RDMs; "
                         "give one weight per RDM, or null")
    return torch.tensor(values, dtype=torch.float32, device=device)


def method_loss(
    method: str, *, out: StudentOutput, batch: Batch, weights: LossWeights, rdm_weights: Tensor,
    emb_scale: float, generator: torch.Generator, ramp: float = 1.0,
) -> Tensor:
    """The training loss of ``method`` on one batch (a scalar, float32).

    ``rdm_weights`` (M,) from :func:`rdm_weight_tensor`; embeddings are compared divided by
    ``emb_scale``; ``generator`` draws the KD-dropout mask and the comparative-KD pairs (on its
    device: a generator on the training device costs no host sync); ``ramp`` multiplies β
    (see :func:`feature_ramp`).
    """
    logits = out.logits.float()
    w = weights
    labels = batch.labels
    if batch.mix_labels is not None:  # mixed views: λ · one-hot(label) + (1 − λ) · one-hot(partner's label)
        partner_labels, lam = batch.mix_labels
        c = logits.shape[-1]
        lam = lam.float()[:, None]
        labels = lam * F.one_hot(batch.labels, c).float() + (1.0 - lam) * F.one_hot(partner_labels, c).float()
    if method == "ce":
        loss = F.cross_entropy(logits, labels)
    elif method == "kd":
        loss = hinton_kd(student_logits=logits, teacher_logits=batch.teacher_logits, labels=labels,
                         temperature=w.temperature, alpha=w.kd_alpha, teacher_kept=batch.teacher_kept).total
    elif method in ("dgkd", "cifd"):
        m = 0 if batch.rdm_logits is None else batch.rdm_logits.shape[0]
        if rdm_weights.shape[0] != m:
            raise ValueError(f"{rdm_weights.shape[0]} RDM weights for a batch with targets of {m} RDMs")
        keep = kd_dropout_mask(num_targets=1 + m, rate=w.kd_dropout, generator=generator, device=logits.device)
        rdm_logits = batch.rdm_logits if batch.rdm_logits is not None else logits.new_zeros(0, *logits.shape)
        if method == "dgkd":
            loss = dgkd_loss(student_logits=logits, labels=labels, teacher_logits=batch.teacher_logits,
                             assistant_logits=rdm_logits, assistant_weights=rdm_weights, ce_weight=w.ce_weight,
                             kl_weight=w.kl_weight, temperature=w.temperature, keep=keep).total
        else:
            if out.projected is None:
                raise ValueError("method 'cifd' needs the student's embedding projected to the teacher's width")
            assert batch.teacher_emb is not None  # target_fields reads embeddings for the feature methods
            x = batch.teacher_emb.float() / emb_scale
            xr = batch.rdm_emb.float() / emb_scale if batch.rdm_emb is not None else x.new_zeros(0, *x.shape)
            projected = out.projected.float()
            if w.feature_norm == "sample":
                x, xr, projected = _unit_rms(x), _unit_rms(xr), _unit_rms(projected)
            loss = cifd_loss(student_logits=logits, labels=labels, teacher_logits=batch.teacher_logits,
                             rdm_logits=rdm_logits, student_embedding_proj=projected,
                             teacher_embedding=x, rdm_embeddings=xr, student_bits=out.bits, rdm_weights=rdm_weights,
                             ce_weight=w.ce_weight, kl_weight=w.kl_weight, temperature=w.temperature,
                             feature_weight=w.feature_weight * ramp, rate_weight=w.rate_weight,
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
