"""The optimizer and the one-cycle schedule every training loop builds from ``OptimConfig``."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from schemas.config import OptimConfig

__all__ = ["clip_gradients", "make_optimizer", "make_scheduler", "one_cycle"]


def make_optimizer(params: Iterable[torch.nn.Parameter], optim: OptimConfig) -> torch.optim.Optimizer:
    """``sgd``: Nesterov SGD with ``optim.momentum``; ``adamw``: AdamW with β1 = ``optim.momentum``."""
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, nesterov=optim.momentum > 0,
                               weight_decay=optim.weight_decay)
    if optim.name == "adamw":
        return torch.optim.AdamW(params, lr=optim.lr, betas=(optim.momentum, 0.999), weight_decay=optim.weight_decay)
    raise ValueError(f"optimizer {optim.name!r}: expected 'sgd' or 'adamw'")


def make_scheduler(opt: torch.optim.Optimizer, optim: OptimConfig, *,
                   total_steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """One-cycle LR over ``total_steps`` (at least 1); the momentum stays as configured unless
    ``optim.cycle_momentum``."""
    return one_cycle(opt, max_lr=optim.lr, total_steps=total_steps, pct_start=optim.pct_start,
                     cycle_momentum=optim.cycle_momentum)


def one_cycle(opt: torch.optim.Optimizer, *, max_lr: float | list[float], total_steps: int, pct_start: float,
              cycle_momentum: bool) -> torch.optim.lr_scheduler.OneCycleLR:
    """torch's OneCycleLR over ``total_steps`` (at least 1). Its warm-up ends at step
    ``pct_start · T − 1`` and it divides by that length, so a schedule where ``pct_start · T``
    is exactly 1 (10 steps at 0.1, 5 at 0.2) fails at its first step with a ZeroDivisionError;
    there the warm-up ends half a step later instead (every other schedule is torch's own)."""
    total = max(1, total_steps)
    if abs(pct_start * total - 1.0) < 1e-9:
        pct_start += 0.5 / total
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total, pct_start=pct_start,
                                               cycle_momentum=cycle_momentum)


def clip_gradients(params: Iterable[torch.nn.Parameter], optim: OptimConfig) -> None:
    """Clip the global gradient norm to ``optim.grad_clip`` (no-op when null)."""
    if optim.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
