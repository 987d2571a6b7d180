"""Factorized (per-channel, non-parametric) entropy bottleneck.

The density model is the univariate non-parametric one of Ballé et al. 2018
("Variational image compression with a scale hyperprior", appendix 6.1): for each
channel a monotone cumulative function

    c(x) = sigmoid(f_K(... f_1(x))),  f_k(x) = g_k(softplus(H_k) x + b_k),
    g_k(x) = x + tanh(a_k) * tanh(x)  (no g on the last layer)

so the likelihood of a value on a unit bin is ``c(x + 0.5) - c(x - 0.5)``. CompressAI's
``EntropyBottleneck`` is the reference for the math; this is a small re-implementation
without entropy coding (we only need the rate, never a bitstream).

Training adds uniform noise ``U(-0.5, 0.5)`` (a differentiable proxy of rounding);
evaluation rounds with a straight-through estimator. All density math is float32 with
autocast disabled, whatever the input dtype.

Choosing ``init_scale``: the initial density is close to a logistic of that scale around
0, so it should be at least the spread of the latent. Too narrow (latent spread 30, scale 1)
starts near the likelihood bound (~22 bits/channel here) and the rate gradient then
collapses weakly weighted latents before the density catches up; too wide only costs about
``log2(init_scale / spread)`` extra bits at the start. 10 worked for latents of spread 0.5
to 30 (a discretised Gaussian's entropy is reached within ~100 Adam steps). There is no
default here: the RDMs' (``rdm.init_scale``) and the student IBM's
(``distill.ibm_init_scale``) are set in ``schemas/config.py``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BottleneckOutput", "EntropyBottleneck", "uniform_noise"]


class BottleneckOutput(NamedTuple):
    """Result of :class:`EntropyBottleneck`.

    values: quantized or noisy latent ŵ, float32, ``(B, C)``.
    likelihoods: per-channel likelihood of ŵ, float32, ``(B, C)``, in ``[bound, 1]``.
    bits: rate in bits per sample, float32, ``(B,)`` = ``-log2(likelihoods).sum(-1)``.
    """

    values: Tensor
    likelihoods: Tensor
    bits: Tensor


def uniform_noise(
    shape: tuple[int, ...] | torch.Size,
    *,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> Tensor:
    """float32 noise ``U(-0.5, 0.5)`` of ``shape`` on ``device``.

    Drawn from ``generator`` only (the global RNG when it is None). A generator living on
    another device than ``device`` is accepted: the draw happens on the generator's device
    and is moved, so a CPU generator gives the same noise on CPU and CUDA.
    """
    if generator is not None and generator.device != torch.device(device):
        u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)
        return u.to(device) - 0.5
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32) - 0.5


class _LowerBound(torch.autograd.Function):
    """``max(x, bound)`` whose gradient still flows where it would raise ``x``.

    A plain clamp kills the gradient of far-out samples (likelihood below the bound), so the
    density could never learn to cover them; this is CompressAI's ``LowerBound``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, bound: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.bound = bound
        return x.clamp_min(bound)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        pass_through = (x >= ctx.bound) | (grad < 0)
        return grad * pass_through.to(grad.dtype), None


class EntropyBottleneck(nn.Module):
    """Learned factorized density over ``channels`` independent latent channels.

    Args:
        channels: number of latent channels C; ``forward`` takes ``(B, C)``.
        filters: hidden widths of the per-channel density network (Ballé: (3, 3, 3)).
        init_scale: the initial density is roughly a logistic of this scale centred at 0;
            at least the expected spread of the latent (see the module docstring).
        likelihood_bound: likelihoods are bounded below by this (caps bits at
            ``-log2(bound)`` per channel, ~29.9 bits for 1e-9).
        generator: optional generator for the random bias initialisation.
    """

    def __init__(
        self,
        channels: int,
        *,
        filters: tuple[int, ...] = (3, 3, 3),
        init_scale: float,
        likelihood_bound: float = 1e-9,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"EntropyBottleneck: channels must be >= 1, got {channels}")
        if not filters or any(f < 1 for f in filters):
            raise ValueError(
                f"EntropyBottleneck: filters must be a non-empty tuple of positive widths, "
                f"got {filters!r}; Ballé et al. use (3, 3, 3)"
            )
        if not init_scale > 0:
            raise ValueError(f"EntropyBottleneck: init_scale must be > 0, got {init_scale}")
        if not 0 < likelihood_bound < 1:
            raise ValueError(
                f"EntropyBottleneck: likelihood_bound must be in (0, 1), got {likelihood_bound}"
            )
        self.channels = int(channels)
        self.filters = tuple(int(f) for f in filters)
        self.init_scale = float(init_scale)
        self.likelihood_bound = float(likelihood_bound)

        widths = (1, *self.filters, 1)
        n_layers = len(widths) - 1
        scale = self.init_scale ** (1.0 / n_layers)
        factory = {"device": device, "dtype": dtype}
        self.matrices = nn.ParameterList()  # H_k: (C, out, in), used through softplus
        self.biases = nn.ParameterList()  # b_k: (C, out, 1)
        self.factors = nn.ParameterList()  # a_k: (C, out, 1), used through tanh
        for k in range(n_layers):
            # softplus(H) = 1 / (scale * out): the composed map starts as x / init_scale.
            init = math.log(math.expm1(1.0 / scale / widths[k + 1]))
            matrix = torch.full((self.channels, widths[k + 1], widths[k]), init, **factory)
            bias = torch.empty((self.channels, widths[k + 1], 1), **factory)
            bias.uniform_(-0.5, 0.5, generator=generator)
            self.matrices.append(nn.Parameter(matrix))
            self.biases.append(nn.Parameter(bias))
            if k < n_layers - 1:
                self.factors.append(
                    nn.Parameter(torch.zeros((self.channels, widths[k + 1], 1), **factory))
                )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, filters={self.filters}, init_scale={self.init_scale}, "
            f"likelihood_bound={self.likelihood_bound}"
        )

    def _logits_cumulative(self, x: Tensor) -> Tensor:
        """Logit of the cumulative c at ``x`` ``(C, 1, N)`` -> ``(C, 1, N)``, float32."""
        logits = x
        for k, (matrix, bias) in enumerate(zip(self.matrices, self.biases, strict=True)):
            logits = torch.matmul(F.softplus(matrix.float()), logits) + bias.float()
            if k < len(self.factors):
                logits = logits + torch.tanh(self.factors[k].float()) * torch.tanh(logits)
        return logits

    def likelihood(self, values: Tensor) -> Tensor:
        """Likelihood ``c(v + 0.5) - c(v - 0.5)`` of ``values`` ``(B, C)``, float32, bounded.

        Runs in float32 with autocast off; differentiable in ``values`` and the density.
        """
        self._check_input(values)
        with torch.autocast(device_type=values.device.type, enabled=False):
            v = values.float().t().unsqueeze(1)  # (C, 1, B)
            # Both bin edges in one pass over the density: (C, 1, 2B).
            lower, upper = self._logits_cumulative(torch.cat([v - 0.5, v + 0.5], dim=-1)).chunk(2, dim=-1)
            # Evaluate on the side of the median where sigmoid is not saturated at 1.
            sign = -torch.sign(lower + upper).detach()
            lik = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
            lik = _LowerBound.apply(lik, self.likelihood_bound)
            return lik.squeeze(1).t()  # (B, C)

    def forward(self, w: Tensor, *, generator: torch.Generator | None = None) -> BottleneckOutput:
        """Quantize (eval) or add uniform noise (training) to ``w`` ``(B, C)`` and rate it."""
        self._check_input(w)
        with torch.autocast(device_type=w.device.type, enabled=False):
            w32 = w.float()
            if self.training:
                values = w32 + uniform_noise(w32.shape, device=w32.device, generator=generator)
            else:
                values = w32 + (torch.round(w32) - w32).detach()  # straight-through rounding
            lik = self.likelihood(values)
            bits = -torch.log2(lik).sum(-1)  # (B,)
        return BottleneckOutput(values=values, likelihoods=lik, bits=bits)

    def _check_input(self, w: Tensor) -> None:
        if w.ndim != 2 or w.shape[1] != self.channels:
            raise ValueError(
                f"EntropyBottleneck: expected input of shape (B, {self.channels}), got "
                f"{tuple(w.shape)}; flatten the latent to (batch, channels) first"
            )
        if not w.is_floating_point():
            raise ValueError(f"EntropyBottleneck: expected a floating-point input, got {w.dtype}")
