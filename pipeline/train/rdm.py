"""Stage two's loop: train a bank of RDMs on cached teacher embeddings, evaluate, infer.

No images and no teacher backbone: inputs are the cached embeddings (every view of every
train image), the cached teacher logits (KL target) and the labels (CE target).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.rd import RDMBank, rdm_loss
from schemas.config import RdmConfig


@dataclass(frozen=True)
class EmbeddingSet:
    """Flat cached targets: embeddings (n, D) float32, teacher logits (n, C), labels (n,)."""

    embeddings: Tensor
    logits: Tensor
    labels: Tensor


@dataclass(frozen=True)
class RdmEval:
    """Per-RDM metrics on a split (each a list of length M), rounding mode."""

    rate_bits: list[float]
    distortion: list[float]  # MSE of the scaled embeddings (= normalised MSE when scale = RMS)
    top1: list[float]
    teacher_agreement: list[float]


@dataclass(frozen=True)
class RdmEpochLog:
    epoch: int
    loss: float
    val: RdmEval


def embedding_scale(embeddings: Tensor) -> float:
    """Root mean square of the embeddings: the unit in which distortion is measured."""
    return float(embeddings.float().pow(2).mean().sqrt().clamp_min(1e-12))


@torch.inference_mode()
def evaluate_bank(bank: RDMBank, data: EmbeddingSet, *, scale: float, batch_size: int) -> RdmEval:
    was_training = bank.training
    bank.eval()
    sums: dict[str, Tensor] = {}
    n = len(data.embeddings)
    for start in range(0, n, batch_size):
        x = data.embeddings[start:start + batch_size] / scale
        out = bank(x)
        teacher_top = data.logits[start:start + batch_size].argmax(-1)
        labels = data.labels[start:start + batch_size]
        parts = {
            "rate": out.bits.sum(1),
            "dist": (out.x_hat - x).pow(2).mean(-1).sum(1),
            "top1": (out.logits.argmax(-1) == labels).float().sum(1),
            "agree": (out.logits.argmax(-1) == teacher_top).float().sum(1),
        }
        for key, value in parts.items():
            sums[key] = sums.get(key, 0) + value.double()
    bank.train(was_training)
    mean = {k: (v / max(n, 1)).tolist() for k, v in sums.items()}
    return RdmEval(rate_bits=mean["rate"], distortion=mean["dist"], top1=mean["top1"],
                   teacher_agreement=mean["agree"])


def train_bank(
    bank: RDMBank,
    *,
    train: EmbeddingSet,
    val: EmbeddingSet,
    cfg: RdmConfig,
    scale: float,
    on_epoch: Callable[[RdmEpochLog], None] | None = None,
) -> list[RdmEpochLog]:
    """Train all RDMs of ``bank`` side by side (one forward/backward for all M)."""
    device = train.embeddings.device
    generator = torch.Generator().manual_seed(cfg.seed)
    noise = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    # R weighs the squared error summed over the D dims of the scaled embedding, against
    # bits summed over the latent channels; rdm_loss averages over D, hence the factor D.
    dim = train.embeddings.shape[1]
    rate_weights = torch.tensor(cfg.rate_weights, device=device, dtype=torch.float32) * dim
    density = [p for n, p in bank.named_parameters() if n.startswith("bottleneck.")]
    others = [p for n, p in bank.named_parameters() if not n.startswith("bottleneck.")]
    # The density must track the latents within a short schedule: a larger step for it.
    opt = torch.optim.Adam([{"params": others, "lr": cfg.lr},
                            {"params": density, "lr": cfg.lr * cfg.density_lr_factor}])
    steps = cfg.epochs * math.ceil(len(train.embeddings) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[cfg.lr, cfg.lr * cfg.density_lr_factor], total_steps=max(steps, 1), pct_start=0.1)
    logs = []
    for epoch in range(cfg.epochs):
        bank.train()
        order = torch.randperm(len(train.embeddings), generator=generator).to(device)
        total, count = torch.zeros((), device=device), 0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            x = train.embeddings[idx] / scale
            out = bank(x, generator=noise)
            loss = rdm_loss(output=out, embeddings=x, teacher_logits=train.logits[idx], labels=train.labels[idx],
                            rate_weights=rate_weights, ce_weight=cfg.ce_weight, kl_weight=cfg.kl_weight,
                            temperature=cfg.temperature, distortion=cfg.distortion)
            opt.zero_grad(set_to_none=True)
            loss.total.backward()
            opt.step()
            sched.step()
            total += loss.total.detach() * len(idx)
            count += len(idx)
        log = RdmEpochLog(epoch=epoch + 1, loss=float(total) / max(count, 1),
                          val=evaluate_bank(bank, val, scale=scale, batch_size=4 * cfg.batch_size))
        logs.append(log)
        if on_epoch is not None:
            on_epoch(log)
    return logs


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
