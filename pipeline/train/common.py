"""What every training loop and stage resolves the same way: the device and the optimizer."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_optimizer(params: Iterable[torch.nn.Parameter], *, name: str, lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """``sgd``: Nesterov SGD, momentum 0.9 (the CIFAR recipe); ``adamw`` otherwise."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer {name!r}: expected 'sgd' or 'adamw'")
