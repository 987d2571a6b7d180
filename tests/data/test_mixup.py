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


# CutMix views: the last `cutmix` mixed views paste a box of the partner instead of blending.

def _cut_draw(cutmix: int, seed: int = 0, n: int = 16, size: int = 6):
    sizes = torch.tensor([[8 + i % 5, 9 + i % 3] for i in range(n)])
    return sizes, *sample_mixup(sizes=sizes, shard_bounds=BOUNDS if n == 16 else [(0, n)], num_views=4, mixed=3,
                                alpha=0.4, policy=ViewPolicyConfig(kind="rrc", scale=(0.3, 1.0)), image_size=size,
                                crop_pct=1.0, seed=seed, cutmix=cutmix)


def test_cutmix_boxes_are_timms_rand_bbox_with_its_lambda_correction(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference is timm's own ``cutmix_bbox_and_lam`` fed the same centres."""
    from timm.data import mixup as timm_mixup

    from pipeline.data.mixup import _cutmix_boxes

    size, n = 32, 300
    lam0 = np.random.default_rng(5).beta(1.0, 1.0, size=n).astype(np.float32)
    lam0[:3] = (0.0, 1.0, 0.5)
    lam, boxes = _cutmix_boxes(lam0, size, np.random.default_rng(7))
    twin = np.random.default_rng(7)  # the centres, drawn in the documented order: rows, then columns
    cy, cx = twin.integers(0, size, size=n), twin.integers(0, size, size=n)
    for i in range(n):
        centres = iter([cy[i], cx[i]])
        monkeypatch.setattr(timm_mixup.np.random, "randint", lambda *a, **k: next(centres))
        (yl, yu, xl, xu), want = timm_mixup.cutmix_bbox_and_lam((size, size), float(lam0[i]), correct_lam=True)
        assert tuple(np.round(boxes[i] * size).astype(int)) == (yl, xl, yu - yl, xu - xl), i
        assert lam[i] == np.float32(want), i


def test_a_cutmix_draw_keeps_the_blends_draws_and_lambda_is_the_own_pixels_fraction() -> None:
    sizes, p0, m0 = _cut_draw(cutmix=0)
    _, p2, m2 = _cut_draw(cutmix=2)
    assert m0.shape[-1] == 6 and m2.shape[-1] == 10
    # Views 0-1 (clean, the blend) are drawn as without CutMix, and view 2's partner before its box.
    assert np.array_equal(p0[:, :3], p2[:, :3]) and np.array_equal(m0[:, :2], m2[:, :2, :6])
    assert (m2[:, :2, 6:] == 0).all()
    cut = np.round(m2[:, 2:, 6:] * 6).astype(int)
    assert (cut >= 0).all() and (cut[..., 0] + cut[..., 2] <= 6).all() and (cut[..., 1] + cut[..., 3] <= 6).all()
    np.testing.assert_array_equal(m2[:, 2:, 0], (1 - cut[..., 2] * cut[..., 3] / 36).astype(np.float32))
    hw = sizes.numpy()[p2[:, 2:]]  # the partner's own box still fits the partner
    assert (m2[:, 2:, 1] + m2[:, 2:, 3] <= hw[..., 0]).all() and (m2[:, 2:, 2] + m2[:, 2:, 4] <= hw[..., 1]).all()
    assert (m2[:, 2:, 0] < 1).mean() > 0.5  # most CutMix views paste something


def test_bad_cutmix_counts_are_refused() -> None:
    from schemas.base import ConfigError
    from schemas.config import MixupConfig

    with pytest.raises(ValueError, match=r"cutmix views = 4: expected 0 <= cutmix <= mixed views \(3\)"):
        _cut_draw(cutmix=4)
    with pytest.raises(ConfigError, match=r"cutmix' = 2: expected 0 <= cutmix <= embed.mixup.views \(1\)"):
        MixupConfig.from_mapping({"views": 1, "cutmix": 2}, section="embed.mixup")


def test_a_cutmix_view_is_its_pixels_with_the_partners_box_pasted_then_normalised() -> None:
    """Exact-copy boxes; the reference pastes with numpy slicing. Rows: a 3 × 2 box, a
    blend (no box), an unmixed view, and a box covering the whole view (all partner)."""
    rng = np.random.default_rng(2)
    images = torch.from_numpy(rng.integers(0, 256, (4, 3, 8, 8), dtype=np.uint8))
    views = torch.tensor([[1.0, 2.0, 6.0, 6.0, 0.0], [0.0, 0.0, 6.0, 6.0, 0.0], [2.0, 2.0, 6.0, 6.0, 0.0],
                          [2.0, 1.0, 6.0, 6.0, 0.0]])
    sixth = [k / 6 for k in range(7)]
    params = torch.tensor([[1 - 6 / 36, 0.0, 1.0, 6.0, 6.0, 0.0, sixth[1], sixth[2], sixth[3], sixth[2]],
                           [0.3, 2.0, 0.0, 6.0, 6.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [1.0, 0.0, 0.0, 6.0, 6.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [0.0, 1.0, 2.0, 6.0, 6.0, 0.0, 0.0, 0.0, 1.0, 1.0]])
    partners = images[torch.tensor([3, 2, 1, 0])]
    x = render_inputs(images, views, preprocess=PRE, mix=(partners, params))
    mean, std = np.asarray(PRE.mean)[:, None, None], np.asarray(PRE.std)[:, None, None]
    for r in range(4):
        own = _crop(images[r].numpy(), int(views[r, 0]), int(views[r, 1]))
        other = _crop(partners[r].numpy(), int(params[r, 1]), int(params[r, 2]))
        if r == 1:
            lam = np.float32(params[r, 0])
            expected = lam * own + (np.float32(1) - lam) * other
        else:
            expected = own.copy()
            (t, l_, h, w) = {0: (1, 2, 3, 2), 2: (0, 0, 0, 0), 3: (0, 0, 6, 6)}[r]
            expected[:, t:t + h, l_:l_ + w] = other[:, t:t + h, l_:l_ + w]
        np.testing.assert_allclose(x[r].numpy(), (expected - mean) / std, rtol=0, atol=2e-6)
    for r in range(4):  # each row alone, and as a list (the images-of-many-sizes path), gives the same bits
        alone = render_inputs(images[r:r + 1], views[r:r + 1], preprocess=PRE, mix=(partners[r:r + 1], params[r:r + 1]))
        assert torch.equal(alone[0], x[r])
    listed = render_inputs(list(images), views, preprocess=PRE, mix=(list(partners), params))
    assert torch.equal(listed, x)


def test_a_cutmix_box_lands_on_the_same_region_of_another_input_size() -> None:
    from pipeline.data.mixup import cut_boxes

    params = torch.zeros(1, 10)
    params[0, 6:] = torch.tensor([8 / 32, 4 / 32, 16 / 32, 12 / 32])
    assert cut_boxes(params, 32).tolist() == [[8, 4, 16, 12]] and cut_boxes(params, 16).tolist() == [[4, 2, 8, 6]]
    k = torch.arange(225, dtype=torch.float64)  # every pixel edge of a 224 view survives float32 storage
    frac = torch.zeros(225, 10)
    frac[:, 6], frac[:, 8] = (k / 224).float(), ((224 - k) / 224).float()
    got = cut_boxes(frac, 224)
    assert torch.equal(got[:, 0], k.long()) and torch.equal(got[:, 2], (224 - k).long())


def test_a_box_keeps_its_side_at_half_the_size_wherever_it_sits() -> None:
    """Every even-sided box of a 32 view, at every position: on the 16 grid its side is half
    (round-half-to-even would grow or shrink it by a pixel depending on where it sits)."""
    from pipeline.data.mixup import cut_boxes

    rows = [(t, s) for s in range(2, 33, 2) for t in range(0, 33 - s)]
    params = torch.zeros(len(rows), 10)
    for i, (t, s) in enumerate(rows):
        params[i, 6:] = torch.tensor([t / 32, t / 32, s / 32, s / 32])
    got = cut_boxes(params, 16)
    half = torch.tensor([s // 2 for _, s in rows])
    assert torch.equal(got[:, 2], half) and torch.equal(got[:, 3], half)


def _pasted_share(params: torch.Tensor, size: int) -> np.ndarray:
    """The share of each row's own pixels in its view rendered at ``size``: the row all 0, the
    partner all 255, counted on the render."""
    pre = Preprocess(image_size=size, crop_pct=1.0, interpolation="bilinear", mean=(0.0,), std=(1.0,))
    own = torch.zeros(len(params), 1, size, size, dtype=torch.uint8)
    views = torch.tensor([[0.0, 0.0, size, size, 0.0]]).repeat(len(params), 1)
    params = params.clone()
    params[:, 1:6] = views  # the partner's view: all of its 255s
    x = render_inputs(own, views, preprocess=pre, mix=(torch.full_like(own, 255), params))
    return (x == 0).float().mean(dim=(1, 2, 3)).numpy()


def test_cutmix_labels_weigh_the_pixels_pasted_at_the_size_rendered() -> None:
    """λ for the labels is the stored λ at the drawn size and the own pixels' share of the
    render at another size (timm's correct_lam there); a box lost at that size pastes nothing
    (the view is the row's own, not a blend) and its label is the row's alone."""
    from pipeline.data.mixup import label_lambda

    _, _, mix = _cut_draw(cutmix=2)
    params = torch.from_numpy(mix[:, 2:].reshape(-1, mix.shape[-1]).copy())
    assert torch.equal(label_lambda(params, 6), params[:, 0])
    drawn = np.zeros((4, 10), dtype=np.float32)  # boxes drawn on a 32 grid, λ = 1 − area
    drawn[:, 6:] = np.asarray([[1, 1, 30, 30], [1, 1, 1, 1], [3, 5, 7, 9], [0, 0, 32, 32]]) / 32
    drawn[:, 0] = 1 - drawn[:, 8] * drawn[:, 9]
    drawn[:, 3:5] = 32
    params = torch.cat([params, torch.from_numpy(drawn)])
    for size in (6, 16, 32):
        np.testing.assert_allclose(label_lambda(params, size).numpy(), _pasted_share(params, size), rtol=0, atol=1e-6)
    assert float(label_lambda(params, 16)[-3]) == 1.0  # the 1-pixel box is lost at 16: the own label only


def test_mix_params_no_draw_makes_are_found() -> None:
    from pipeline.data.mixup import bad_mix_rows

    _, _, mix = _cut_draw(cutmix=2)
    assert len(bad_mix_rows(mix)) == 0 and len(bad_mix_rows(_draw()[2])) == 0
    cut = mix[:, -1]  # the last view is a CutMix view in every row
    edits = {
        0: (0, 1.5),  # λ above 1
        1: (0, -0.5),  # λ below 0
        2: (5, 0.5),  # a flip that is neither
        3: (9, -0.25),  # a box of negative width
        4: (8, 2.0),  # a box twice the view
        5: (6, 0.9),  # a box reaching off the view
        6: (0, float(cut[6, 0]) - 0.1),  # λ that is not 1 − the box's area
    }
    hostile = mix.copy()
    for row, (field, value) in edits.items():
        hostile[row, -1, field] = value
    assert bad_mix_rows(hostile).tolist() == sorted(edits)
    blend = _draw()[2].copy()
    blend[3, -1, 3] = 0.0  # a blend's partner box of no area
    assert bad_mix_rows(blend).tolist() == [3]
