"""Antialiased resampling of a box of an image to a square model input.

A view box ``(top, left, height, width)`` in source-pixel coordinates (fractional allowed)
is rendered at ``S × S`` as if the whole image were resized so that the box becomes
``S × S`` and the box were then cut out: output pixel ``i`` samples the image at
``top + (i + 0.5) · height / S`` with a separable filter, stretched by the scale factor when
shrinking (antialiasing), exactly as ``torch.nn.functional.interpolate(..., antialias=True)``
and PIL compute their weights (bilinear: triangle filter of radius 1; bicubic: Keys cubic
with ``a = -0.5`` and radius 2). Taps outside the image are dropped and the rest
renormalised (an edge is clamped, as a resize does); an output row or column with no tap
inside the image (a box reaching past it, the CIFAR pad-and-crop) is zero.

Consequences: the clean evaluation view of a model (shorter side to ``S / crop_pct``, centre
crop ``S``: torchvision's ``Resize`` + ``CenterCrop``) is one box, reproduced exactly; a
random-resized-crop box gives torchvision's ``resized_crop`` except that border output
pixels may also weigh image pixels just outside the box (within half a filter support).

The filter is applied as two small weight matrices per box (``(S, H)`` and ``(S, W)``), so
a batch of same-size images with different boxes is one batched product on any device.

**Exact whatever the batching.** The weights are rounded to multiples of 2^-20 (each row
still sums to exactly 1) and the products run in float64. On integer-valued images (0..255,
what :func:`pipeline.data.views.render_pixels` passes) every partial sum is then a multiple
of 2^-40 below 2^9 (bicubic taps can be negative), which float64 holds exactly, so the result does not depend on the order
of the additions: a box renders to the same bits alone or in any batch, on any BLAS kernel
or device (float32 products gave 1-ulp differences between a lone image and a batch on an
AVX2 machine). The rounding moves a weight by at most 2^-21, a pixel by under 1e-4 gray
levels.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["INTERPOLATIONS", "RADIUS", "WEIGHT_BITS", "axis_weights", "resample_boxes"]

INTERPOLATIONS = ("bilinear", "bicubic")
RADIUS = {"bilinear": 1.0, "bicubic": 2.0}  # filter support in output pixels (× the shrink factor)
_CUBIC_A = -0.5  # PIL's and torch's antialiased bicubic
WEIGHT_BITS = 20  # weights are multiples of 2^-WEIGHT_BITS: exact float64 sums on 8-bit pixels


def _filter(x: Tensor, interpolation: str) -> Tensor:
    x = x.abs()
    if interpolation == "bilinear":
        return (1.0 - x).clamp(min=0.0)
    a = _CUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def axis_weights(start: Tensor, length: Tensor, *, size: int, out: int, interpolation: str) -> Tensor:
    """Resampling weights ``(B, out, size)`` along one axis for boxes ``[start, start + length)``
    (``(B,)`` each) of an axis of ``size`` pixels, in float64, each a multiple of
    2^-``WEIGHT_BITS``. Rows sum to exactly 1 (the rounding remainder goes to the row's
    largest tap), or are all zero when no tap falls inside the image."""
    if interpolation not in RADIUS:
        raise ValueError(f"interpolation = {interpolation!r}: expected one of {list(INTERPOLATIONS)}")
    start = start.to(torch.float64)
    scale = length.to(torch.float64) / out  # (B,) source pixels per output pixel
    stretch = scale.clamp(min=1.0)  # the filter widens only when shrinking
    steps = torch.arange(out, dtype=torch.float64, device=start.device) + 0.5
    centres = start[:, None] + steps[None, :] * scale[:, None]  # (B, out)
    pixels = torch.arange(size, dtype=torch.float64, device=start.device) + 0.5  # (size,)
    w = _filter((pixels[None, None, :] - centres[:, :, None]) / stretch[:, None, None], interpolation)
    total = w.sum(-1, keepdim=True)  # (B, out, 1)
    w = torch.where(total != 0, w / torch.where(total != 0, total, 1.0), 0.0)
    unit = float(2**WEIGHT_BITS)
    q = torch.round(w * unit)  # integers: exact in float64
    short = torch.where(total[..., 0] != 0, unit - q.sum(-1), 0.0)  # (B, out): what rounding lost or added
    q.scatter_add_(-1, q.argmax(-1, keepdim=True), short[..., None])
    return q / unit


def resample_boxes(images: Tensor, boxes: Tensor, *, out_size: int, interpolation: str) -> Tensor:
    """Render ``boxes`` (B, 5: top, left, height, width, flip) of float ``images``
    (B, C, H, W) at ``out_size`` → (B, C, S, S) in the images' dtype, flipped horizontally
    where ``flip > 0.5``. Computed in float64: exact, and so independent of the batch, for
    integer-valued images (see the module doc)."""
    batch, _, height, width = images.shape
    dtype = images.dtype
    images = images.to(torch.float64)
    b = boxes.to(device=images.device, dtype=torch.float64)
    rows = axis_weights(b[:, 0], b[:, 2], size=height, out=out_size, interpolation=interpolation)  # (B, S, H)
    cols = axis_weights(b[:, 1], b[:, 3], size=width, out=out_size, interpolation=interpolation)  # (B, S, W)
    cols = torch.where((b[:, 4] > 0.5)[:, None, None], cols.flip(1), cols)
    if batch == 1 and images.device.type == "cpu":  # one (often large) image: cut it to the pixels any tap
        # reaches first (on the host only: finding them on a device would synchronise it)
        r = rows[0].any(0).nonzero()
        c = cols[0].any(0).nonzero()
        if len(r) == 0 or len(c) == 0:
            return images.new_zeros(1, images.shape[1], out_size, out_size, dtype=dtype)
        r0, r1, c0, c1 = int(r[0]), int(r[-1]) + 1, int(c[0]), int(c[-1]) + 1
        part = images[0, :, r0:r1, c0:c1]  # (C, h, w)
        out = rows[0, :, r0:r1] @ part @ cols[0, :, c0:c1].T  # (C, S, S)
        return out[None].to(dtype)
    return torch.einsum("bih,bchw,bjw->bcij", rows, images, cols).to(dtype)
