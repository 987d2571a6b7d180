"""A decoded split held in memory, as the in-memory paths (teacher fine-tuning, memory-mode
distillation, evaluation) take it: one uint8 batch on the device when every image has one
size, else a list of host images of any sizes (rendered one by one)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pipeline.data.shards import Manifest, ShardBlock

__all__ = ["held_images", "held_rows"]


def held_images(block: ShardBlock, manifest: Manifest, device: torch.device) -> Tensor | list[Tensor]:
    """``block``'s images: a (N, C, H, W) uint8 tensor on ``device`` when every image of the
    dataset has one size, else N host tensors (C, H_i, W_i)."""
    if manifest.image_shape is not None:
        return torch.from_numpy(block.stacked()).to(device)
    return [torch.from_numpy(image) for image in block.images]


def held_rows(images: Tensor | Sequence[Tensor], rows: Tensor) -> Tensor | list[Tensor]:
    """The held images of global ``rows`` (host or device int64): a batch on the images'
    device when they are one batch, else the list of those host images."""
    if isinstance(images, Tensor):
        return images[rows.to(images.device, non_blocking=True)]
    return [images[r] for r in rows.tolist()]
