"""Reference math for the loss tests, written out with exp / log / sums in float64.

Independent of ``torch.nn.functional`` and of ``pipeline.losses``: tests take their
expected values from here (tests/ is on ``sys.path`` through its ``conftest.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def log_softmax(z: Tensor) -> Tensor:
    """``z − log Σ exp z`` over the last dim, in float64 (max-shifted)."""
    z = z.double()
    shifted = z - z.max(dim=-1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()


def kl(target_logits: Tensor, student_logits: Tensor, tau: float) -> Tensor:
    """``τ² · mean_b Σ_c p (log p − log q)``, p = softmax(target/τ), q = softmax(student/τ)."""
    log_p = log_softmax(target_logits.double() / tau)
    log_q = log_softmax(student_logits.double() / tau)
    return tau**2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def ce(logits: Tensor, labels: Tensor) -> Tensor:
    """``−mean_b log softmax(z_b)[y_b]`` (class ids) or ``−mean_b Σ_c y_bc log softmax(z_b)_c``."""
    log_q = log_softmax(logits)
    if labels.ndim == 1:
        return -log_q[torch.arange(len(labels)), labels.long()].mean()
    return -(labels.double() * log_q).sum(-1).mean()


def dist(u: Tensor, x: Tensor, kind: str = "mse") -> Tensor:
    """Mean over all elements of ``(u−x)²`` (mse) or Huber with β=1 (smooth_l1):
    ``½d²`` where ``|d| < 1``, else ``|d| − ½``."""
    d = u.double() - x.double()
    if kind == "mse":
        return (d * d).mean()
    return torch.where(d.abs() < 1, 0.5 * d * d, d.abs() - 0.5).mean()


def comparative(student_logits: Tensor, teacher_logits: Tensor, cycle: Tensor) -> Tensor:
    """``mean_{i,c} ((z_s[i] − z_s[j]) − (z_T[i] − z_T[j]))²`` with ``j`` the successor of
    ``i`` on the cycle that visits the rows in the order ``cycle``."""
    zs, zt = student_logits.double(), teacher_logits.double()
    order = cycle.tolist()
    total = 0.0
    for k, i in enumerate(order):
        j = order[(k + 1) % len(order)]
        total = total + (((zs[i] - zs[j]) - (zt[i] - zt[j])) ** 2).sum()
    return total / zs.numel()
