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

from pipeline.losses.comparative import comparative_kd
from pipeline.losses.core import DISTORTIONS
from pipeline.losses.kd import (
    KDLoss,
    feature_distortion,
    hinton_kd,
    kd_dropout_mask,
    kd_kl,
)
from pipeline.losses.multi_target import CIFDLoss, cifd_loss, dgkd_loss

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
