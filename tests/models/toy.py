"""Tiny user models for the entrypoint tests (``"<this module>:make"``)."""

from __future__ import annotations

import torch
from torch import nn


class ToyNet(nn.Module):
    """The smallest module with the user interface: embed, classify, embed_dim."""

    def __init__(self, num_classes: int, in_chans: int, hidden: int) -> None:
        super().__init__()
        self.embed_dim = hidden
        self.num_classes = num_classes
        self.stem = nn.Conv2d(in_chans, hidden, kernel_size=3, padding=1)
        self.head = nn.Linear(hidden, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.stem(x)).mean(dim=(2, 3))  # (B, hidden)

    def classify(self, e: torch.Tensor) -> torch.Tensor:
        return self.head(e)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(x))


class NoForwardNet(ToyNet):
    """Interface only, no forward of its own."""

    forward = nn.Module.forward  # type: ignore[assignment]


class InconsistentNet(ToyNet):
    """forward(x) is not classify(embed(x))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(x)) + 1.0


class NoEmbedNet(nn.Module):
    """A plain classifier without the split interface."""

    def __init__(self, num_classes: int, in_chans: int) -> None:
        super().__init__()
        self.embed_dim = 4
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_chans, num_classes))

    def classify(self, e: torch.Tensor) -> torch.Tensor:
        return e

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make(num_classes: int = 10, in_chans: int = 3, hidden: int = 8) -> ToyNet:
    return ToyNet(num_classes, in_chans, hidden)


def make_no_forward(num_classes: int = 10, in_chans: int = 3) -> NoForwardNet:
    return NoForwardNet(num_classes, in_chans, 8)


def make_inconsistent(num_classes: int = 10, in_chans: int = 3) -> InconsistentNet:
    return InconsistentNet(num_classes, in_chans, 8)


def make_no_embed(num_classes: int = 10, in_chans: int = 3) -> NoEmbedNet:
    return NoEmbedNet(num_classes, in_chans)


def make_without_in_chans(num_classes: int = 10) -> ToyNet:
    return ToyNet(num_classes, 3, 8)


def make_not_a_module(num_classes: int = 10, in_chans: int = 3) -> str:
    return "not a module"
