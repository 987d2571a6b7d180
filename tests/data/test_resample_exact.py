"""Exact resampling: weights on the 2^-20 grid that sum to exactly 1, and a box of a uint8
image renders to the same bits alone, in any batch, and in any order (the cache's replay
promise; float32 products broke it by one ulp on an AVX2 machine)."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.resample import WEIGHT_BITS, axis_weights
from pipeline.data.views import render_pixels


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_weights_lie_on_the_grid_and_rows_sum_to_exactly_one(interpolation: str) -> None:
    g = torch.Generator().manual_seed(0)
    start = torch.rand(64, generator=g, dtype=torch.float64) * 40 - 10  # some boxes partly outside
    length = torch.rand(64, generator=g, dtype=torch.float64) * 60 + 1
    w = axis_weights(start, length, size=37, out=11, interpolation=interpolation)
    scaled = w * 2**WEIGHT_BITS
    assert torch.equal(scaled, scaled.round())
    sums = w.sum(-1)
    assert bool(((sums == 1.0) | (sums == 0.0)).all())
    assert bool((sums == 1.0).any()) and bool((sums == 0.0).any())  # both kinds of row occur


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_a_box_renders_to_the_same_bits_alone_and_in_any_batch(interpolation: str) -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (16, 3, 45, 61), dtype=torch.uint8, generator=g)
    top = torch.rand(16, generator=g) * 30 - 5
    left = torch.rand(16, generator=g) * 40 - 5
    height = torch.rand(16, generator=g) * 40 + 3
    width = torch.rand(16, generator=g) * 50 + 3
    flip = (torch.rand(16, generator=g) > 0.5).float()
    boxes = torch.stack([top, left, height, width, flip], 1)
    render = dict(out_size=13, interpolation=interpolation, channels=3)
    batch = render_pixels(images, boxes, **render)
    for i in range(16):  # alone: the single-image path, which cuts the image to the filter's reach
        assert torch.equal(render_pixels(images[i:i + 1], boxes[i:i + 1], **render)[0], batch[i]), f"row {i}"
    order = torch.randperm(16, generator=g)
    assert torch.equal(render_pixels(images[order], boxes[order], **render), batch[order])
    assert torch.equal(render_pixels(images[:5], boxes[:5], **render), batch[:5])
    listed = render_pixels([im for im in images], boxes, **render)  # images of many sizes take this path
    assert torch.equal(listed, batch)
