"""The optimizer and the one-cycle schedule every training loop builds from ``OptimConfig``."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from schemas.config import OptimConfig

__all__ = ["clip_gradients", "make_optimizer", "make_scheduler"]


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
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=optim.lr, total_steps=max(1, total_steps),
                                               pct_start=optim.pct_start, cycle_momentum=optim.cycle_momentum)


def clip_gradients(params: Iterable[torch.nn.Parameter], optim: OptimConfig) -> None:
    """Clip the global gradient norm to ``optim.grad_clip`` (no-op when null)."""
    if optim.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
