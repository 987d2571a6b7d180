"""Single-teacher distillation: Hinton KD, the KD KL term, feature distortion, KD dropout."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.losses.core import (
    _ce,
    _check_distortion,
    _check_labels,
    _check_pair,
    _check_temperature,
    _distortion_per_target,
)


class KDLoss(NamedTuple):
    """Hinton KD: ``total = (1-α)·ce + α·kd``; ``kd`` already includes ``τ²``."""

    total: Tensor
    ce: Tensor
    kd: Tensor


def kd_kl(*, student_logits: Tensor, teacher_logits: Tensor, temperature: float, kept: Tensor | None = None) -> Tensor:
    """``τ² · KL(softmax(z_T/τ) ‖ softmax(z_S/τ))``, batch mean, float32 scalar.

    Zero when student and teacher logits agree; the teacher side is detached. ``kept``
    (B, k) int64 class ids (a top-k cache): the KL of the two distributions renormalised
    over each row's kept classes, ``softmax(z_T[kept]/τ) ‖ softmax(z_S[kept]/τ)`` (only the
    kept teacher logits matter; with every class kept it is the full KL).
    """
    _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    _check_temperature(temperature)
    if kept is not None:
        if kept.ndim != 2 or kept.shape[0] != student_logits.shape[0]:
            raise ValueError(f"kept must be (B, k) class ids with B = {student_logits.shape[0]}, "
                             f"got shape {tuple(kept.shape)}")
        student_logits, teacher_logits = student_logits.gather(1, kept), teacher_logits.gather(1, kept)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def hinton_kd(
    *, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float, alpha: float,
    teacher_kept: Tensor | None = None,
) -> KDLoss:
    """Hinton et al. 2015: ``(1-α)·CE(z_s, y) + α·τ²·KL(T‖S)``.

    ``labels`` are class ids (B,) or soft labels (B, C) (e.g. mixup). ``teacher_kept``: the
    KL over a top-k cache's kept classes (:func:`kd_kl`'s ``kept``).
    """
    _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    _check_labels(labels, *student_logits.shape)
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1] (weight of the KD term), got {alpha!r}")
    ce = _ce(student_logits, labels)
    kd = kd_kl(student_logits=student_logits, teacher_logits=teacher_logits, temperature=temperature,
               kept=teacher_kept)
    return KDLoss(total=(1.0 - alpha) * ce + alpha * kd, ce=ce, kd=kd)


def feature_distortion(*, student: Tensor, target: Tensor, kind: str) -> Tensor:
    """Mean ``dist(student, target)``: ``"mse"`` or ``"smooth_l1"`` (β=1), float32 scalar.

    The target is detached. Shapes must match exactly (no broadcasting).
    """
    _check_distortion(kind)
    if student.shape != target.shape:
        raise ValueError(
            f"feature_distortion: student shape {tuple(student.shape)} does not match target shape "
            f"{tuple(target.shape)}; project the student embedding to the target width first"
        )
    return _distortion_per_target(student, target.detach().unsqueeze(0), kind)[0]


def kd_dropout_mask(
    *, num_targets: int, rate: float, generator: torch.Generator | None, device: torch.device | str | None = None
) -> Tensor:
    """DGKD-style "KD dropout": bool (num_targets,), True = keep.

    Each target is dropped independently with probability ``rate``. ``rate=0`` keeps all
    and ``rate=1`` drops all; neither needs a generator. Any other rate draws from
    ``generator`` only (no global RNG), so it is required then. The draw happens on the
    generator's device and the mask is moved to ``device`` (default: that device).
    """
    if not (isinstance(num_targets, int) and num_targets >= 0):
        raise ValueError(f"num_targets must be an int >= 0, got {num_targets!r}")
    if not (isinstance(rate, (int, float)) and 0.0 <= rate <= 1.0):
        raise ValueError(f"rate must be a probability in [0, 1], got {rate!r}")
    if rate == 0.0 or rate == 1.0:
        if device is None and generator is not None:
            device = generator.device
        return torch.full((num_targets,), rate == 0.0, dtype=torch.bool, device=device)
    if generator is None:
        raise ValueError(
            f"kd_dropout_mask with rate={rate} needs a torch.Generator (no global RNG); "
            "pass generator=torch.Generator().manual_seed(seed)"
        )
    u = torch.rand(num_targets, generator=generator, device=generator.device)
    keep = u >= rate  # P(drop) = P(u < rate) = rate
    return keep if device is None else keep.to(device)
