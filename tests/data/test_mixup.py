"""Mixed views: the draw (partners in the same shard, λ ~ Beta(α, α), the partner's box on its
own size) and the render (λ · pixels + (1 − λ) · partner pixels, then normalised), against
hand computations, scipy's Beta and exact-copy crops done with numpy slicing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from pipeline.data.mixup import sample_mixup
from pipeline.data.preprocess import Preprocess, render_inputs
from schemas.config import ViewPolicyConfig

PRE = Preprocess(image_size=6, crop_pct=1.0, interpolation="bilinear", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
BOUNDS = [(0, 4), (4, 8), (8, 9), (9, 16)]


def _draw(seed: int = 0, mixed: int = 2, alpha: float = 0.4, n: int = 16, bounds=BOUNDS, policy=None):
    sizes = torch.tensor([[8 + i % 5, 9 + i % 3] for i in range(n)])
    return sizes, *sample_mixup(sizes=sizes, shard_bounds=bounds, num_views=4, mixed=mixed, alpha=alpha,
                                policy=policy or ViewPolicyConfig(kind="rrc", scale=(0.3, 1.0)), image_size=6,
                                crop_pct=1.0, seed=seed)


def test_partners_are_other_rows_of_the_same_shard_and_only_the_last_views_mix() -> None:
    sizes, partner, mix = _draw()
    assert (partner[:, :2] == np.arange(len(sizes))[:, None]).all() and (mix[:, :2, 0] == 1.0).all()
    for a, b in BOUNDS:
        p = partner[a:b, 2:]
        assert ((p >= a) & (p < b)).all()
        if b - a > 1:
            assert (p != np.arange(a, b)[:, None]).all()
        else:
            assert (p == a).all()  # a one-row shard mixes the image with another view of itself
    assert ((mix[:, 2:, 0] > 0) & (mix[:, 2:, 0] < 1)).all()
    # The partner's box is drawn on the partner's own size.
    boxes = mix[:, 2:, 1:]
    hw = sizes.numpy()[partner[:, 2:]]
    assert (boxes[..., 0] + boxes[..., 2] <= hw[..., 0]).all() and (boxes[..., 1] + boxes[..., 3] <= hw[..., 1]).all()


def test_the_draw_is_seeded_and_lambda_follows_beta() -> None:
    a, b = _draw(seed=3)[1:], _draw(seed=3)[1:]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(_draw(seed=4)[2], a[1])
    _, partner, mix = _draw(mixed=1, alpha=0.4, n=4000, bounds=[(0, 1000), (1000, 4000)])
    assert stats.kstest(mix[:, 3, 0], stats.beta(0.4, 0.4).cdf).pvalue > 0.01
    # Partners are uniform over the other rows of the shard: every row is somebody's partner.
    assert len(np.unique(partner[:1000, 3])) > 600


def test_bad_mixed_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="expected 0 <= mixed < views"):
        _draw(mixed=4)


def _crop(image: np.ndarray, top: int, left: int) -> np.ndarray:
    """An exact 6 × 6 crop of a uint8 (C, H, W) image, zero outside it, as [0, 1] floats."""
    c, h, w = image.shape
    out = np.zeros((c, 6, 6), dtype=np.float32)
    for i in range(6):
        for j in range(6):
            y, x = top + i, left + j
            if 0 <= y < h and 0 <= x < w:
                out[:, i, j] = image[:, y, x] / 255.0
    return out


def test_a_mixed_view_is_lambda_times_its_pixels_plus_the_partners_then_normalised() -> None:
    """Integer boxes of the output size are exact copies: the reference is numpy slicing."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (3, 3, 8, 8), dtype=np.uint8))
    views = torch.tensor([[1.0, 2.0, 6.0, 6.0, 0.0], [-1.0, 0.0, 6.0, 6.0, 0.0], [2.0, 2.0, 6.0, 6.0, 0.0]])
    params = torch.tensor([[0.3, 0.0, 1.0, 6.0, 6.0, 0.0], [1.0, 0.0, 0.0, 6.0, 6.0, 0.0],
                           [0.75, 2.0, -2.0, 6.0, 6.0, 0.0]])
    partners = images[torch.tensor([2, 1, 0])]
    x = render_inputs(images, views, preprocess=PRE, mix=(partners, params))
    mean, std = np.asarray(PRE.mean)[:, None, None], np.asarray(PRE.std)[:, None, None]
    for r in range(3):
        own = _crop(images[r].numpy(), int(views[r, 0]), int(views[r, 1]))
        other = _crop(partners[r].numpy(), int(params[r, 1]), int(params[r, 2]))
        lam = np.float32(params[r, 0])
        expected = ((lam * own + (np.float32(1) - lam) * other) - mean) / std
        np.testing.assert_allclose(x[r].numpy(), expected, rtol=0, atol=2e-6)
    # λ = 1 is the unmixed view exactly; rows render alone as in any batch.
    assert torch.equal(x[1], render_inputs(images[1:2], views[1:2], preprocess=PRE)[0])
    for r in range(3):
        alone = render_inputs(images[r:r + 1], views[r:r + 1], preprocess=PRE, mix=(partners[r:r + 1], params[r:r + 1]))
        assert torch.equal(alone[0], x[r])


def test_images_of_many_sizes_mix_one_by_one_as_a_batch_does() -> None:
    rng = np.random.default_rng(1)
    same = torch.from_numpy(rng.integers(0, 256, (4, 3, 9, 9), dtype=np.uint8))
    views = torch.tensor([[0.5, 1.0, 7.0, 6.5, 1.0]] * 4)
    params = torch.tensor([[0.2, 1.0, 0.0, 8.0, 8.0, 0.0], [0.9, 0.0, 0.5, 5.0, 7.0, 1.0], [1.0, 0, 0, 9, 9, 0],
                           [0.5, 2.0, 2.0, 6.0, 6.0, 0.0]])
    partners = same[torch.tensor([1, 0, 3, 2])]
    batch = render_inputs(same, views, preprocess=PRE, mix=(partners, params))
    listed = render_inputs(list(same), views, preprocess=PRE, mix=(list(partners), params))
    torch.testing.assert_close(batch, listed, rtol=0, atol=1e-5)
