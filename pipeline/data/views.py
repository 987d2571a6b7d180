"""Augmented views as explicit parameters, and their exact, batched replay.

A view is a box in source-pixel coordinates plus a horizontal flip:
``(top, left, height, width, flip)`` (``schemas.layout.VIEW_FIELDS``). Boxes may reach
outside the image (the CIFAR pad-and-crop); outside pixels are zero, as with
``RandomCrop(padding=...)``, while inside the image's extent resampling clamps to the edge
pixels, as a resize does. The same :func:`replay_views` is used by ``embed`` (stage one)
and by the student loop (stage three), so the student sees exactly the pixels the teacher
saw. Integer same-size boxes are copied exactly (no interpolation); other boxes are
resampled bilinearly with ``grid_sample``, per sample, on whatever device the images are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from schemas.config import ViewPolicyConfig as ViewPolicy
from schemas.layout import VIEW_FIELDS

NUM_VIEW_FIELDS = len(VIEW_FIELDS)


def clean_views(num_images: int, height: int, width: int) -> Tensor:
    """``(N, 5)`` parameters of the clean evaluation view: the whole image, no flip."""
    params = torch.zeros(num_images, NUM_VIEW_FIELDS)
    params[:, 2] = height
    params[:, 3] = width
    return params


def sample_views(
    *,
    num_images: int,
    num_views: int,
    height: int,
    width: int,
    policy: ViewPolicy,
    generator: torch.Generator,
) -> Tensor:
    """Draw ``(N, V, 5)`` float32 view parameters; view 0 is always the clean view.

    Draws are made in one fixed order from ``generator``, so the same seed gives the same
    views whatever the worker layout.
    """
    if num_views < 1:
        raise ValueError(f"num_views = {num_views}: expected >= 1 (view 0 is the clean view)")
    out = clean_views(num_images * num_views, height, width).view(num_images, num_views, 5)
    extra = num_views - 1
    if extra == 0 or num_images == 0:
        return out
    shape = (num_images, extra)
    if policy.kind == "rrc":
        area = height * width
        u_scale = torch.rand(shape, generator=generator, dtype=torch.float64)
        u_ratio = torch.rand(shape, generator=generator, dtype=torch.float64)
        u_top = torch.rand(shape, generator=generator, dtype=torch.float64)
        u_left = torch.rand(shape, generator=generator, dtype=torch.float64)
        lo, hi = policy.scale
        scale = lo + (hi - lo) * u_scale
        log_lo, log_hi = math.log(policy.ratio[0]), math.log(policy.ratio[1])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
        # Integer boxes (as torchvision's RandomResizedCrop), clamped instead of rejected.
        box_w = torch.sqrt(area * scale * ratio).round().clamp(1, width)
        box_h = torch.sqrt(area * scale / ratio).round().clamp(1, height)
        top = torch.floor(u_top * (height - box_h + 1)).clamp(max=height - box_h)
        left = torch.floor(u_left * (width - box_w + 1)).clamp(max=width - box_w)
        out[:, 1:, 0] = top.float()
        out[:, 1:, 1] = left.float()
        out[:, 1:, 2] = box_h.float()
        out[:, 1:, 3] = box_w.float()
    elif policy.kind == "pad_crop":
        pad = policy.pad
        out[:, 1:, 0] = torch.randint(-pad, pad + 1, shape, generator=generator).float()
        out[:, 1:, 1] = torch.randint(-pad, pad + 1, shape, generator=generator).float()
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


def _copy_crops(images: Tensor, params: Tensor, out_size: int) -> Tensor:
    # images (B, C, H, W); params (B, 5) with integer boxes of size out_size.
    batch, _, height, width = images.shape
    top = params[:, 0].long()
    left = params[:, 1].long()
    pad = int(max(0, (-top).max(), (-left).max(), (top + out_size - height).max(),
                  (left + out_size - width).max()))
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    steps = torch.arange(out_size, device=images.device)
    rows = top[:, None] + pad + steps  # (B, S)
    cols = left[:, None] + pad + steps  # (B, S)
    flip = params[:, 4] > 0.5
    cols = torch.where(flip[:, None], cols.flip(-1), cols)
    b = torch.arange(batch, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (B, S, S, C)
    return out.permute(0, 3, 1, 2)


def _resample_crops(images: Tensor, params: Tensor, out_size: int) -> Tensor:
    # Affine map from output coords o in [-1, 1] to input coords (align_corners=False):
    # x_n = (w / W) * o + (2 * left + w) / W - 1, mirrored in o when flipped.
    batch, channels, height, width = images.shape
    p = params.to(torch.float64)
    top, left, h, w, flip = p.unbind(-1)
    sign = torch.where(flip > 0.5, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3, dtype=torch.float64, device=params.device)
    theta[:, 0, 0] = sign * w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta.to(images.dtype), [batch, channels, out_size, out_size],
                         align_corners=False)  # (B, S, S, 2)
    # Inside the image's extent, clamp to the edge pixels (as a resize does: no dark
    # border when upscaling); outside it (a box reaching past the image), zeros.
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside = (grid.abs() <= 1.0).all(-1)  # (B, S, S): sample point within the image extent
    return out * inside[:, None].to(out.dtype)


def replay_views(images: Tensor, params: Tensor, *, out_size: int) -> Tensor:
    """Crop/flip/resize ``images`` (B, C, H, W) float by ``params`` (B, 5) → (B, C, S, S).

    Deterministic and per-sample: the result for one image does not depend on the others
    in the batch, so any batching of the same (image, view) gives the same pixels.
    """
    if images.ndim != 4:
        raise ValueError(f"images shape {tuple(images.shape)}: expected (B, C, H, W)")
    if params.shape != (images.shape[0], NUM_VIEW_FIELDS):
        raise ValueError(f"view params shape {tuple(params.shape)}: expected ({images.shape[0]}, 5)")
    if not images.is_floating_point():
        raise ValueError(f"images dtype {images.dtype}: expected a float tensor (scale uint8 first)")
    params = params.to(device=images.device, dtype=torch.float32)
    if images.shape[0] == 0:  # nothing to crop (and the padding reduction needs a row)
        return images.new_zeros(0, images.shape[1], out_size, out_size)
    exact = _is_exact_copy(params, out_size)
    if bool(exact.all()):
        return _copy_crops(images, params, out_size)
    if not bool(exact.any()):
        return _resample_crops(images, params, out_size)
    out = images.new_empty(images.shape[0], images.shape[1], out_size, out_size)
    out[exact] = _copy_crops(images[exact], params[exact], out_size)
    out[~exact] = _resample_crops(images[~exact], params[~exact], out_size)
    return out


def normalize(images: Tensor, *, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Per-channel ``(x - mean) / std`` on (B, C, H, W) images in [0, 1]."""
    if images.shape[1] != len(mean):
        raise ValueError(
            f"images have {images.shape[1]} channels but preprocessing has {len(mean)} mean "
            "values; set teacher.in_chans / teacher.preprocess.mean to match the data"
        )
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


def render_views(
    images_u8: Tensor,
    params: Tensor,
    *,
    out_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> Tensor:
    """uint8 (B, C, H, W) images + (B, 5) views → normalised float32 (B, C, S, S) inputs.

    The single preprocessing path shared by teacher training, ``embed``, ``cache verify``
    and student training.
    """
    images = images_u8.float().div_(255.0)
    return normalize(replay_views(images, params, out_size=out_size), mean=mean, std=std)
