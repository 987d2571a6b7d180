"""View sampling and replay (`pipeline.data.views`, `pipeline.data.resample`): the pixels
the teacher saw, exactly, on images of any size; torchvision / PIL as references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision import transforms as T

from pipeline.data.preprocess import Preprocess, render_inputs
from pipeline.data.views import (
    clean_views,
    image_sizes,
    normalize,
    render_views,
    replay_views,
    sample_views,
)
from schemas.config import ViewPolicyConfig
from view_reference import torchvision_get_params

pytestmark = pytest.mark.usefixtures("one_thread")

H, W = 10, 14  # non-square on purpose: catches height/width mix-ups
POLICIES = {
    "rrc": ViewPolicyConfig(kind="rrc", scale=(0.2, 1.0)),
    "pad_crop": ViewPolicyConfig(kind="pad_crop", pad=3),
    "none": ViewPolicyConfig(kind="none"),
}
MODES = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


def whole(n: int, h: int, w: int) -> torch.Tensor:
    """(n, 5) boxes covering the whole h × w image, no flip."""
    return torch.tensor([[0.0, 0.0, h, w, 0.0]]).repeat(n, 1)


def draw(policy: ViewPolicyConfig, seed: int = 0, n: int = 200, v: int = 5, h: int = H, w: int = W,
         image_size: int | None = None) -> torch.Tensor:
    return sample_views(sizes=image_sizes([h, w], n), num_views=v, policy=policy, image_size=image_size or h,
                        crop_pct=1.0, generator=torch.Generator().manual_seed(seed))


def images(b: int = 6, c: int = 3, h: int = 12, w: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def params(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_view_zero_is_the_clean_view(kind: str) -> None:
    views = draw(POLICIES[kind], h=12, w=12)
    assert views.shape == (200, 5, 5) and views.dtype == torch.float32
    assert torch.equal(views[:, 0], whole(200, 12, 12))  # square, crop_pct 1, S = side: the whole image
    # Non-square: the shorter side is S already, the centre S × S (torchvision CenterCrop offsets).
    views = draw(POLICIES[kind])
    assert torch.equal(views[0, 0], torch.tensor([0.0, 2.0, 10.0, 10.0, 0.0]))


@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_sample_views_is_deterministic_for_a_seed(kind: str) -> None:
    assert torch.equal(draw(POLICIES[kind], seed=3), draw(POLICIES[kind], seed=3))
    assert not torch.equal(draw(POLICIES[kind], seed=3), draw(POLICIES[kind], seed=4))


def test_single_view_draws_nothing() -> None:
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    views = sample_views(sizes=image_sizes([12, 12], 4), num_views=1, policy=POLICIES["rrc"], image_size=12,
                         crop_pct=1.0, generator=generator)
    assert torch.equal(views[:, 0], whole(4, 12, 12))
    assert torch.equal(generator.get_state(), state)
    with pytest.raises(ValueError, match="num_views"):
        sample_views(sizes=image_sizes([12, 12], 4), num_views=0, policy=POLICIES["rrc"], image_size=12,
                     crop_pct=1.0, generator=generator)


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.9, 1.0)])
def test_rrc_is_torchvisions_algorithm_on_each_images_size(scale: tuple[float, float]) -> None:
    sizes = torch.tensor([[10, 14], [40, 30], [7, 90], [90, 7], [33, 33], [5, 200]])  # incl. fallback cases
    policy = ViewPolicyConfig(kind="rrc", scale=scale, flip=False)
    views = sample_views(sizes=sizes, num_views=4, policy=policy, image_size=8, crop_pct=1.0,
                         generator=torch.Generator().manual_seed(1))
    u = torch.rand((len(sizes), 3, 10, 4), generator=torch.Generator().manual_seed(1), dtype=torch.float64).numpy()
    fallbacks = 0
    for i, (h, w) in enumerate(sizes.tolist()):
        for k in range(3):
            expected = torchvision_get_params(u[i, k], h, w, scale, policy.ratio)
            assert tuple(int(x) for x in views[i, k + 1, :4].tolist()) == expected, (i, k, h, w)
            fallbacks += expected == torchvision_get_params(np.full((0, 4), 0.0), h, w, scale, policy.ratio)
    if scale[0] == 0.9:
        assert fallbacks >= 6  # the thin images never fit a 0.9-area box of ratio 3:4..4:3


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
    views = draw(POLICIES["pad_crop"], h=12, w=12)[:, 1:]
    top, left, h, w, _ = views.unbind(-1)
    assert torch.equal(h, torch.full_like(h, 12)) and torch.equal(w, torch.full_like(w, 12))
    assert (top.abs() <= pad).all() and (left.abs() <= pad).all()
    assert set(top.unique().tolist()) == set(range(-pad, pad + 1))  # every offset is reachable
    assert set(left.unique().tolist()) == set(range(-pad, pad + 1))


def test_policy_none_and_no_flip() -> None:
    views = draw(POLICIES["none"])
    assert torch.equal(views[..., :4], views[:, :1, :4].expand(200, 5, 4))  # every view is the clean box
    assert views[:, 1:, 4].sum() > 0  # flips only
    no_flip = draw(ViewPolicyConfig(kind="rrc", flip=False))
    assert not no_flip[..., 4].any()


def test_replay_of_the_clean_view_is_the_identity() -> None:
    x = images(b=5, h=12, w=12)
    out = replay_views(x, whole(5, 12, 12), out_size=12)
    assert torch.equal(out, x)


@pytest.mark.parametrize("interpolation", sorted(MODES))
@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
@pytest.mark.parametrize("size", [(37, 53), (200, 150), (20, 30), (32, 32), (24, 300)])
def test_clean_view_is_torchvisions_resize_and_centre_crop_on_tensors(interpolation: str, crop_pct: float,
                                                                       size: tuple[int, int]) -> None:
    h, w = size
    x = images(b=1, h=h, w=w, seed=h * w)
    out_size = 16
    box = clean_views(torch.tensor([size]), image_size=out_size, crop_pct=crop_pct)
    got = replay_views(x, box, out_size=out_size, interpolation=interpolation)
    resized = TF.resize(x, math.floor(out_size / crop_pct), interpolation=MODES[interpolation], antialias=True)
    expected = TF.center_crop(resized, [out_size, out_size])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# PIL resizes uint8 images with 8-bit intermediate rounding (and clips bicubic overshoot): the
# stated tolerance against PIL, on [0, 1] pixels, measured on smooth (photo-like) images.
PIL_MAX_ERR = {"bilinear": 1.5 / 255, "bicubic": 3.0 / 255}
PIL_MEAN_ERR = 0.5 / 255


@pytest.mark.parametrize("interpolation", sorted(MODES))
@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
@pytest.mark.parametrize("size", [(40, 53), (400, 300), (37, 37), (33, 200)])
def test_clean_view_matches_the_timm_eval_transform_on_pil_images(interpolation: str, crop_pct: float,
                                                                  size: tuple[int, int]) -> None:
    h, w = size
    rng = np.random.default_rng(h + w)
    photo = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    out_size = 32
    expected = T.Compose([T.Resize(math.floor(out_size / crop_pct), interpolation=MODES[interpolation]),
                          T.CenterCrop(out_size), T.ToTensor()])(photo)
    pre = Preprocess(image_size=out_size, crop_pct=crop_pct, interpolation=interpolation, mean=(0.0,) * 3,
                     std=(1.0,) * 3)
    image = torch.from_numpy(np.asarray(photo).transpose(2, 0, 1).copy())
    got = render_inputs([image], pre.clean_views(torch.tensor([size])), preprocess=pre)[0]
    err = (got - expected).abs()
    assert float(err.max()) <= PIL_MAX_ERR[interpolation] and float(err.mean()) <= PIL_MEAN_ERR


@pytest.mark.parametrize("interpolation", sorted(MODES))
def test_a_whole_image_box_is_torchs_antialiased_resize(interpolation: str) -> None:
    x = images(b=1, h=37, w=53, seed=3)
    for out_size in (8, 16, 64):  # shrinking (antialiased) and growing
        got = replay_views(x, whole(1, 37, 53), out_size=out_size, interpolation=interpolation)
        expected = F.interpolate(x, size=(out_size, out_size), mode=interpolation, antialias=True,
                                 align_corners=False)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("interpolation", sorted(MODES))
def test_an_rrc_box_is_torchvisions_resized_crop_inside_the_border(interpolation: str) -> None:
    # torchvision crops first, so its border output pixels clamp at the box; replay's filter
    # also weighs the image pixels just outside the box. Away from the border they agree.
    x = images(b=1, h=60, w=80, seed=4)
    top, left, h, w, out_size = 7, 11, 30, 40, 16  # shrinking by 1.875 / 2.5
    got = replay_views(x, params([[top, left, h, w, 0]]), out_size=out_size, interpolation=interpolation)
    expected = TF.resized_crop(x, top, left, h, w, [out_size, out_size], interpolation=MODES[interpolation],
                               antialias=True)
    torch.testing.assert_close(got[..., 3:-3, 3:-3], expected[..., 3:-3, 3:-3], atol=1e-5, rtol=0)


def test_images_of_many_sizes_render_one_by_one_as_they_would_alone() -> None:
    rng = torch.Generator().manual_seed(5)
    sizes = [(20, 31), (64, 48), (12, 12)]
    u8 = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=rng) for h, w in sizes]
    views = sample_views(sizes=torch.tensor(sizes), num_views=3, policy=POLICIES["rrc"], image_size=16, crop_pct=0.9,
                         generator=rng)[:, 2]
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = render_views(u8, views, out_size=16, mean=mean, std=std)
    assert out.shape == (3, 3, 16, 16)
    for i, image in enumerate(u8):
        alone = render_views(image[None], views[i:i + 1], out_size=16, mean=mean, std=std)
        assert torch.equal(out[i], alone[0])


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


@pytest.mark.parametrize("interpolation", sorted(MODES))
def test_upscaled_clean_view_has_no_dark_border(interpolation: str) -> None:
    x = torch.ones(1, 1, 8, 8)
    out = replay_views(x, params([[0, 0, 8, 8, 0]]), out_size=16, interpolation=interpolation)  # 8 -> 16
    torch.testing.assert_close(out, torch.ones(1, 1, 16, 16))


@pytest.mark.parametrize("box", [[0, 0, 12, 12], [-3, 2, 12, 12], [1.5, 2.25, 7, 9], [2, 1, 5, 8]])
def test_flip_is_a_mirror(box: list[float]) -> None:
    x = images(b=1, h=12, w=12, seed=6)
    plain = replay_views(x, params([[*box, 0]]), out_size=12)
    flipped = replay_views(x, params([[*box, 1]]), out_size=12)
    torch.testing.assert_close(flipped, plain.flip(-1), atol=1e-6, rtol=0)
    assert not torch.allclose(flipped, plain)


def test_replay_does_not_depend_on_batch_composition() -> None:
    # Integer-valued pixels, as render_pixels passes (0..255): there the float64 sums are exact.
    x = torch.round(images(b=6, h=12, w=12, seed=7) * 255)
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
    views = draw(POLICIES["rrc"], n=20, v=3, image_size=8)
    for v in range(3):
        out = replay_views(x, views[:, v], out_size=8)
        assert out.shape == (20, 3, 8, 8) and torch.isfinite(out).all()


def test_render_views_scales_and_normalises() -> None:
    u8 = torch.randint(0, 256, (3, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = render_views(u8, whole(3, 12, 12), out_size=12, mean=mean, std=std)
    expected = (u8.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)
    assert u8.dtype == torch.uint8  # input untouched
    with pytest.raises(ValueError, match="channels"):
        normalize(out, mean=(0.5,), std=(0.5,))


def test_replay_rejects_bad_inputs() -> None:
    x = images(b=2)
    with pytest.raises(ValueError, match="view params shape"):
        replay_views(x, whole(3, 12, 12), out_size=12)
    with pytest.raises(ValueError, match="float"):
        replay_views((x * 255).to(torch.uint8), whole(2, 12, 12), out_size=12)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        replay_views(x[0], whole(2, 12, 12), out_size=12)


@pytest.mark.parametrize("out_size", [12, 16])
def test_an_empty_batch_replays_to_an_empty_batch(out_size: int) -> None:
    out = replay_views(images(b=0), whole(0, 12, 12), out_size=out_size)
    assert out.shape == (0, 3, out_size, out_size)


def test_same_size_pad_crop_views_are_the_ones_earlier_versions_drew() -> None:
    """Same-size sets keep their caches bit for bit: the CIFAR pad-and-crop views of 100 images
    (seed 0) hash to what the sampler drew before images of any size were supported (measured
    at commit 427d1c4); their replay is an exact copy (test_integer_pad_crop_equals_pad_and_slice)."""
    import hashlib

    views = sample_views(sizes=image_sizes([32, 32], 100), num_views=4, image_size=32, crop_pct=1.0,
                         policy=ViewPolicyConfig(kind="pad_crop", pad=4, flip=True),
                         generator=torch.Generator().manual_seed(0))
    digest = hashlib.sha256(views.numpy().tobytes()).hexdigest()
    assert digest == "1094fab5155f8a2e353a58f68f497e4bc9b0e035b81e45fde15390dbad0eb435"
