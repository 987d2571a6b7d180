"""Augmented views as explicit parameters, and their exact replay.

A view is a box in source-pixel coordinates plus a horizontal flip:
``(top, left, height, width, flip)`` (``schemas.layout.VIEW_FIELDS``), drawn per image on
that image's own size (:func:`sample_views`). Boxes may reach outside the image (the CIFAR
pad-and-crop): an output pixel whose filter reaches no image pixel is zero, as with
``RandomCrop(padding=...)`` (exactly so for the integer pad-crop boxes, which are copies),
while one whose filter still reaches the image takes the image's edge, as a resize does. The same
:func:`render_views` turns (image, view) into a model input for teacher fine-tuning,
``embed`` (stage one), ``cache verify`` and the student (stage three), so the student sees
exactly the pixels the teacher saw, at its own input size if it differs. Integer boxes of
the output size are copied exactly (no interpolation); other boxes are resampled with the
antialiased filter of :mod:`pipeline.data.resample`, per sample, on whatever device the
images are: a batch at once for same-size images, one by one for images of many sizes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.data.resample import RADIUS, resample_boxes
from schemas.config import ViewPolicyConfig as ViewPolicy
from schemas.layout import VIEW_FIELDS

NUM_VIEW_FIELDS = len(VIEW_FIELDS)
RRC_ATTEMPTS = 10  # torchvision's RandomResizedCrop: 10 tries, then the centre fallback
_RRC_CHUNK = 4096  # rows drawn at a time (bounds memory; part of the draw order, never change)


def image_sizes(sizes: Tensor | np.ndarray | list, num_images: int | None = None) -> Tensor:
    """``(N, 2)`` int64 ``(height, width)`` per image from a list, array or tensor; a single
    ``(height, width)`` pair is repeated ``num_images`` times."""
    out = torch.as_tensor(np.asarray(sizes), dtype=torch.int64)
    if out.ndim == 1 and num_images is not None:
        out = out.expand(num_images, 2)
    if out.ndim != 2 or out.shape[1] != 2 or (len(out) and int(out.min()) < 1):
        raise ValueError(f"image sizes of shape {tuple(out.shape)}: expected (N, 2) positive (height, width)")
    return out


def clean_views(sizes: Tensor, *, image_size: int, crop_pct: float) -> Tensor:
    """``(N, 5)`` boxes of the standard evaluation view: the shorter side resized to
    ``floor(image_size / crop_pct)`` (torchvision ``Resize``: the longer side truncated),
    then a centre crop of ``image_size`` (torchvision ``CenterCrop`` offsets), expressed in
    source pixels; no flip. With ``crop_pct = 1`` and ``image_size`` equal to a square image's
    side this is the whole image."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct = {crop_pct}: expected 0 < crop_pct <= 1")
    sizes = sizes.to(torch.int64)
    h, w = sizes[:, 0], sizes[:, 1]
    target = math.floor(image_size / crop_pct)
    short, long = torch.minimum(h, w), torch.maximum(h, w)
    resized_long = torch.floor(target * long.double() / short.double()).long()
    rh = torch.where(h <= w, torch.full_like(h, target), resized_long)  # resized height
    rw = torch.where(h <= w, resized_long, torch.full_like(w, target))
    rh = torch.where(short == target, h, rh)  # torchvision leaves an image of the right size alone
    rw = torch.where(short == target, w, rw)
    crop_top = torch.round((rh - image_size).double() / 2.0)  # CenterCrop: int(round((h - S) / 2))
    crop_left = torch.round((rw - image_size).double() / 2.0)
    out = torch.zeros(len(sizes), NUM_VIEW_FIELDS, dtype=torch.float64)
    out[:, 0] = crop_top * h / rh
    out[:, 1] = crop_left * w / rw
    out[:, 2] = image_size * h.double() / rh
    out[:, 3] = image_size * w.double() / rw
    return out.float()


def _rrc_boxes(sizes: Tensor, extra: int, policy: ViewPolicy, generator: torch.Generator) -> Tensor:
    """torchvision's ``RandomResizedCrop.get_params`` for ``extra`` views of every image,
    vectorised: up to 10 tries of (area fraction, log-uniform aspect ratio), the first box
    that fits wins, its offset uniform; none fits → the centre crop at the clamped ratio.
    Returns (N, extra, 4) float64 integer boxes."""
    out = []
    log_lo, log_hi = math.log(policy.ratio[0]), math.log(policy.ratio[1])
    lo, hi = policy.scale
    for start in range(0, len(sizes), _RRC_CHUNK):
        part = sizes[start:start + _RRC_CHUNK].double()
        n = len(part)
        height, width = part[:, 0, None, None], part[:, 1, None, None]  # (n, 1, 1)
        u = torch.rand((n, extra, RRC_ATTEMPTS, 4), generator=generator, dtype=torch.float64)
        target = height * width * (lo + (hi - lo) * u[..., 0])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
        box_w = torch.round(torch.sqrt(target * aspect))
        box_h = torch.round(torch.sqrt(target / aspect))
        fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)  # (n, extra, tries)
        first = fits.to(torch.int8).argmax(-1, keepdim=True)  # the first try that fits
        pick = lambda t: t.gather(-1, first)[..., 0]  # noqa: E731
        box_h, box_w = pick(box_h), pick(box_w)
        top = torch.floor(pick(u[..., 2]) * (height[..., 0] - box_h + 1))
        left = torch.floor(pick(u[..., 3]) * (width[..., 0] - box_w + 1))
        # Fallback (torchvision): whole image, aspect clamped into the ratio range, centred.
        h_img, w_img = height[..., 0].expand_as(box_h), width[..., 0].expand_as(box_w)
        in_ratio = w_img / h_img
        fb_w = torch.where(in_ratio > policy.ratio[1], torch.round(h_img * policy.ratio[1]), w_img)
        fb_h = torch.where(in_ratio < policy.ratio[0], torch.round(w_img / policy.ratio[0]), h_img)
        fb_top, fb_left = torch.div(h_img - fb_h, 2, rounding_mode="floor"), torch.div(w_img - fb_w, 2,
                                                                                      rounding_mode="floor")
        ok = fits.any(-1)
        out.append(torch.stack([torch.where(ok, top, fb_top), torch.where(ok, left, fb_left),
                                torch.where(ok, box_h, fb_h), torch.where(ok, box_w, fb_w)], -1))
    return torch.cat(out) if out else torch.zeros(0, extra, 4, dtype=torch.float64)


def sample_views(
    *,
    sizes: Tensor,
    num_views: int,
    policy: ViewPolicy,
    image_size: int,
    crop_pct: float,
    generator: torch.Generator,
) -> Tensor:
    """Draw ``(N, V, 5)`` float32 view boxes for images of ``sizes`` (N, 2); view 0 is always
    the clean view (:func:`clean_views` of the model's ``image_size`` and ``crop_pct``).

    ``rrc``: torchvision's random-resized crop on each image's own size. ``pad_crop``: the
    clean box shifted by up to ``pad`` source pixels (the CIFAR crop, zero padding). Draws
    are made in one fixed order from ``generator``, so the same seed gives the same views
    whatever the worker layout.
    """
    if num_views < 1:
        raise ValueError(f"num_views = {num_views}: expected >= 1 (view 0 is the clean view)")
    clean = clean_views(sizes, image_size=image_size, crop_pct=crop_pct)  # (N, 5)
    num_images = len(sizes)
    out = clean[:, None, :].repeat(1, num_views, 1)
    extra = num_views - 1
    if extra == 0 or num_images == 0:
        return out
    shape = (num_images, extra)
    if policy.kind == "rrc":
        out[:, 1:, :4] = _rrc_boxes(sizes, extra, policy, generator).float()
    elif policy.kind == "pad_crop":
        pad = policy.pad
        out[:, 1:, 0] += torch.randint(-pad, pad + 1, shape, generator=generator).float()
        out[:, 1:, 1] += torch.randint(-pad, pad + 1, shape, generator=generator).float()
    elif policy.kind != "none":
        raise ValueError(f"view policy kind = {policy.kind!r}: expected 'rrc', 'pad_crop' or 'none'")
    if policy.flip:
        out[:, 1:, 4] = (torch.rand(shape, generator=generator) < 0.5).float()
    return out


def _is_exact_copy(params: Tensor, out_size: int) -> Tensor:
    """Rows whose box is an integer, output-sized box: replayed by exact pixel copy."""
    top, left, h, w = params[:, 0], params[:, 1], params[:, 2], params[:, 3]
    integral = (top == top.round()) & (left == left.round())
    return integral & (h == out_size) & (w == out_size)


def _copy_crops(images: Tensor, params: Tensor, out_size: int, pad: int) -> Tensor:
    # images (B, C, H, W); params (B, 5) with integer boxes of size out_size, reaching at most
    # ``pad`` pixels past the image (any larger value gives the same pixels).
    batch, _, height, width = images.shape
    params = params.to(images.device, non_blocking=True)
    top = params[:, 0].long()
    left = params[:, 1].long()
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    steps = torch.arange(out_size, device=images.device)
    rows = top[:, None] + pad + steps  # (B, S)
    cols = left[:, None] + pad + steps  # (B, S)
    flip = params[:, 4] > 0.5
    cols = torch.where(flip[:, None], cols.flip(-1), cols)
    b = torch.arange(batch, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (B, S, S, C)
    return out.permute(0, 3, 1, 2)


def replay_views(images: Tensor, params: Tensor, *, out_size: int, interpolation: str = "bilinear") -> Tensor:
    """Crop/flip/resize ``images`` (B, C, H, W) float by ``params`` (B, 5) → (B, C, S, S).

    Deterministic and per-sample: the result for one image does not depend on the others
    in the batch, so any batching of the same (image, view) gives the same pixels. Integer
    output-sized boxes are copied exactly; others go through
    :func:`pipeline.data.resample.resample_boxes`.
    """
    if images.ndim != 4:
        raise ValueError(f"images shape {tuple(images.shape)}: expected (B, C, H, W)")
    if params.shape != (images.shape[0], NUM_VIEW_FIELDS):
        raise ValueError(f"view params shape {tuple(params.shape)}: expected ({images.shape[0]}, 5)")
    if not images.is_floating_point():
        raise ValueError(f"images dtype {images.dtype}: expected a float tensor (scale uint8 first)")
    params = params.to(dtype=torch.float32)
    if images.shape[0] == 0:  # nothing to crop (and the padding reduction needs a row)
        return images.new_zeros(0, images.shape[1], out_size, out_size)
    # Decided where the params are: host params (every batch source and embed keep them
    # there) cost the device no synchronisation; device params cost one here.
    exact = _is_exact_copy(params, out_size)
    height, width = images.shape[2:]
    top, left = params[:, 0], params[:, 1]
    reach = torch.stack([-top, -left, top + out_size - height, left + out_size - width]).amax()
    pad = max(0, int(reach))
    all_exact, any_exact = bool(exact.all()), bool(exact.any())
    if all_exact:
        return _copy_crops(images, params, out_size, pad)
    resample = functools.partial(resample_boxes, out_size=out_size, interpolation=interpolation)
    if not any_exact:
        return resample(images, params.to(images.device, non_blocking=True))
    # Rows split by integer indices found where the params are: a boolean mask on the device
    # would make the device count its True entries (a synchronisation) at every batch.
    copy_rows, other_rows = exact.nonzero().squeeze(1), (~exact).nonzero().squeeze(1)
    copy_d = copy_rows.to(images.device, non_blocking=True)
    other_d = other_rows.to(images.device, non_blocking=True)
    out = images.new_empty(images.shape[0], images.shape[1], out_size, out_size)
    out[copy_d] = _copy_crops(images[copy_d], params[copy_rows], out_size, pad)
    out[other_d] = resample(images[other_d], params[other_rows].to(images.device, non_blocking=True))
    return out


def normalize(images: Tensor, *, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Per-channel ``(x - mean) / std`` on (B, C, H, W) images in [0, 1]."""
    if images.shape[1] != len(mean):
        raise ValueError(
            f"images have {images.shape[1]} channels but preprocessing has {len(mean)} mean "
            "values; set teacher.in_chans / teacher.preprocess.mean to match the data"
        )
    m, s = _constants(mean, std, images.device, images.dtype)
    return (images - m) / s


@functools.lru_cache(maxsize=16)
def _constants(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
               dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(1, C, 1, 1) mean and std on ``device``, made once (no host-to-device copy per batch)."""
    return (torch.tensor(mean, device=device, dtype=dtype).view(1, -1, 1, 1),
            torch.tensor(std, device=device, dtype=dtype).view(1, -1, 1, 1))


def _window(image: Tensor, box: Tensor, *, out_size: int, interpolation: str) -> tuple[Tensor, Tensor]:
    """The part of a uint8 image (C, H, W) that the filter of ``box`` (5,) can reach, and the
    box in its coordinates: only those pixels are converted to float and resampled (a large
    photo's small crop costs the crop, not the photo). Taps outside it have zero weight."""
    out = box.clone()
    bounds = []
    for axis, (start, length) in enumerate(((box[0], box[2]), (box[1], box[3]))):
        size = image.shape[1 + axis]
        reach = RADIUS[interpolation] * max(float(length) / out_size, 1.0) + 1.0
        lo = max(0, math.floor(float(start) - reach))
        hi = min(size, math.ceil(float(start + length) + reach))
        if lo >= hi:  # the box misses the image: keep it whole (the output is zero)
            lo, hi = 0, size
        bounds.append((lo, hi))
        out[axis] = start - lo
    (r0, r1), (c0, c1) = bounds
    return image[:, r0:r1, c0:c1], out


def render_views(
    images_u8: Tensor | Sequence[Tensor],
    params: Tensor,
    *,
    out_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    interpolation: str = "bilinear",
) -> Tensor:
    """uint8 images + (B, 5) views → normalised float32 (B, C, S, S) inputs.

    ``images_u8`` is a batch (B, C, H, W) of same-size images (replayed together, on their
    device) or a sequence of B images (C, H_i, W_i) of any sizes (replayed one by one, then
    stacked). The single preprocessing path shared by teacher training, ``embed``, ``cache
    verify``, student training and evaluation.
    """
    return normalize(render_pixels(images_u8, params, out_size=out_size, interpolation=interpolation,
                                   channels=len(mean)), mean=mean, std=std)


def render_pixels(images_u8: Tensor | Sequence[Tensor], params: Tensor, *, out_size: int, interpolation: str,
                  channels: int) -> Tensor:
    """uint8 images + (B, 5) views → float32 (B, C, S, S) pixels in [0, 1], before
    normalisation (what :func:`render_views` normalises; mixed views mix these)."""
    if isinstance(images_u8, Tensor):
        images = replay_views(images_u8.double(), params, out_size=out_size, interpolation=interpolation)
    else:
        if len(images_u8) != len(params):
            raise ValueError(f"{len(images_u8)} images but {len(params)} view params; expected one view per image")
        parts = []
        for image, box in zip(images_u8, params.to(torch.float32), strict=True):
            image, box = _window(image, box, out_size=out_size, interpolation=interpolation)
            parts.append(replay_views(image[None].double(), box[None], out_size=out_size,
                                      interpolation=interpolation))
        images = torch.cat(parts) if parts else torch.zeros(0, channels, out_size, out_size, dtype=torch.float64)
    # Rendered on the 0..255 values in float64 (exact: the same bits in any batch), then
    # scaled; k / 255 rounds to the float32 that float32(k) / 255 gives (checked for every k).
    images = images.div_(255.0).float()
    # A bicubic filter overshoots near sharp edges; image loaders clip to the pixel range
    # (PIL, torchvision on uint8), and so does the replay: the eval view is theirs.
    return images.clamp_(0.0, 1.0)
