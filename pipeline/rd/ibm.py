"""Information Bottleneck Module (IBM) of CIFD, used inside the student in training only.

The student's penultimate embedding ``w_s`` gets ``ŵ_s = w_s + u``, ``u ~ U(-0.5, 0.5)``, and
a rate ``-log2 q_s(ŵ_s)`` under its own factorized entropy model; the noisy embedding feeds
the rest of the student, and a projection to the teacher width D (when the widths differ)
gives ``û`` for the feature-matching terms (DESIGN §2). With ``noise_scale`` set, the bottleneck
works on ``w / s`` with ``s = noise_scale · RMS(w)`` (the batch RMS, detached), so the noise
and the rate are relative to the embedding's own scale: the paper's unit noise assumes an
embedding whose spread is many units, and a student whose embedding is of order 1 (a small
timm net) would otherwise be drowned in it. At inference the IBM is removed:
in eval mode ``noisy`` is ``w`` unchanged (the rate is then that of ``round(w)``, for
reporting only).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from pipeline.rd.entropy import EntropyBottleneck

__all__ = ["IBMOutput", "InformationBottleneck"]


class IBMOutput(NamedTuple):
    """noisy ``(B, dim)`` float32 in training (``w`` unchanged in eval); projected û
    ``(B, out_dim)`` float32; bits ``(B,)`` float32."""

    noisy: Tensor
    projected: Tensor
    bits: Tensor


class InformationBottleneck(nn.Module):
    """Uniform-noise bottleneck with a rate term and an optional projection to ``out_dim``.

    Args:
        dim: width of the student embedding.
        out_dim: width of û (the teacher embedding width D); ``None`` or ``dim`` means identity.
        init_scale: initial spread of the entropy model (see ``EntropyBottleneck``).
        noise_scale: None for the paper's ``U(-0.5, 0.5)`` on ``w`` itself; a number ``k`` > 0
            for noise ``U(-0.5, 0.5) · k · RMS(w)`` (rate measured on ``w / (k · RMS(w))``).
        generator: optional generator for parameter initialisation (global RNG otherwise).
    """

    def __init__(
        self,
        dim: int,
        *,
        out_dim: int | None = None,
        init_scale: float,
        noise_scale: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if dim < 1 or (out_dim is not None and out_dim < 1):
            raise ValueError(
                f"InformationBottleneck: dim and out_dim must be >= 1, got {dim}, {out_dim}"
            )
        if noise_scale is not None and not noise_scale > 0:
            raise ValueError(f"InformationBottleneck: noise_scale must be None or > 0, got {noise_scale!r}")
        self.dim = int(dim)
        self.noise_scale = noise_scale
        self.out_dim = self.dim if out_dim is None else int(out_dim)
        self.entropy = EntropyBottleneck(
            self.dim, init_scale=init_scale, device=device, dtype=dtype, generator=generator
        )
        self.projection: nn.Module
        if self.out_dim == self.dim:
            self.projection = nn.Identity()
        else:
            self.projection = nn.Linear(self.dim, self.out_dim, device=device, dtype=dtype)
            if generator is not None:  # nn.Linear's init, drawn from the given generator
                bound = 1.0 / self.dim**0.5
                with torch.no_grad():
                    self.projection.weight.uniform_(-bound, bound, generator=generator)
                    self.projection.bias.uniform_(-bound, bound, generator=generator)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, out_dim={self.out_dim}, noise_scale={self.noise_scale}"

    def forward(self, w: Tensor, *, generator: torch.Generator | None = None) -> IBMOutput:
        """``w`` ``(B, dim)`` -> noisy (training) or unchanged (eval) embedding, û, rate."""
        if w.ndim != 2 or w.shape[1] != self.dim:
            raise ValueError(
                f"InformationBottleneck: expected (B, {self.dim}), got {tuple(w.shape)}"
            )
        # float32 with autocast off: under bf16, w + u cast back to bf16 would round the noise
        # away wherever |w| >= 64 (bf16 spacing 0.5 there) while the rate counted it.
        with torch.autocast(device_type=w.device.type, enabled=False):
            if self.noise_scale is None:
                q = self.entropy(w, generator=generator)  # noise in training, rounding in eval
                values = q.values
            else:
                scale = self.noise_scale * w.detach().float().pow(2).mean().sqrt().clamp_min(1e-6)  # ()
                q = self.entropy(w.float() / scale, generator=generator)
                values = q.values * scale
            noisy = values if self.training else w
            projected = self.projection(noisy.float())
        return IBMOutput(noisy=noisy, projected=projected, bits=q.bits)
