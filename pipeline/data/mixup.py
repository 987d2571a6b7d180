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

**CutMix** (Yun et al. 2019) is the second kind: of the mixed views, the last ``cutmix``
paste a box of the partner's view into the row's view instead of blending them. Its box is
drawn as timm's ``rand_bbox`` draws it (side ``floor(S · sqrt(1 − λ₀))``, centre uniform,
clipped to the view) and λ is then the fraction of the row's own pixels left (timm's
``correct_lam``), the weight of its label. A cache with CutMix views stores four more mix
fields, the pasted box in fractions of the view's side (:data:`CUT_FIELDS`; all zero for a
blend), so a student at another input size pastes the same region of its own grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.data.views import ViewPolicy, sample_views

__all__ = ["CUT_FIELDS", "MIXUP_SEED_TAG", "MIX_FIELDS", "bad_mix_rows", "cut_boxes", "is_cut", "is_mixed",
           "label_lambda", "mix_fields", "sample_mixup", "unmixed"]

MIXUP_SEED_TAG = 0x6D6978  # "mix": embed draws mixed views from derived_seed(embed.seed, this)
MIX_FIELDS = ("lambda", "top", "left", "height", "width", "flip")  # λ, then the partner's view box
# A cache with CutMix views: the pasted box, (top, left, height, width) in fractions of the side.
CUT_FIELDS = ("cut_top", "cut_left", "cut_height", "cut_width")


def mix_fields(cutmix: bool) -> tuple[str, ...]:
    """The mix params' fields of a cache with (or without) CutMix views."""
    return MIX_FIELDS + CUT_FIELDS if cutmix else MIX_FIELDS


def unmixed(num_rows: int, num_views: int, *, cutmix: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Partners (N, V) int64, each row itself, and mix params (N, V, 6, or 10 with
    ``cutmix``) with λ = 1 (the boxes zero): no view mixed."""
    partner = np.repeat(np.arange(num_rows, dtype=np.int64)[:, None], num_views, axis=1)
    mix = np.zeros((num_rows, num_views, len(mix_fields(cutmix))), dtype=np.float32)
    mix[..., 0] = 1.0
    return partner, mix


def cut_boxes(params: Tensor, size: int) -> Tensor:
    """(B, 4) int64 pasted boxes ``(top, left, height, width)`` on a ``size`` × ``size`` view
    from mix params (B, 10): each edge at the pixel nearest its stored fraction, halves
    rounded up (exactly the drawn pixels at the size they were drawn for; at another size a
    box's side then depends on its side, never on where it sits), zero for a blend."""
    cut = params[:, len(MIX_FIELDS):].to(torch.float64)

    def edge(fraction: Tensor) -> Tensor:
        return torch.floor(fraction * size + 0.5)

    top, left = edge(cut[:, 0]), edge(cut[:, 1])
    bottom, right = edge(cut[:, 0] + cut[:, 2]), edge(cut[:, 1] + cut[:, 3])
    return torch.stack([top, left, bottom - top, right - left], dim=1).clamp_(0, size).long()


def is_cut(params: Tensor) -> Tensor:
    """(B,) bool: rows whose mix params paste a box (CutMix views; stored area > 0)."""
    if params.shape[1] <= len(MIX_FIELDS):
        return torch.zeros(len(params), dtype=torch.bool, device=params.device)
    return params[:, len(MIX_FIELDS) + 2] * params[:, len(MIX_FIELDS) + 3] > 0


def label_lambda(params: Tensor, size: int) -> Tensor:
    """(B,) λ, the weight of the row's own label, for views rendered at ``size``: the stored
    λ for a blend; for a pasted box, the share of the row's own pixels that the box leaves at
    that size (timm's ``correct_lam``). At the size the box was drawn for, the stored λ."""
    lam = params[:, 0].to(torch.float32)
    if params.shape[1] <= len(MIX_FIELDS):  # decided by shape: no device synchronisation per batch
        return lam
    box = cut_boxes(params, size)
    share = 1.0 - (box[:, 2] * box[:, 3]).to(torch.float64) / float(size * size)  # as the draw computes it
    return torch.where(is_cut(params), share.to(torch.float32), lam)


def bad_mix_rows(mix: np.ndarray) -> np.ndarray:
    """Rows of mix params (n, V, 6 or 10) that no draw of :func:`sample_mixup` makes, as a
    damaged or hostile cache could hold them: λ outside [0, 1], a flip not 0 or 1, a blend's
    partner box of no area; with CutMix fields, a pasted box not inside the view or whose
    area is not 1 − λ (up to float32 rounding)."""
    field = {name: mix[..., i] for i, name in enumerate(MIX_FIELDS)}
    lam, flip = field["lambda"], field["flip"]
    bad = (lam < 0) | (lam > 1) | ((flip != 0) & (flip != 1))
    bad |= (lam < 1) & ((field["height"] <= 0) | (field["width"] <= 0))
    if mix.shape[-1] > len(MIX_FIELDS):
        top, left, height, width = np.moveaxis(mix[..., len(MIX_FIELDS):].astype(np.float64), -1, 0)
        bad |= (np.minimum.reduce([top, left, height, width]) < 0) | (top + height > 1 + 1e-6) | (left + width > 1 + 1e-6)
        area = height * width
        bad |= (area > 0) & (np.abs(1.0 - area - lam) > 1e-5)
    return np.flatnonzero(bad.reshape(len(mix), -1).any(axis=1))


def is_mixed(params: Tensor) -> Tensor:
    """(B,) bool: rows whose mix params (B, 6) blend in a partner (λ < 1). A λ of exactly 1
    renders the row's own view alone, whatever its partner, so this is exact."""
    return params[:, 0] < 1.0


def sample_mixup(*, sizes: Tensor, shard_bounds: Sequence[tuple[int, int]], num_views: int, mixed: int,
                 alpha: float, policy: ViewPolicy, image_size: int, crop_pct: float,
                 seed: int, cutmix: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Partners (N, V) int64 and mix params (N, V, 6) float32 (10 with CutMix) for a split of images of
    ``sizes`` (N, 2) sharded as ``shard_bounds``: for each of the last ``mixed`` views, every
    row gets a partner drawn uniformly among the other rows of its shard (itself in a
    one-row shard, which mixes the image with another view of itself), ``λ ~ Beta(alpha,
    alpha)`` and a partner box drawn by ``policy`` on the partner's size. Draws come in one
    fixed order from ``seed`` (numpy for partners and λ, torch for boxes): the same seed gives
    the same views whatever the worker layout.

    ``cutmix``: the last ``cutmix`` of the mixed views are CutMix views (mix params (N, V,
    10)): after its λ₀, each draws its box centre (numpy, row then column) and stores the
    box and the corrected λ. The blends' draws are those of a cache without CutMix."""
    n = len(sizes)
    if not 0 <= mixed < num_views:
        raise ValueError(f"mixed views = {mixed}: expected 0 <= mixed < views ({num_views}; view 0 stays clean)")
    if not 0 <= cutmix <= mixed:
        raise ValueError(f"cutmix views = {cutmix}: expected 0 <= cutmix <= mixed views ({mixed})")
    partner, mix = unmixed(n, num_views, cutmix=cutmix > 0)
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
        if v >= num_views - cutmix:
            mix[:, v, 0], mix[:, v, len(MIX_FIELDS):] = _cutmix_boxes(mix[:, v, 0], image_size, rng)
        boxes = sample_views(sizes=sizes[torch.from_numpy(partner[:, v])], num_views=2, policy=policy,
                             image_size=image_size, crop_pct=crop_pct, generator=generator)[:, 1]
        mix[:, v, 1:len(MIX_FIELDS)] = boxes.numpy()
    return partner, mix


def _cutmix_boxes(lam: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """timm's ``rand_bbox`` (no margin) then ``correct_lam`` on a ``size`` × ``size`` view:
    per row, a box of side ``floor(size · sqrt(1 − λ₀))`` centred at a uniform pixel and
    clipped to the view. Returns λ (the own pixels' fraction, float32) and the boxes (n, 4)
    in fractions of ``size``."""
    side = (size * np.sqrt(1.0 - lam.astype(np.float64))).astype(np.int64)
    cy = rng.integers(0, size, size=len(lam))
    cx = rng.integers(0, size, size=len(lam))
    top, bottom = np.clip(cy - side // 2, 0, size), np.clip(cy + (side + 1) // 2, 0, size)
    left, right = np.clip(cx - side // 2, 0, size), np.clip(cx + (side + 1) // 2, 0, size)
    corrected = 1.0 - (bottom - top) * (right - left) / float(size * size)
    boxes = np.stack([top, left, bottom - top, right - left], axis=1) / float(size)
    return corrected.astype(np.float32), boxes.astype(np.float32)
