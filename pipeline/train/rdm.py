"""Stage two's loop: train a bank of RDMs on cached teacher embeddings, evaluate, infer.

No images and no teacher backbone: inputs are the cached embeddings (every view of every
train image), the cached teacher logits (KL target) and the labels (CE target).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline.cache.reader import CacheSplit
from pipeline.evaluate import agreement_hits, top1_hits
from pipeline.rd import RDMBank, rdm_loss
from schemas import layout as L


@dataclass(frozen=True)
class EmbeddingSet:
    """Flat cached targets: embeddings (n, D) float32, teacher logits (n, C), labels (n,)."""

    embeddings: Tensor
    logits: Tensor
    labels: Tensor


@dataclass(frozen=True)
class RdmTrainSettings:
    """What :func:`train_bank` needs: the loss weights (R per RDM, λ_CE, λ_KL, τ, the
    distortion) and the schedule (Adam, one-cycle; the density gets ``density_lr_factor``
    times the learning rate)."""

    rate_weights: tuple[float, ...]
    ce_weight: float
    kl_weight: float
    temperature: float
    distortion: str
    epochs: int
    batch_size: int
    eval_batch_size: int
    lr: float
    pct_start: float
    density_lr_factor: float
    seed: int


def embedding_set(split: CacheSplit, *, views: slice, device: torch.device) -> EmbeddingSet:
    """The cached embeddings, logits and labels of ``views`` of every row of ``split``,
    flattened to one row per (row, view) and moved to ``device``."""
    block = split.read_all((L.EMBEDDINGS, L.LOGITS, L.LABELS))
    emb = torch.from_numpy(block[L.EMBEDDINGS][:, views].astype(np.float32))  # (N, k, D)
    k = emb.shape[1]
    return EmbeddingSet(
        embeddings=emb.reshape(-1, split.embed_dim).to(device),  # (N*k, D)
        logits=torch.from_numpy(block[L.LOGITS][:, views].astype(np.float32)).reshape(-1, split.num_classes).to(device),
        labels=torch.from_numpy(np.repeat(block[L.LABELS], k)).to(device),
    )


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


@torch.inference_mode()
def evaluate_bank(bank: RDMBank, data: EmbeddingSet, *, scale: float, batch_size: int) -> RdmEval:
    was_training = bank.training
    bank.eval()
    sums: dict[str, Tensor] = {}
    n = len(data.embeddings)
    for start in range(0, n, batch_size):
        x = data.embeddings[start:start + batch_size] / scale
        out = bank(x)
        teacher_logits = data.logits[start:start + batch_size]
        labels = data.labels[start:start + batch_size]
        parts = {
            "rate": out.bits.sum(1),
            "dist": (out.x_hat - x).pow(2).mean(-1).sum(1),
            "top1": top1_hits(out.logits, labels).sum(1),
            "agree": agreement_hits(out.logits, teacher_logits).sum(1),
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
    cfg: RdmTrainSettings,
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
    # cycle_momentum=False: Adam's β1 stays 0.9 (OneCycleLR would cycle it in 0.85–0.95).
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[cfg.lr, cfg.lr * cfg.density_lr_factor],
                                                total_steps=max(steps, 1), pct_start=cfg.pct_start,
                                                cycle_momentum=False)
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
                          val=evaluate_bank(bank, val, scale=scale, batch_size=cfg.eval_batch_size))
        logs.append(log)
        if on_epoch is not None:
            on_epoch(log)
    return logs
