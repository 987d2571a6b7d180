"""View sampling and replay (`pipeline.data.views`): the pixels the teacher saw, exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from pipeline.data.views import (
    clean_views,
    normalize,
    render_views,
    replay_views,
    sample_views,
)
from schemas.config import ViewPolicyConfig

pytestmark = pytest.mark.usefixtures("one_thread")

H, W = 10, 14  # non-square on purpose: catches height/width mix-ups
POLICIES = {
    "rrc": ViewPolicyConfig(kind="rrc", scale=(0.2, 1.0)),
    "pad_crop": ViewPolicyConfig(kind="pad_crop", pad=3),
    "none": ViewPolicyConfig(kind="none"),
}


def draw(policy: ViewPolicyConfig, seed: int = 0, n: int = 200, v: int = 5, h: int = H, w: int = W) -> torch.Tensor:
    return sample_views(num_images=n, num_views=v, height=h, width=w, policy=policy,
                        generator=torch.Generator().manual_seed(seed))


def images(b: int = 6, c: int = 3, h: int = 12, w: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def params(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_view_zero_is_the_clean_view(kind: str) -> None:
    views = draw(POLICIES[kind])
    assert views.shape == (200, 5, 5) and views.dtype == torch.float32
    assert torch.equal(views[:, 0], clean_views(200, H, W))
    assert torch.equal(views[0, 0], torch.tensor([0.0, 0.0, H, W, 0.0]))


@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_sample_views_is_deterministic_for_a_seed(kind: str) -> None:
    assert torch.equal(draw(POLICIES[kind], seed=3), draw(POLICIES[kind], seed=3))
    assert not torch.equal(draw(POLICIES[kind], seed=3), draw(POLICIES[kind], seed=4))


def test_single_view_draws_nothing() -> None:
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    views = sample_views(num_images=4, num_views=1, height=H, width=W, policy=POLICIES["rrc"],
                         generator=generator)
    assert torch.equal(views[:, 0], clean_views(4, H, W))
    assert torch.equal(generator.get_state(), state)
    with pytest.raises(ValueError, match="num_views"):
        sample_views(num_images=4, num_views=0, height=H, width=W, policy=POLICIES["rrc"], generator=generator)


def test_rrc_boxes_are_integer_and_inside_the_image() -> None:
    views = draw(POLICIES["rrc"])[:, 1:]
    top, left, h, w, flip = views.unbind(-1)
    for value in (top, left, h, w):
        assert torch.equal(value, value.round())
    assert (h >= 1).all() and (w >= 1).all()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    assert (h < H).any() and (w < W).any()  # really cropping
    assert float((h * w).min()) < 0.5 * H * W  # the scale range is used
    assert set(flip.unique().tolist()) == {0.0, 1.0}
    assert 0.3 < float(flip.mean()) < 0.7


def test_pad_crop_offsets_stay_within_pad() -> None:
    pad = POLICIES["pad_crop"].pad
    views = draw(POLICIES["pad_crop"])[:, 1:]
    top, left, h, w, _ = views.unbind(-1)
    assert torch.equal(h, torch.full_like(h, H)) and torch.equal(w, torch.full_like(w, W))
    assert (top.abs() <= pad).all() and (left.abs() <= pad).all()
    assert set(top.unique().tolist()) == set(range(-pad, pad + 1))  # every offset is reachable
    assert set(left.unique().tolist()) == set(range(-pad, pad + 1))


def test_policy_none_and_no_flip() -> None:
    views = draw(POLICIES["none"])
    assert torch.equal(views[..., :4], clean_views(200 * 5, H, W).view(200, 5, 5)[..., :4])
    assert views[:, 1:, 4].sum() > 0  # flips only
    no_flip = draw(ViewPolicyConfig(kind="rrc", flip=False))
    assert not no_flip[..., 4].any()


def test_replay_of_the_clean_view_is_the_identity() -> None:
    x = images(b=5, h=12, w=12)
    out = replay_views(x, clean_views(5, 12, 12), out_size=12)
    assert torch.equal(out, x)


def test_integer_pad_crop_equals_pad_and_slice() -> None:
    x = images(b=8, h=12, w=12, seed=1)
    pad, size = 4, 12
    offsets = [(-4, 3, 0), (0, 0, 1), (4, -4, 1), (2, -1, 0), (-3, -3, 1), (1, 4, 0), (0, 0, 0), (-1, 2, 1)]
    p = params([[top, left, size, size, flip] for top, left, flip in offsets])
    out = replay_views(x, p, out_size=size)
    for i, (top, left, flip) in enumerate(offsets):
        expected = F.pad(x[i], (pad, pad, pad, pad))[:, pad + top: pad + top + size, pad + left: pad + left + size]
        if flip:
            expected = expected.flip(-1)
        assert torch.equal(out[i], expected), f"view {offsets[i]}"


def test_integer_crop_smaller_than_the_image_is_an_exact_copy() -> None:
    x = images(b=2, h=H, w=W, seed=2)
    p = params([[1, 3, 6, 6, 0], [4, 8, 6, 6, 1]])
    out = replay_views(x, p, out_size=6)
    assert torch.equal(out[0], x[0, :, 1:7, 3:9])
    assert torch.equal(out[1], x[1, :, 4:10, 8:14].flip(-1))


def test_downscaling_box_matches_torchvision_resized_crop() -> None:
    # An exact 2× downscale: bilinear (no antialias) averages 2×2 blocks in both libraries.
    x = images(b=1, h=H, w=W, seed=3)
    out = replay_views(x, params([[2, 4, 8, 8, 0]]), out_size=4)
    expected = TF.resized_crop(x, 2, 4, 8, 8, [4, 4], antialias=False)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # Different height and width scale factors (box 8×10 → 4×4: 2× and 2.5×).
    out = replay_views(x, params([[1, 2, 8, 10, 0]]), out_size=4)
    expected = TF.resized_crop(x, 1, 2, 8, 10, [4, 4], antialias=False)
    assert out.shape == expected.shape == (1, 3, 4, 4)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_upscaling_box_matches_torchvision_away_from_the_edges() -> None:
    # torchvision crops first, then clamps at the crop's edge; replay samples the real image
    # around the box (zeros outside the image). Interior pixels must agree.
    x = images(b=1, h=12, w=12, seed=4)
    out = replay_views(x, params([[3, 2, 6, 6, 0]]), out_size=12)
    expected = TF.resized_crop(x, 3, 2, 6, 6, [12, 12], antialias=False)
    torch.testing.assert_close(out[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-6, rtol=0)
    assert not torch.allclose(out, expected)  # the edge really is sampled differently


def test_fractional_box_is_bilinear_at_the_shifted_centres() -> None:
    # A same-size box shifted by a fraction of a pixel: output (i, j) = input at (top+i, left+j).
    x = images(b=1, c=2, h=12, w=12, seed=5)
    top, left, size = 1.5, 2.25, 6
    out = replay_views(x, params([[top, left, size, size, 0]]), out_size=size)
    img = x[0].double()
    expected = torch.empty(2, size, size, dtype=torch.float64)
    for i in range(size):
        for j in range(size):
            y, xx = top + i, left + j
            y0, x0 = int(y), int(xx)
            dy, dx = y - y0, xx - x0
            expected[:, i, j] = ((1 - dy) * (1 - dx) * img[:, y0, x0] + (1 - dy) * dx * img[:, y0, x0 + 1]
                                 + dy * (1 - dx) * img[:, y0 + 1, x0] + dy * dx * img[:, y0 + 1, x0 + 1])
    torch.testing.assert_close(out[0].double(), expected, atol=1e-5, rtol=0)


def test_box_outside_the_image_samples_zeros() -> None:
    x = torch.ones(1, 1, 8, 8)
    out = replay_views(x, params([[-7.5, 0, 8, 8, 0]]), out_size=8)  # fractional: resampled
    # Only the last row samples on the image's extent (its top edge): it takes the edge
    # pixel's value, as a resize would; every row above the image is zero.
    assert float(out[0, 0, -1].min()) == pytest.approx(1.0)
    assert float(out[0, 0, :-1].abs().max()) == 0.0


def test_upscaled_clean_view_has_no_dark_border() -> None:
    x = torch.ones(1, 1, 8, 8)
    out = replay_views(x, params([[0, 0, 8, 8, 0]]), out_size=16)  # 8 -> 16: resampled
    torch.testing.assert_close(out, torch.ones(1, 1, 16, 16))


@pytest.mark.parametrize("box", [[0, 0, 12, 12], [-3, 2, 12, 12], [1.5, 2.25, 7, 9], [2, 1, 5, 8]])
def test_flip_is_a_mirror(box: list[float]) -> None:
    x = images(b=1, h=12, w=12, seed=6)
    plain = replay_views(x, params([[*box, 0]]), out_size=12)
    flipped = replay_views(x, params([[*box, 1]]), out_size=12)
    torch.testing.assert_close(flipped, plain.flip(-1), atol=1e-6, rtol=0)
    assert not torch.allclose(flipped, plain)


def test_replay_does_not_depend_on_batch_composition() -> None:
    x = images(b=6, h=12, w=12, seed=7)
    p = params([
        [0, 0, 12, 12, 0],  # exact copy
        [-2, 3, 12, 12, 1],  # exact copy, padded and flipped
        [1.5, 2.25, 7, 9, 0],  # resampled
        [2, 1, 5, 8, 1],  # resampled, flipped
        [0, 0, 12, 12, 1],  # exact copy, flipped
        [-1.25, 0.5, 12, 12, 0],  # resampled (fractional), partly outside
    ])
    batch = replay_views(x, p, out_size=12)
    for i in range(6):
        alone = replay_views(x[i:i + 1], p[i:i + 1], out_size=12)
        assert torch.equal(alone[0], batch[i]), f"row {i}"
    order = torch.tensor([5, 2, 0, 3, 1, 4])
    assert torch.equal(replay_views(x[order], p[order], out_size=12), batch[order])
    only_resampled = torch.tensor([2, 3, 5])
    assert torch.equal(replay_views(x[only_resampled], p[only_resampled], out_size=12), batch[only_resampled])


def test_sampled_views_replay_to_the_output_size() -> None:
    x = images(b=20, h=H, w=W, seed=8)
    views = draw(POLICIES["rrc"], n=20, v=3)
    for v in range(3):
        out = replay_views(x, views[:, v], out_size=8)
        assert out.shape == (20, 3, 8, 8) and torch.isfinite(out).all()


def test_render_views_scales_and_normalises() -> None:
    u8 = torch.randint(0, 256, (3, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = render_views(u8, clean_views(3, 12, 12), out_size=12, mean=mean, std=std)
    expected = (u8.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)
    assert u8.dtype == torch.uint8  # input untouched
    with pytest.raises(ValueError, match="channels"):
        normalize(out, mean=(0.5,), std=(0.5,))


def test_replay_rejects_bad_inputs() -> None:
    x = images(b=2)
    with pytest.raises(ValueError, match="view params shape"):
        replay_views(x, clean_views(3, 12, 12), out_size=12)
    with pytest.raises(ValueError, match="float"):
        replay_views((x * 255).to(torch.uint8), clean_views(2, 12, 12), out_size=12)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        replay_views(x[0], clean_views(2, 12, 12), out_size=12)


@pytest.mark.parametrize("out_size", [12, 16])
def test_an_empty_batch_replays_to_an_empty_batch(out_size: int) -> None:
    out = replay_views(images(b=0), clean_views(0, 12, 12), out_size=out_size)
    assert out.shape == (0, 3, out_size, out_size)
