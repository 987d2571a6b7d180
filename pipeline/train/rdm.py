"""Stage two's loop: train a bank of RDMs on cached teacher embeddings, evaluate, infer.

No images and no teacher backbone: inputs are the cached embeddings (every view of every
train image), the cached teacher logits (KL target) and the labels (CE target), as (row,
view) pairs from a :class:`PairSource`:

- :class:`CachePairs` streams the teacher cache block by block (a block is one Zarr shard's
  rows, read and checked by :meth:`ShardedSplit.read`). Each epoch draws an order of the
  blocks from ``(seed, epoch)``, loads ``hold_blocks`` of them at a time onto the device and
  shuffles the pairs of those blocks together, so memory holds at most ``hold_blocks``
  blocks and two batches, whatever the size of the split. The shards of a cache follow the
  rows of the prepared tars, which ``prepare`` shuffles by default (``prepare.shuffle``): a
  block is then already a mixed sample of the classes.
- :class:`EmbeddingSet` holds every pair on the device (small caches: read once, one
  shuffle over the whole split per epoch).

Either way a pass yields batches of exactly ``batch_size`` pairs but the last: the pairs
left at the end of a group of blocks open the next group's first batch. An epoch is
therefore ``ceil(pairs / batch_size)`` steps in both sources, known up front for the
one-cycle schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

import torch
from torch import Tensor

from pipeline.cache.reader import CacheSplit
from pipeline.train.optim import one_cycle
from pipeline.evaluate import agreement_hits, top1_hits
from pipeline.rd import RDMBank, rdm_loss
from pipeline.runtime import derived_seed
from schemas import layout as L

PAIR_FIELDS = (L.EMBEDDINGS, L.LOGITS, L.LABELS)  # what a pair holds (logits from the arrays of pair_fields)


def pair_fields(split: CacheSplit) -> tuple[str, ...]:
    """The arrays read for the pairs: embeddings, labels and those holding the logits."""
    return (L.EMBEDDINGS, L.LABELS, *(f for f in split.logits_format.fields if f != L.EMBEDDINGS))


class PairBatch(NamedTuple):
    """A batch of (row, view) pairs: embeddings (B, D) float32 in the teacher's units,
    teacher logits (B, C) float32, labels (B,) int64."""

    embeddings: Tensor
    logits: Tensor
    labels: Tensor


class PairSource(Protocol):
    """Where :func:`train_bank` and :func:`evaluate_bank` read (row, view) pairs from."""

    @property
    def num_pairs(self) -> int: ...

    def shuffled(self, *, seed: int, batch_size: int) -> Iterator[PairBatch]:
        """Every pair once, in an order drawn from ``seed``."""
        ...

    def in_order(self, *, batch_size: int) -> Iterator[PairBatch]:
        """Every pair once, in row order (evaluation)."""
        ...


@dataclass(frozen=True)
class EmbeddingSet:
    """Flat cached targets: embeddings (n, D) float32, teacher logits (n, C), labels (n,);
    a :class:`PairSource` that holds every pair."""

    embeddings: Tensor
    logits: Tensor
    labels: Tensor

    @property
    def num_pairs(self) -> int:
        return len(self.embeddings)

    def take(self, index: Tensor) -> PairBatch:
        return PairBatch(self.embeddings[index], self.logits[index], self.labels[index])

    def shuffled(self, *, seed: int, batch_size: int) -> Iterator[PairBatch]:
        order = torch.randperm(self.num_pairs, generator=torch.Generator().manual_seed(seed))
        return _cut(iter([(self, order.to(self.embeddings.device))]), batch_size)

    def in_order(self, *, batch_size: int) -> Iterator[PairBatch]:
        return _cut(iter([(self, torch.arange(self.num_pairs, device=self.embeddings.device))]), batch_size)


def load_pairs(split: CacheSplit, blocks: Sequence[tuple[int, int]], *, views: slice,
               device: torch.device) -> EmbeddingSet:
    """The pairs of ``views`` of the rows of ``blocks`` (row ranges, read in the order
    given, one checked read each), one row per (row, view) in tensors allocated once on
    ``device``: each block read is copied in and dropped before the next is read."""
    k = len(range(split.num_views)[views])
    n = sum(b - a for a, b in blocks) * k
    emb = torch.empty((n, split.embed_dim), dtype=torch.float32, device=device)
    logits = torch.empty((n, split.num_classes), dtype=torch.float32, device=device)
    labels = torch.empty((n,), dtype=torch.int64, device=device)
    fmt = split.logits_format.to(device)  # a compact cache's logits are made on the device
    at = 0
    for a, b in blocks:
        block = split.read(a, b, pair_fields(split))
        pairs = (b - a) * k
        # (b-a, k, D) → (pairs, D), row-major: pair (row, view) at row·k + view
        emb[at:at + pairs] = torch.from_numpy(block[L.EMBEDDINGS][:, views].reshape(pairs, -1))
        held = {f: torch.from_numpy(block[f][:, views]).to(device, non_blocking=True) for f in fmt.fields}
        logits[at:at + pairs] = fmt.dense(held).reshape(pairs, -1)  # (b-a, k, C) → (pairs, C)
        labels[at:at + pairs] = torch.from_numpy(block[L.LABELS]).repeat_interleave(k)  # (b-a,) → (pairs,)
        at += pairs
        del block
    return EmbeddingSet(embeddings=emb, logits=logits, labels=labels)


def embedding_set(split: CacheSplit, *, views: slice, device: torch.device) -> EmbeddingSet:
    """The cached embeddings, logits and labels of ``views`` of every row of ``split``,
    flattened to one row per (row, view) and moved to ``device`` (memory grows with the
    split: small caches only)."""
    return load_pairs(split, split.shard_bounds, views=views, device=device)


@dataclass(frozen=True)
class CachePairs:
    """The pairs of ``views`` of every row of ``split``, read ``hold_blocks`` blocks at a
    time (see the module docstring); a :class:`PairSource` whose memory does not grow with
    the split."""

    split: CacheSplit
    views: slice
    device: torch.device
    hold_blocks: int

    def __post_init__(self) -> None:
        if self.hold_blocks < 1:
            raise ValueError(f"CachePairs: hold_blocks is {self.hold_blocks}, expected >= 1")

    @property
    def num_pairs(self) -> int:
        return self.split.num_rows * len(range(self.split.num_views)[self.views])

    def shuffled(self, *, seed: int, batch_size: int) -> Iterator[PairBatch]:
        """Blocks in an order drawn from ``seed``, ``hold_blocks`` at a time; the pairs of
        those blocks in an order drawn from the same generator."""
        generator = torch.Generator().manual_seed(seed)
        bounds = self.split.shard_bounds
        order = [bounds[i] for i in torch.randperm(len(bounds), generator=generator).tolist()]
        return _cut(self._groups(order, generator), batch_size)

    def in_order(self, *, batch_size: int) -> Iterator[PairBatch]:
        return _cut(self._groups(self.split.shard_bounds, None), batch_size)

    def _groups(self, blocks: Sequence[tuple[int, int]],
                generator: torch.Generator | None) -> Iterator[tuple[EmbeddingSet, Tensor]]:
        for start in range(0, len(blocks), self.hold_blocks):
            group = load_pairs(self.split, blocks[start:start + self.hold_blocks], views=self.views,
                               device=self.device)
            order = (torch.randperm(group.num_pairs, generator=generator).to(self.device) if generator is not None
                     else torch.arange(group.num_pairs, device=self.device))
            yield group, order
            del group, order  # before the next group is read: never two groups at once


def _cut(groups: Iterator[tuple[EmbeddingSet, Tensor]], batch_size: int) -> Iterator[PairBatch]:
    """Batches of ``batch_size`` pairs taken from each group in its order; the pairs left at
    the end of a group (fewer than a batch) open the next group's first batch, so only the
    last batch of the pass is short. Holds one group and at most one batch at a time."""
    carry: PairBatch | None = None
    for group, order in groups:
        start = 0
        if carry is not None:
            start = batch_size - len(carry.labels)
            head = group.take(order[:start])
            carry = PairBatch(*(torch.cat(parts) for parts in zip(carry, head, strict=True)))
            del head
            if len(carry.labels) == batch_size:
                yield carry
                carry = None
        for s in range(start, group.num_pairs, batch_size):
            batch = group.take(order[s:s + batch_size])
            if len(batch.labels) < batch_size:
                carry = batch
            else:
                yield batch
            del batch
        del group, order
    if carry is not None:
        yield carry


def pair_source(split: CacheSplit, *, views: slice, device: torch.device, data: Literal["memory", "stream"],
                hold_blocks: int) -> PairSource:
    """``stream``: :class:`CachePairs` (``hold_blocks`` blocks at a time); ``memory``: every
    pair read once onto ``device`` (:func:`embedding_set`; ``hold_blocks`` unused).

    Either way every block has been read (and checked) once when this returns, a block at a
    time for ``stream``: a corrupt or missing chunk stops the caller here, before any
    training, not in the middle of an epoch."""
    if data == "stream":
        for _ in split.blocks(pair_fields(split)):
            pass
        return CachePairs(split=split, views=views, device=device, hold_blocks=hold_blocks)
    if data == "memory":
        return embedding_set(split, views=views, device=device)
    raise ValueError(f"pair_source: data is {data!r}; expected 'memory' or 'stream'")


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


@dataclass(frozen=True)
class RdmEval:
    """Per-RDM metrics on a split (each a list of length M), rounding mode, and the
    teacher's top-1 on the same pairs."""

    rate_bits: list[float]
    distortion: list[float]  # MSE of the scaled embeddings (= normalised MSE when scale = RMS)
    top1: list[float]
    teacher_agreement: list[float]
    teacher_top1: float


@dataclass(frozen=True)
class RdmEpochLog:
    epoch: int
    loss: float
    val: RdmEval


@torch.inference_mode()
def evaluate_bank(bank: RDMBank, data: PairSource, *, scale: float, batch_size: int) -> RdmEval:
    """Mean rate, distortion, top-1 and teacher agreement of every RDM over every pair of
    ``data`` (read in row order, a batch at a time)."""
    was_training = bank.training
    bank.eval()
    sums: dict[str, Tensor] = {}
    n = 0
    for batch in data.in_order(batch_size=batch_size):
        x = batch.embeddings / scale
        out = bank(x)
        parts = {
            "rate": out.bits.sum(1),
            "dist": (out.x_hat - x).pow(2).mean(-1).sum(1),
            "top1": top1_hits(out.logits, batch.labels).sum(1),
            "agree": agreement_hits(out.logits, batch.logits).sum(1),
            "teacher": top1_hits(batch.logits, batch.labels).sum(0, keepdim=True),
        }
        for key, value in parts.items():
            sums[key] = sums.get(key, 0) + value.double()
        n += len(batch.labels)
    bank.train(was_training)
    if n == 0:
        raise ValueError("evaluate_bank: the split has no pairs to evaluate on")
    mean = {k: (v / n).tolist() for k, v in sums.items()}
    return RdmEval(rate_bits=mean["rate"], distortion=mean["dist"], top1=mean["top1"],
                   teacher_agreement=mean["agree"], teacher_top1=mean["teacher"][0])


def train_bank(
    bank: RDMBank,
    *,
    train: PairSource,
    val: PairSource,
    cfg: RdmTrainSettings,
    scale: float,
    on_epoch: Callable[[RdmEpochLog], None] | None = None,
) -> list[RdmEpochLog]:
    """Train all RDMs of ``bank`` side by side (one forward/backward for all M); epoch e
    visits ``train`` in the order drawn from ``derived_seed(cfg.seed, e)``."""
    device = next(bank.parameters()).device
    noise = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    # R weighs the squared error summed over the D dims of the scaled embedding, against
    # bits summed over the latent channels; rdm_loss averages over D, hence the factor D.
    rate_weights = torch.tensor(cfg.rate_weights, device=device, dtype=torch.float32) * bank.in_dim
    density = [p for n, p in bank.named_parameters() if n.startswith("bottleneck.")]
    others = [p for n, p in bank.named_parameters() if not n.startswith("bottleneck.")]
    # The density must track the latents within a short schedule: a larger step for it.
    opt = torch.optim.Adam([{"params": others, "lr": cfg.lr},
                            {"params": density, "lr": cfg.lr * cfg.density_lr_factor}])
    steps = cfg.epochs * math.ceil(train.num_pairs / cfg.batch_size)  # every batch full but an epoch's last
    # cycle_momentum=False: Adam's β1 stays 0.9 (OneCycleLR would cycle it in 0.85–0.95).
    sched = one_cycle(opt, max_lr=[cfg.lr, cfg.lr * cfg.density_lr_factor], total_steps=steps,
                      pct_start=cfg.pct_start, cycle_momentum=False)
    logs = []
    for epoch in range(cfg.epochs):
        bank.train()
        total, count = torch.zeros((), device=device), 0
        for batch in train.shuffled(seed=derived_seed(cfg.seed, epoch), batch_size=cfg.batch_size):
            x = batch.embeddings / scale
            out = bank(x, generator=noise)
            loss = rdm_loss(output=out, embeddings=x, teacher_logits=batch.logits, labels=batch.labels,
                            rate_weights=rate_weights, ce_weight=cfg.ce_weight, kl_weight=cfg.kl_weight,
                            temperature=cfg.temperature, distortion=cfg.distortion)
            opt.zero_grad(set_to_none=True)
            loss.total.backward()
            opt.step()
            sched.step()
            total += loss.total.detach() * len(batch.labels)
            count += len(batch.labels)
        log = RdmEpochLog(epoch=epoch + 1, loss=float(total) / max(count, 1),
                          val=evaluate_bank(bank, val, scale=scale, batch_size=cfg.eval_batch_size))
        logs.append(log)
        if on_epoch is not None:
            on_epoch(log)
    return logs
