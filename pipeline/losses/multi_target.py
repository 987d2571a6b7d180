"""Multi-target distillation: the CIFD student loss and DGKD (CIFD without features or rate)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from pipeline.losses.core import (
    _ce,
    _check_distortion,
    _check_labels,
    _check_pair,
    _check_temperature,
    _check_weight,
    _distortion_per_target,
    _kl_per_target,
)


class CIFDLoss(NamedTuple):
    """CIFD / DGKD student loss and its unweighted parts (all float32).

    ``kl_teacher``/``kl_rdm`` include ``τ²`` (each equals :func:`kd_kl` for that target),
    but not ``λ_KL`` or ``λ_n``. ``feat_*`` are raw distortions (no ``β``, no ``λ_n``),
    ``rate`` is the batch-mean student bits (no ``λ_I``). Parts of dropped targets are
    still reported, for logging; only ``total`` excludes them. Parts stay attached to the
    graph: call ``.detach()`` / ``.item()`` before logging.
    """

    total: Tensor  # ()
    ce: Tensor  # ()
    kl_teacher: Tensor  # ()
    kl_rdm: Tensor  # (M,)
    feat_teacher: Tensor  # ()
    feat_rdm: Tensor  # (M,)
    rate: Tensor  # ()


def cifd_loss(
    *,
    student_logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor,
    rdm_logits: Tensor,
    student_embedding_proj: Tensor | None,
    teacher_embedding: Tensor | None,
    rdm_embeddings: Tensor | None,
    student_bits: Tensor | None,
    rdm_weights: Tensor | Sequence[float],
    ce_weight: float,
    kl_weight: float,
    temperature: float,
    feature_weight: float,
    rate_weight: float,
    distortion: str,
    keep: Tensor | None,
) -> CIFDLoss:
    """CIFD student loss (DESIGN.md §2)::

        λ_CE·CE(z_s, y)
        + λ_KL·τ²·[KL(T‖S) + Σ_n λ_n·KL(RDM_n‖S)]
        + β·[dist(û, x) + Σ_n λ_n·dist(û, x̂_n)]
        + λ_I·mean(rate_s)

    Args (all keyword-only; B batch, C classes, D teacher width, M RDMs, M may be 0):
        student_logits: (B, C).
        labels: class ids (B,) or soft labels (B, C).
        teacher_logits: (B, C); detached.
        rdm_logits: (M, B, C); detached.
        student_embedding_proj: ``û`` (B, D), or None to skip all feature terms.
        teacher_embedding: ``x`` (B, D); required iff ``student_embedding_proj`` is given.
        rdm_embeddings: ``x̂`` (M, B, D); required iff ``student_embedding_proj`` is given
            and M > 0 (None or (0, B, D) when M = 0).
        student_bits: IBM rate per sample (B,), or None for no rate term. Not detached.
        rdm_weights: ``λ_n``, (M,), each >= 0.
        ce_weight, kl_weight, feature_weight, rate_weight: ``λ_CE, λ_KL, β, λ_I`` (>= 0).
        temperature: ``τ`` > 0.
        distortion: ``"mse"`` or ``"smooth_l1"``.
        keep: bool (1+M,) from :func:`kd_dropout_mask`, targets in order
            [teacher, rdm_1..rdm_M], applied to both their KL and feature terms;
            None keeps all. A dropped target contributes 0 to ``total``.

    Returns:
        :class:`CIFDLoss`, all float32.
    """
    # ---- shapes and arguments
    _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    batch, num_classes = student_logits.shape
    _check_labels(labels, batch, num_classes)
    if rdm_logits.ndim != 3 or tuple(rdm_logits.shape[1:]) != (batch, num_classes):
        raise ValueError(
            f"rdm_logits must have shape (M, {batch}, {num_classes}) (M may be 0), got {tuple(rdm_logits.shape)}"
        )
    num_rdm = rdm_logits.shape[0]
    _check_temperature(temperature)
    for name, value in (
        ("ce_weight", ce_weight),
        ("kl_weight", kl_weight),
        ("feature_weight", feature_weight),
        ("rate_weight", rate_weight),
    ):
        _check_weight(name, value)
    _check_distortion(distortion, "distortion")
    device = student_logits.device

    lam = torch.as_tensor(rdm_weights, dtype=torch.float32)
    if lam.shape != (num_rdm,):
        raise ValueError(f"rdm_weights must have shape ({num_rdm},), one λ_n per RDM; got {tuple(lam.shape)}")
    if lam.device.type == "cpu" and (not bool(torch.isfinite(lam).all()) or bool((lam < 0).any())):
        # Value check only on host tensors, where it costs no device sync.
        raise ValueError(f"rdm_weights must be finite and >= 0, got {lam.tolist()}")
    lam = lam.to(device)

    if keep is None:
        keep_f = torch.ones(1 + num_rdm, dtype=torch.float32, device=device)
    else:
        if keep.dtype != torch.bool or keep.shape != (1 + num_rdm,):
            raise ValueError(
                f"keep must be a bool mask of shape ({1 + num_rdm},) for [teacher, rdm_1..rdm_{num_rdm}] "
                f"(see kd_dropout_mask), got shape {tuple(keep.shape)} dtype {keep.dtype}"
            )
        keep_f = keep.to(device=device, dtype=torch.float32)
    target_w = torch.cat([keep_f.new_ones(1), lam]) * keep_f  # (1+M,) effective weight per target

    use_features = student_embedding_proj is not None
    if use_features:
        if student_embedding_proj.ndim != 2 or student_embedding_proj.shape[0] != batch:
            raise ValueError(
                f"student_embedding_proj must have shape ({batch}, D), got {tuple(student_embedding_proj.shape)}"
            )
        width = student_embedding_proj.shape[1]
        if teacher_embedding is None:
            raise ValueError(
                "teacher_embedding is None but student_embedding_proj is given; pass the cached teacher "
                "embedding (B, D), or pass student_embedding_proj=None to skip feature terms"
            )
        if tuple(teacher_embedding.shape) != (batch, width):
            raise ValueError(
                f"teacher_embedding must have shape ({batch}, {width}) to match student_embedding_proj, "
                f"got {tuple(teacher_embedding.shape)}"
            )
        if rdm_embeddings is None:
            if num_rdm > 0:
                raise ValueError(
                    f"rdm_embeddings is None but there are M={num_rdm} RDMs and feature terms are on; "
                    f"pass x̂ of shape ({num_rdm}, {batch}, {width})"
                )
            rdm_embeddings = teacher_embedding.new_zeros(0, batch, width)
        if tuple(rdm_embeddings.shape) != (num_rdm, batch, width):
            raise ValueError(
                f"rdm_embeddings must have shape ({num_rdm}, {batch}, {width}) (M, B, D), "
                f"got {tuple(rdm_embeddings.shape)}"
            )
    elif teacher_embedding is not None or rdm_embeddings is not None:
        raise ValueError(
            "teacher_embedding/rdm_embeddings were given but student_embedding_proj is None; pass the "
            "student's projected embedding û, or None for all three to skip feature terms"
        )
    if student_bits is not None and tuple(student_bits.shape) != (batch,):
        raise ValueError(f"student_bits must have shape ({batch},) (bits per sample), got {tuple(student_bits.shape)}")

    zero = torch.zeros((), dtype=torch.float32, device=device)

    # ---- terms
    ce = _ce(student_logits, labels)
    targets = torch.cat([teacher_logits.detach().float().unsqueeze(0), rdm_logits.detach().float()])  # (1+M, B, C)
    kl = _kl_per_target(student_logits, targets, temperature)  # (1+M,)
    total = ce_weight * ce + kl_weight * (target_w * kl).sum()

    if use_features:
        feat_targets = torch.cat(
            [teacher_embedding.detach().float().unsqueeze(0), rdm_embeddings.detach().float()]
        )  # (1+M, B, D)
        feat = _distortion_per_target(student_embedding_proj, feat_targets, distortion)  # (1+M,)
        total = total + feature_weight * (target_w * feat).sum()
    else:
        feat = torch.zeros(1 + num_rdm, dtype=torch.float32, device=device)

    if student_bits is not None:
        rate = student_bits.float().mean()
        total = total + rate_weight * rate
    else:
        rate = zero

    return CIFDLoss(
        total=total,
        ce=ce,
        kl_teacher=kl[0],
        kl_rdm=kl[1:],
        feat_teacher=feat[0],
        feat_rdm=feat[1:],
        rate=rate,
    )


def dgkd_loss(
    *,
    student_logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor,
    assistant_logits: Tensor,
    assistant_weights: Tensor | Sequence[float],
    ce_weight: float,
    kl_weight: float,
    temperature: float,
    keep: Tensor | None,
) -> CIFDLoss:
    """DGKD-style multi-target KD: :func:`cifd_loss` without feature or rate terms.

    ``assistant_logits`` (M, B, C) are the extra KL targets (RDM heads or real teacher
    assistants); ``keep`` (1+M,) is the KD-dropout mask over [teacher, assistants].
    ``feat_*`` and ``rate`` in the result are zeros.
    """
    return cifd_loss(
        student_logits=student_logits,
        labels=labels,
        teacher_logits=teacher_logits,
        rdm_logits=assistant_logits,
        student_embedding_proj=None,
        teacher_embedding=None,
        rdm_embeddings=None,
        student_bits=None,
        rdm_weights=assistant_weights,
        ce_weight=ce_weight,
        kl_weight=kl_weight,
        temperature=temperature,
        feature_weight=0.0,
        rate_weight=0.0,
        distortion="mse",
        keep=keep,
    )
