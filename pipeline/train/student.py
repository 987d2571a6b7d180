"""The student of stage three: a backbone plus, for CIFD, the IBM and a projection to D."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from pipeline.models import ImageClassifier
from pipeline.rd import InformationBottleneck

__all__ = ["Student", "StudentOutput", "uses_features", "uses_rdms"]


def uses_features(method: str) -> bool:
    """Does ``method`` match the teacher's (and RDMs') embeddings?"""
    return method == "cifd"


def uses_rdms(method: str) -> bool:
    """Does ``method`` learn from the RDM cache?"""
    return method in ("dgkd", "cifd")


class StudentOutput(NamedTuple):
    logits: Tensor  # (B, C)
    projected: Tensor | None  # (B, D) student embedding mapped to the teacher's dim
    bits: Tensor | None  # (B,) IBM rate, float32


class Student(nn.Module):
    """A student backbone plus, for CIFD, the IBM (noise + rate) and a projection to D.

    In eval mode the IBM passes the embedding through unchanged, so the deployed student is
    the bare backbone (``student.backbone``).

    Args:
        backbone: the student classifier.
        teacher_dim: D, when the loss matches embeddings (None otherwise).
        ibm: put the IBM between the backbone's embedding and its classifier.
        ibm_init_scale: initial spread of the IBM's entropy model.
        ibm_noise_scale: None for the paper's unit noise; k for noise relative to the
            embedding's RMS (see :class:`~pipeline.rd.InformationBottleneck`).
    """

    def __init__(self, backbone: ImageClassifier, *, teacher_dim: int | None, ibm: bool,
                 ibm_init_scale: float, ibm_noise_scale: float | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        dim = backbone.embed_dim
        self.ibm = (InformationBottleneck(dim, out_dim=teacher_dim, init_scale=ibm_init_scale,
                                          noise_scale=ibm_noise_scale)
                    if ibm and teacher_dim else None)
        self.proj = nn.Linear(dim, teacher_dim) if teacher_dim and not ibm else None

    def forward(self, x: Tensor, *, generator: torch.Generator | None = None) -> StudentOutput:
        w = self.backbone.embed(x)
        if self.ibm is not None:
            out = self.ibm(w, generator=generator)
            return StudentOutput(self.backbone.classify(out.noisy), out.projected, out.bits)
        projected = self.proj(w) if self.proj is not None else None
        return StudentOutput(self.backbone.classify(w), projected, None)
