"""Rate-Distortion Modules (the CIFD teacher assistants), batched over rate weights.

One RDM per rate weight R (DESIGN §2): on the teacher embedding x (dim D)

    enc  = Linear(D, h) - ReLU - Linear(h, h)
    ŵ    = entropy bottleneck (noise in training, rounding in eval)
    dec  = Linear(h, h) - ReLU - Linear(h, D)      -> x̂
    head = Linear(D, C)                             -> ẑ

M independent RDMs are held as one module with stacked ``(M, out, in)`` weights, so a
single forward / backward trains all of them side by side (no Python loop over M). Their
bottlenecks share one :class:`EntropyBottleneck` of ``M * h`` independent channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.rd.entropy import EntropyBottleneck

__all__ = ["DISTORTIONS", "RDMBank", "RDMLoss", "RDMOutput", "bank_outputs", "rdm_loss"]

DISTORTIONS = ("mse", "smooth_l1")


class RDMOutput(NamedTuple):
    """x_hat ``(M, B, D)``, logits ``(M, B, C)``, bits ``(M, B)`` (float32, bits/sample)."""

    x_hat: Tensor
    logits: Tensor
    bits: Tensor


class RDMLoss(NamedTuple):
    """total: scalar, summed over RDMs; the parts are per RDM ``(M,)``, batch means."""

    total: Tensor
    distortion: Tensor
    rate: Tensor
    ce: Tensor
    kl: Tensor


class _StackedLinear(nn.Module):
    """M independent ``nn.Linear(in, out)`` layers: ``(M, B, in) -> (M, B, out)``."""

    def __init__(
        self,
        num: int,
        in_features: int,
        out_features: int,
        *,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        generator: torch.Generator | None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((num, out_features, in_features), **factory))
        self.bias = nn.Parameter(torch.empty((num, out_features), **factory))
        # nn.Linear's default init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / math.sqrt(in_features)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound, generator=generator)
            self.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        # (M, B, in) @ (M, in, out) + (M, 1, out) -> (M, B, out)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))

    def extra_repr(self) -> str:
        m, out_f, in_f = self.weight.shape
        return f"num={m}, in_features={in_f}, out_features={out_f}"


class RDMBank(nn.Module):
    """``num_rdms`` independent RDMs trained side by side in one forward.

    Args:
        num_rdms: M, one per rate weight R.
        in_dim: D, the teacher embedding width.
        hidden: h, width of the MLPs and of each RDM's latent (paper: 512; 1024 for 2048-d).
        num_classes: C, width of the logit head.
        init_scale: initial spread of the bottleneck densities (see ``EntropyBottleneck``).
        generator: optional generator for parameter initialisation (global RNG otherwise).
    """

    def __init__(
        self,
        *,
        num_rdms: int,
        in_dim: int,
        hidden: int,
        num_classes: int,
        init_scale: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_rdms", num_rdms),
            ("in_dim", in_dim),
            ("hidden", hidden),
            ("num_classes", num_classes),
        ):
            if value < 1:
                raise ValueError(f"RDMBank: {name} must be >= 1, got {value}")
        self.num_rdms = int(num_rdms)
        self.in_dim = int(in_dim)
        self.hidden = int(hidden)
        self.num_classes = int(num_classes)
        kw = {"device": device, "dtype": dtype, "generator": generator}
        m, d, h, c = self.num_rdms, self.in_dim, self.hidden, self.num_classes
        self.enc1 = _StackedLinear(m, d, h, **kw)
        self.enc2 = _StackedLinear(m, h, h, **kw)
        self.bottleneck = EntropyBottleneck(m * h, init_scale=init_scale, **kw)
        self.dec1 = _StackedLinear(m, h, h, **kw)
        self.dec2 = _StackedLinear(m, h, d, **kw)
        self.head = _StackedLinear(m, d, c, **kw)

    def extra_repr(self) -> str:
        return (
            f"num_rdms={self.num_rdms}, in_dim={self.in_dim}, hidden={self.hidden}, "
            f"num_classes={self.num_classes}"
        )

    def forward(self, x: Tensor, *, generator: torch.Generator | None = None) -> RDMOutput:
        """Run all M RDMs on embeddings ``x`` ``(B, D)``; noise drawn from ``generator``."""
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(
                f"RDMBank: expected embeddings of shape (B, {self.in_dim}), got {tuple(x.shape)}"
            )
        m, h = self.num_rdms, self.hidden
        b = x.shape[0]
        x = x.to(self.enc1.weight.dtype).unsqueeze(0).expand(m, b, self.in_dim)  # (M, B, D)
        w = self.enc2(F.relu(self.enc1(x)))  # (M, B, h)
        q = self.bottleneck(w.permute(1, 0, 2).reshape(b, m * h), generator=generator)
        w_hat = q.values.view(b, m, h).permute(1, 0, 2)  # (M, B, h), float32
        bits = -torch.log2(q.likelihoods).view(b, m, h).sum(-1).t()  # (M, B)
        x_hat = self.dec2(F.relu(self.dec1(w_hat.to(x.dtype))))  # (M, B, D)
        logits = self.head(x_hat)  # (M, B, C)
        return RDMOutput(x_hat=x_hat, logits=logits, bits=bits)

    @torch.no_grad()
    def subset(self, indices: Sequence[int]) -> RDMBank:
        """A new bank holding copies of the RDMs at ``indices`` (in that order)."""
        idx = [int(i) for i in indices]
        if not idx or any(not 0 <= i < self.num_rdms for i in idx):
            raise ValueError(
                f"RDMBank.subset: indices must be a non-empty list in [0, {self.num_rdms}), "
                f"got {list(indices)}"
            )
        p = self.enc1.weight
        out = RDMBank(
            num_rdms=len(idx),
            in_dim=self.in_dim,
            hidden=self.hidden,
            num_classes=self.num_classes,
            init_scale=self.bottleneck.init_scale,
            device=p.device,
            dtype=p.dtype,
        )
        out.bottleneck = EntropyBottleneck(
            len(idx) * self.hidden,
            filters=self.bottleneck.filters,
            init_scale=self.bottleneck.init_scale,
            likelihood_bound=self.bottleneck.likelihood_bound,
            device=p.device,
            dtype=p.dtype,
        )
        rows = torch.tensor(idx, device=p.device)
        # Bottleneck channels of the chosen RDMs, in order: RDM m owns [m*h, (m+1)*h).
        offsets = torch.arange(self.hidden, device=p.device)
        channels = (rows[:, None] * self.hidden + offsets).reshape(-1)  # (len(idx) * h,)
        own = self.state_dict()
        new = {}
        for key in out.state_dict():
            take = channels if key.startswith("bottleneck.") else rows
            new[key] = own[key].index_select(0, take).clone()
        out.load_state_dict(new)
        out.train(self.training)
        return out


def _distortion(x_hat: Tensor, x: Tensor, kind: str) -> Tensor:
    """Per-RDM distortion ``(M,)``: mean over batch and D of ``x_hat (M,B,D)`` vs ``x (B,D)``."""
    target = x.unsqueeze(0).expand_as(x_hat)
    if kind == "mse":
        per = F.mse_loss(x_hat, target, reduction="none")
    elif kind == "smooth_l1":
        per = F.smooth_l1_loss(x_hat, target, reduction="none")
    else:
        raise ValueError(f"rdm_loss: unknown distortion {kind!r}; expected one of {DISTORTIONS}")
    return per.mean(dim=(1, 2))


def rdm_loss(
    *,
    output: RDMOutput,
    embeddings: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    rate_weights: Tensor,
    ce_weight: float,
    kl_weight: float,
    temperature: float,
    distortion: str = "mse",
) -> RDMLoss:
    """CIFD RDM loss, per RDM m and summed over m in ``total``:

    ``R_m * dist(x, x̂_m) + mean bits_m + ce_weight * CE(ẑ_m, y)
      + kl_weight * τ² * KL(softmax(z_T/τ) ‖ softmax(ẑ_m/τ))``.

    ``embeddings`` x ``(B, D)``, ``teacher_logits`` ``(B, C)``, ``labels`` ``(B,)`` int,
    ``rate_weights`` ``(M,)``. Computed in float32.
    """
    if distortion not in DISTORTIONS:
        raise ValueError(
            f"rdm_loss: unknown distortion {distortion!r}; expected one of {DISTORTIONS}"
        )
    if not temperature > 0:
        raise ValueError(f"rdm_loss: temperature must be > 0, got {temperature}")
    x_hat, logits, bits = output
    if x_hat.ndim != 3 or logits.ndim != 3 or bits.ndim != 2:
        raise ValueError(
            "rdm_loss: expected output with x_hat (M, B, D), logits (M, B, C), bits (M, B), got "
            f"{tuple(x_hat.shape)}, {tuple(logits.shape)}, {tuple(bits.shape)}"
        )
    m, b, d = x_hat.shape
    c = logits.shape[2]
    expected = {
        "output.logits": (logits, (m, b, c)),
        "output.bits": (bits, (m, b)),
        "embeddings": (embeddings, (b, d)),
        "teacher_logits": (teacher_logits, (b, c)),
        "labels": (labels, (b,)),
        "rate_weights": (rate_weights, (m,)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"rdm_loss: {name} has shape {tuple(tensor.shape)}, expected {shape} "
                f"(M={m} RDMs, B={b}, D={d}, C={c})"
            )
    if labels.is_floating_point():
        raise ValueError(f"rdm_loss: labels must be integer class indices, got {labels.dtype}")

    x_hat, logits = x_hat.float(), logits.float()
    dist = _distortion(x_hat, embeddings.float(), distortion)  # (M,)
    rate = bits.float().mean(dim=1)  # (M,)
    ce = F.cross_entropy(
        logits.reshape(m * b, c), labels.repeat(m), reduction="none"
    ).view(m, b).mean(dim=1)  # (M,)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, C), target
    log_q = F.log_softmax(logits / temperature, dim=-1)  # (M, B, C)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean(dim=1)  # (M,)
    per_rdm = (
        rate_weights.to(dist) * dist
        + rate
        + ce_weight * ce
        + kl_weight * temperature**2 * kl
    )
    return RDMLoss(total=per_rdm.sum(), distortion=dist, rate=rate, ce=ce, kl=kl)


@torch.inference_mode()
def bank_outputs(bank: RDMBank, embeddings: Tensor, *, scale: float, batch_size: int) -> tuple[Tensor, Tensor]:
    """Rounding-mode outputs for (n, D) embeddings: x̂ (n, M, D) in the teacher's embedding
    units, and logits (n, M, C)."""
    was_training = bank.training
    bank.eval()
    xs, zs = [], []
    for start in range(0, len(embeddings), batch_size):
        out = bank(embeddings[start:start + batch_size] / scale)
        xs.append((out.x_hat * scale).transpose(0, 1))
        zs.append(out.logits.transpose(0, 1))
    bank.train(was_training)
    return torch.cat(xs), torch.cat(zs)
