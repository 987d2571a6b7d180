"""Distillation losses: Hinton KD, CIFD / DGKD multi-target KD, comparative KD.

Pure functions, tensors in, tensors out. Every argument is keyword-only so the student
and the teacher can never be swapped by position. Targets (teacher, RDM outputs) are
always detached: gradients reach only the student. Softmax / KL / distortion math runs in
float32 whatever the input dtype, so bf16 autocast outputs give float32 losses.

Notation (DESIGN.md §2): ``z_s`` student logits, ``z_T`` teacher logits, ``ẑ_n`` RDM ``n``
logits, ``x`` teacher embedding, ``x̂_n`` RDM ``n`` reconstruction, ``û`` the student's
IBM-noisy embedding projected to the teacher width, ``τ`` the temperature.
``KL(p‖q)`` has the target ``p`` first.

Shapes are checked on the host (no device sync); label *values* are not, so an out-of-range
label surfaces as torch's own error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DISTORTIONS",
    "CIFDLoss",
    "KDLoss",
    "cifd_loss",
    "comparative_kd",
    "dgkd_loss",
    "feature_distortion",
    "hinton_kd",
    "kd_dropout_mask",
    "kd_kl",
]

DISTORTIONS = ("mse", "smooth_l1")


class KDLoss(NamedTuple):
    """Hinton KD: ``total = (1-α)·ce + α·kd``; ``kd`` already includes ``τ²``."""

    total: Tensor
    ce: Tensor
    kd: Tensor


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


# ---------------------------------------------------------------- argument checks


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


def kd_kl(*, student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``τ² · KL(softmax(z_T/τ) ‖ softmax(z_S/τ))``, batch mean, float32 scalar.

    Zero when student and teacher logits agree; the teacher side is detached.
    """
    _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    _check_temperature(temperature)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def hinton_kd(
    *, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float, alpha: float
) -> KDLoss:
    """Hinton et al. 2015: ``(1-α)·CE(z_s, y) + α·τ²·KL(T‖S)``.

    ``labels`` are class ids (B,) or soft labels (B, C) (e.g. mixup).
    """
    _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    _check_labels(labels, *student_logits.shape)
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1] (weight of the KD term), got {alpha!r}")
    ce = _ce(student_logits, labels)
    kd = kd_kl(student_logits=student_logits, teacher_logits=teacher_logits, temperature=temperature)
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


# ---------------------------------------------------------------- CIFD / DGKD


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


# ---------------------------------------------------------------- comparative KD


def comparative_kd(
    *,
    student_logits: Tensor,
    teacher_logits: Tensor,
    generator: torch.Generator | None = None,
    temperature: float | None = None,
) -> Tensor:
    """Comparative KD pair term: student differences match teacher differences.

    Each sample ``i`` is paired with a partner ``j = π(i)`` from the same batch and the
    loss is ``mean_i MSE(z_s[i] - z_s[j], z_T[i] - z_T[j])``, float32 scalar. With a
    ``generator``, ``π`` is a uniformly random cyclic permutation (no fixed points for
    B >= 2); without one, ``π(i) = i+1 mod B`` (deterministic, no global RNG; batches are
    shuffled anyway). B = 1 gives 0 (still attached to the graph). With ``temperature``,
    the differences are taken on ``log_softmax(z/τ)`` instead of raw logits (so a per-row
    logit shift does not count). Invariant to a shift shared by all rows. Teacher detached.
    """
    _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    if temperature is not None:
        _check_temperature(temperature)
    zs = student_logits.float()
    zt = teacher_logits.detach().float()
    if temperature is not None:
        zs = F.log_softmax(zs / temperature, dim=-1)
        zt = F.log_softmax(zt / temperature, dim=-1)
    batch = zs.shape[0]
    if batch == 1:
        return (zs * 0.0).sum()
    if generator is None:
        order = torch.arange(batch, device=zs.device)
    else:
        order = torch.randperm(batch, generator=generator, device=generator.device).to(zs.device)
    # Visit samples in `order` and pair each with the next one on the cycle: a derangement.
    partner = torch.empty_like(order)
    partner[order] = torch.roll(order, -1)
    diff_s = zs - zs[partner]  # (B, C)
    diff_t = zt - zt[partner]  # (B, C)
    return F.mse_loss(diff_s, diff_t)
