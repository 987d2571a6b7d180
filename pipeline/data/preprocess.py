"""A model's input preprocessing, and the one path from (uint8 image, view) to model input.

Teacher fine-tuning, ``embed``, ``cache verify``, distillation and evaluation all call
:func:`render_inputs`, so every model sees exactly the pixels the teacher saw for a view
(a student with another input size or normalisation sees the same box at its own size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.data.resample import INTERPOLATIONS
from pipeline.data.mixup import MIX_FIELDS, cut_boxes, is_cut, is_mixed
from pipeline.data.views import clean_views, normalize, render_pixels, render_views
from pipeline.models.errors import ModelFileError

__all__ = ["Preprocess", "PreprocessError", "render_inputs", "resolve_preprocess"]

SPEC_KEYS = ("image_size", "crop_pct", "interpolation", "mean", "std")


class PreprocessError(ValueError):
    """A model's preprocessing cannot be resolved from the params and the model."""


@dataclass(frozen=True)
class Preprocess:
    """A model's input: square size, the evaluation crop fraction (clean view = shorter side
    to ``image_size / crop_pct``, centre crop), the resampling filter, and the per-channel
    normalisation."""

    image_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation = {self.interpolation!r}: expected one of {list(INTERPOLATIONS)}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct = {self.crop_pct}: expected 0 < crop_pct <= 1")

    @classmethod
    def from_spec(cls, spec: dict[str, Any], *, source: str) -> Preprocess:
        """The ``preprocess`` entry of a frozen model's spec (as ``cifd teacher`` writes it)."""
        pre = spec.get("preprocess")
        if not isinstance(pre, dict) or not set(SPEC_KEYS) <= set(pre):
            raise ModelFileError(
                f"model {source}: its spec has preprocess = {pre!r}, expected a mapping with {', '.join(SPEC_KEYS)}; "
                "freeze the teacher again with `cifd teacher` (older files lack crop_pct and interpolation)"
            )
        try:
            return cls(image_size=int(pre["image_size"]), crop_pct=float(pre["crop_pct"]),
                       interpolation=str(pre["interpolation"]), mean=tuple(float(m) for m in pre["mean"]),
                       std=tuple(float(s) for s in pre["std"]))
        except (TypeError, ValueError) as exc:
            raise ModelFileError(f"model {source}: its spec's preprocess {pre!r} is invalid ({exc})") from exc

    def to_spec(self) -> dict[str, Any]:
        """The JSON form recorded in model files and cache provenance."""
        spec = asdict(self)
        spec["mean"], spec["std"] = list(self.mean), list(self.std)
        return spec

    def clean_views(self, sizes: Tensor) -> Tensor:
        """(N, 5) clean evaluation views of images of ``sizes`` (N, 2) for this input."""
        return clean_views(sizes, image_size=self.image_size, crop_pct=self.crop_pct)


def render_inputs(images: Tensor | Sequence[Tensor], views: Tensor, *, preprocess: Preprocess,
                  channels_last: bool = False, mix: tuple[Tensor | Sequence[Tensor], Tensor] | None = None) -> Tensor:
    """uint8 images (B, C, H, W), or B images (C, H_i, W_i) of any sizes, + their view
    parameters (B, 5) → model inputs (B, C, S, S).

    ``mix``: ``(partners, params)``, the partner image of every row (same form as ``images``)
    and its mix params (B, 6): ``(λ, partner box)``, or (B, 10) with the CutMix box
    (:mod:`pipeline.data.mixup`). A row with λ < 1 is ``normalise(λ · pixels(image, view) +
    (1 − λ) · pixels(partner, box))``, or, when it has a CutMix box, its own pixels with that
    box's pixels copied from the partner's; the others render as without ``mix`` (their
    partner is not read). Each row's result depends on that row alone, so any batching of the
    same (row, view) gives the same input."""
    if mix is None:
        x = render_views(images, views, out_size=preprocess.image_size, mean=preprocess.mean, std=preprocess.std,
                         interpolation=preprocess.interpolation)
    else:
        partners, params = mix
        size, filt, channels = preprocess.image_size, preprocess.interpolation, len(preprocess.mean)
        pixels = render_pixels(images, views, out_size=size, interpolation=filt, channels=channels)
        params = params.to(torch.float32)
        rows = is_mixed(params).nonzero().squeeze(1)  # decided where the params are (host: no sync)
        if len(rows):
            if isinstance(partners, Tensor):
                chosen: Tensor | list[Tensor] = partners[rows.to(partners.device)]
            else:
                chosen = [partners[i] for i in rows.tolist()]
            other = render_pixels(chosen, params[rows, 1:len(MIX_FIELDS)], out_size=size, interpolation=filt, channels=channels)
            at = rows.to(pixels.device)
            other = other.to(pixels.device)
            if params.shape[1] > len(MIX_FIELDS):  # CutMix views paste their box; the rest blend
                box = cut_boxes(params[rows], size).to(pixels.device)
                grid = torch.arange(size, device=pixels.device)
                inside_y = (grid >= box[:, :1]) & (grid < box[:, :1] + box[:, 2:3])
                inside_x = (grid >= box[:, 1:2]) & (grid < box[:, 1:2] + box[:, 3:4])
                pasted = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]  # (R, 1, S, S)
                blend = ~is_cut(params[rows]).to(pixels.device).view(-1, 1, 1, 1)  # a box lost at this size: none
            else:
                pasted = blend = torch.ones(len(rows), 1, 1, 1, dtype=torch.bool, device=pixels.device)
            lam = params[rows, 0].to(pixels.device).view(-1, 1, 1, 1)
            mixed = torch.where(blend, lam * pixels[at] + (1.0 - lam) * other, torch.where(pasted, other, pixels[at]))
            pixels[at] = mixed
        x = normalize(pixels, mean=preprocess.mean, std=preprocess.std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def timm_data_config(model: nn.Module) -> dict[str, Any] | None:
    """timm's resolved data config of a timm model (its ``pretrained_cfg``; an
    ``ImageClassifier``'s backbone), else None."""
    model = getattr(model, "backbone", model)
    if getattr(model, "pretrained_cfg", None) is None:
        return None
    from timm.data import resolve_model_data_config

    config = dict(resolve_model_data_config(model))
    size = config.pop("input_size")
    config["image_size"] = int(size[-1]) if size[-1] == size[-2] else None
    return config


def resolve_preprocess(given: Mapping[str, Any], model: nn.Module, *, in_chans: int, fallback: Mapping[str, Any],
                       section: str) -> tuple[Preprocess, dict[str, str]]:
    """The model's :class:`Preprocess`: each field from ``given`` (the params; null = not
    given), else the model's timm pretrained config, else ``fallback``. Returns it and where
    each field came from (``params`` / ``timm pretrained config`` / ``fallback``)."""
    timm_cfg = timm_data_config(model)
    if timm_cfg is not None and timm_cfg.get("crop_mode", "center") != "center":
        timm_cfg = {k: v for k, v in timm_cfg.items() if k != "crop_pct"}  # only centre crops are replayed
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key in SPEC_KEYS:
        for name, source in (("params", given), ("timm pretrained config", timm_cfg or {}), ("fallback", fallback)):
            if source.get(key) is not None:
                values[key], origin[key] = source[key], name
                break
        else:
            why = ("the model has no timm pretrained config to take it from" if timm_cfg is None else
                   "the model's timm pretrained config has a non-square input size" if key == "image_size" else
                   "the model's timm pretrained config does not give it")
            raise PreprocessError(f"params '{section}.{key}' is not given and {why}; set {section}.{key}")
    for key in ("mean", "std"):
        if len(values[key]) != in_chans:
            raise PreprocessError(
                f"{section}.{key} = {list(values[key])} (from the {origin[key]}) has {len(values[key])} values but "
                f"the model takes {in_chans} channels; set {section}.{key} to {in_chans} values")
    try:
        pre = Preprocess(image_size=int(values["image_size"]), crop_pct=float(values["crop_pct"]),
                         interpolation=str(values["interpolation"]), mean=tuple(float(v) for v in values["mean"]),
                         std=tuple(float(v) for v in values["std"]))
    except ValueError as exc:
        bad = next((k for k in ("interpolation", "crop_pct") if k in str(exc)), "image_size")
        raise PreprocessError(f"{section}.{bad}: {exc} (from the {origin[bad]}); set {section}.{bad}") from exc
    return pre, origin
