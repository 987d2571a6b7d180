"""Comparative KD: on pairs of samples, student differences match teacher differences."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.losses.core import _check_pair, _check_temperature


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
