"""What every stage resolves the same way: the device, and seeds derived from a base seed."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["derived_seed", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed mixed from ``parts`` (e.g. ``(seed, epoch, rank)``), the same on any machine."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])
