"""A model's input preprocessing, and the one path from (uint8 image, view) to model input.

Teacher fine-tuning, ``embed``, ``cache verify``, distillation and evaluation all call
:func:`render_inputs`, so every model sees exactly the pixels the teacher saw for a view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pipeline.data.views import render_views
from pipeline.models.errors import ModelFileError

__all__ = ["Preprocess", "render_inputs"]


@dataclass(frozen=True)
class Preprocess:
    """View output size and per-channel normalisation of a model's input."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_spec(cls, spec: dict[str, Any], *, source: str) -> Preprocess:
        """The ``preprocess`` entry of a frozen model's spec (as ``cifd teacher`` writes it)."""
        pre = spec.get("preprocess")
        if not isinstance(pre, dict) or not {"image_size", "mean", "std"} <= set(pre):
            raise ModelFileError(
                f"model {source}: its spec has preprocess = {pre!r}, expected a mapping with image_size, "
                "mean and std; freeze the teacher with `cifd teacher`, or give save_model a spec with "
                "'preprocess': {image_size, mean, std}"
            )
        return cls(image_size=int(pre["image_size"]), mean=tuple(pre["mean"]), std=tuple(pre["std"]))


def render_inputs(images: Tensor, views: Tensor, *, preprocess: Preprocess, channels_last: bool = False) -> Tensor:
    """uint8 images (B, C, H, W) + their view parameters (B, 5) → model inputs (B, C, S, S)."""
    x = render_views(images, views, out_size=preprocess.image_size, mean=preprocess.mean, std=preprocess.std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
