"""The teacher of the scale benchmark (``bench/scale.py``): real-shaped outputs (D = 512
penultimate features, C = 1,000 logits) at a small fraction of a ResNet's cost, so that a
million rows fit a 2-core machine. It follows the user-module interface of
:mod:`pipeline.models.classifier` and is named in params as ``scale_models:teacher`` (the
benchmark puts ``bench/`` on ``PYTHONPATH`` of the stages it runs)."""

from __future__ import annotations

import torch
from torch import nn


class _FeaturesAndHead(nn.Module):
    """``features`` (images → (B, D)) then a linear ``head``: the user-module interface."""

    features: nn.Module
    head: nn.Linear

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (B, D)

    def classify(self, e: torch.Tensor) -> torch.Tensor:
        return self.head(e)  # (B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(x))

    def get_classifier(self) -> nn.Module:
        return self.head


class ScaleTeacher(_FeaturesAndHead):
    """Two small convolutions, global pooling, a 512-wide projection (the embedding) and a
    linear head."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, embed_dim: int = 512) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(64, embed_dim), nn.LayerNorm(embed_dim),
        )
        self.head = nn.Linear(embed_dim, num_classes)


def teacher(num_classes: int = 1000, in_chans: int = 3) -> ScaleTeacher:
    return ScaleTeacher(num_classes=num_classes, in_chans=in_chans)


class ScaleStudent(_FeaturesAndHead):
    """The student: two convolutions to a 32-wide embedding and a linear head."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, embed_dim: int = 32) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, embed_dim, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(embed_dim),
            nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(embed_dim, num_classes)


def student(num_classes: int = 1000, in_chans: int = 3) -> ScaleStudent:
    return ScaleStudent(num_classes=num_classes, in_chans=in_chans)
