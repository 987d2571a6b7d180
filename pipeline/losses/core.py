"""Shared pieces of the losses: argument checks and float32 primitives (KL per target,
distortion per target, cross-entropy with hard or soft labels)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DISTORTIONS = ("mse", "smooth_l1")


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_weight(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_logits(name: str, logits: Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"{name} must have shape (B, C), got {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(logits.shape)}); B must be >= 1")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {logits.dtype}")


def _check_pair(student_name: str, student: Tensor, target_name: str, target: Tensor) -> None:
    _check_logits(student_name, student)
    if target.shape != student.shape:
        raise ValueError(
            f"{target_name} shape {tuple(target.shape)} does not match {student_name} shape "
            f"{tuple(student.shape)}; both must be (B, C) for the same batch and classes"
        )


def _check_labels(labels: Tensor, batch: int, num_classes: int) -> None:
    if labels.ndim == 1:
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"labels of shape (B,) must hold integer class ids, got dtype {labels.dtype}")
        if labels.shape[0] != batch:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} does not match batch size {batch}; expected ({batch},)"
            )
    elif labels.ndim == 2:
        if not labels.is_floating_point() or tuple(labels.shape) != (batch, num_classes):
            raise ValueError(
                f"soft labels must be float probabilities of shape ({batch}, {num_classes}), "
                f"got {tuple(labels.shape)} {labels.dtype}"
            )
    else:
        raise ValueError(
            f"labels must be class ids (B,) or soft labels (B, C); got shape {tuple(labels.shape)} "
            f"for B={batch}, C={num_classes}"
        )


def _check_distortion(kind: str, name: str = "kind") -> None:
    if kind not in DISTORTIONS:
        raise ValueError(f"{name} must be one of {DISTORTIONS}, got {kind!r}")


# ---------------------------------------------------------------- primitives


def _ce(logits: Tensor, labels: Tensor) -> Tensor:
    target = labels.long() if labels.ndim == 1 else labels.float()
    return F.cross_entropy(logits.float(), target)


def _kl_per_target(student_logits: Tensor, target_logits: Tensor, temperature: float) -> Tensor:
    """``τ²·KL(softmax(t_k/τ) ‖ softmax(z_s/τ))`` batch-mean for each of K targets.

    student_logits (B, C), target_logits (K, B, C) already detached → (K,), float32.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
    log_p = F.log_softmax(target_logits.float() / temperature, dim=-1)  # (K, B, C)
    pointwise = F.kl_div(log_q.expand_as(log_p), log_p, log_target=True, reduction="none")  # (K, B, C)
    return temperature**2 * pointwise.sum(dim=(1, 2)) / student_logits.shape[0]


def _distortion_per_target(student: Tensor, targets: Tensor, kind: str) -> Tensor:
    """Mean distortion of student (B, D) against each of K targets (K, B, D) → (K,)."""
    u = student.float().expand_as(targets)
    x = targets.float()
    if kind == "mse":
        pointwise = F.mse_loss(u, x, reduction="none")
    else:
        pointwise = F.smooth_l1_loss(u, x, reduction="none")
    return pointwise.flatten(1).mean(dim=1)
