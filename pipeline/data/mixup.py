"""Mixed views (Beyer et al., "Knowledge distillation: a good teacher is patient and
consistent": mixup "function matching"), stored explicitly so that they replay exactly.

A mixed view of row ``r`` is ``λ · view(r) + (1 − λ) · view(p)`` in pixels (after the crop
and resize of each part, before normalisation), with ``p`` a partner row and ``λ`` drawn
from Beta(α, α). The cache stores, per (row, view), the partner row and ``(λ, partner box)``
(:data:`MIX_FIELDS`); the row's own box is its ordinary view box. A view that is not mixed
has λ = 1 and the row itself as its partner (never read: see :func:`is_mixed`). The partner is another row **of the same shard**, so every consumer
that holds a shard (``embed``'s worker, a stream worker reading one tar, a memory-mode
split) holds both images.

Only the last ``mixed`` of the V views are mixed; view 0 stays the clean view.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.data.views import ViewPolicy, sample_views

__all__ = ["MIXUP_SEED_TAG", "MIX_FIELDS", "is_mixed", "sample_mixup", "unmixed"]

MIXUP_SEED_TAG = 0x6D6978  # "mix": embed draws mixed views from derived_seed(embed.seed, this)
MIX_FIELDS = ("lambda", "top", "left", "height", "width", "flip")  # λ, then the partner's view box


def unmixed(num_rows: int, num_views: int) -> tuple[np.ndarray, np.ndarray]:
    """Partners (N, V) int64, each row itself, and mix params (N, V, 6) with λ = 1 (the
    partner box zero): no view mixed."""
    partner = np.repeat(np.arange(num_rows, dtype=np.int64)[:, None], num_views, axis=1)
    mix = np.zeros((num_rows, num_views, len(MIX_FIELDS)), dtype=np.float32)
    mix[..., 0] = 1.0
    return partner, mix


def is_mixed(params: Tensor) -> Tensor:
    """(B,) bool: rows whose mix params (B, 6) blend in a partner (λ < 1). A λ of exactly 1
    renders the row's own view alone, whatever its partner, so this is exact."""
    return params[:, 0] < 1.0


def sample_mixup(*, sizes: Tensor, shard_bounds: Sequence[tuple[int, int]], num_views: int, mixed: int,
                 alpha: float, policy: ViewPolicy, image_size: int, crop_pct: float,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Partners (N, V) int64 and mix params (N, V, 6) float32 for a split of images of
    ``sizes`` (N, 2) sharded as ``shard_bounds``: for each of the last ``mixed`` views, every
    row gets a partner drawn uniformly among the other rows of its shard (itself in a
    one-row shard, which mixes the image with another view of itself), ``λ ~ Beta(alpha,
    alpha)`` and a partner box drawn by ``policy`` on the partner's size. Draws come in one
    fixed order from ``seed`` (numpy for partners and λ, torch for boxes): the same seed gives
    the same views whatever the worker layout."""
    n = len(sizes)
    partner, mix = unmixed(n, num_views)
    if not 0 <= mixed < num_views:
        raise ValueError(f"mixed views = {mixed}: expected 0 <= mixed < views ({num_views}; view 0 stays clean)")
    if mixed == 0 or n == 0:
        return partner, mix
    starts = np.asarray([a for a, _ in shard_bounds], dtype=np.int64)
    stops = np.asarray([b for _, b in shard_bounds], dtype=np.int64)
    if starts[0] != 0 or stops[-1] != n or not np.array_equal(starts[1:], stops[:-1]):
        raise ValueError(f"shard bounds do not tile the {n} rows: {list(shard_bounds)[:4]}...")
    rows = np.arange(n, dtype=np.int64)
    first = starts[np.searchsorted(starts, rows, side="right") - 1]
    count = stops[np.searchsorted(starts, rows, side="right") - 1] - first
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    for v in range(num_views - mixed, num_views):
        shift = rng.integers(1, np.maximum(count, 2))  # 1..k-1: another row (k = 1: shift 1 ≡ 0, itself)
        partner[:, v] = first + (rows - first + shift) % count
        mix[:, v, 0] = rng.beta(alpha, alpha, size=n).astype(np.float32)
        boxes = sample_views(sizes=sizes[torch.from_numpy(partner[:, v])], num_views=2, policy=policy,
                             image_size=image_size, crop_pct=crop_pct, generator=generator)[:, 1]
        mix[:, v, 1:] = boxes.numpy()
    return partner, mix
