"""Stage two reads the teacher cache a few blocks (Zarr shards) at a time
(``pipeline.train.rdm.CachePairs``): every (row, view) pair once per epoch in full batches,
never more than ``hold_blocks`` blocks in memory, blocks in a new order each epoch drawn
from the seed, and a bank trained that way works.

The session's tiny teacher cache: 27 train rows in blocks of 4 (one of 3), 3 views, D = 16.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.cache.reader import CacheSplit, open_cache
from pipeline.rd import RDMBank
from pipeline.runtime import derived_seed
from pipeline.train.rdm import (
    CachePairs,
    PairBatch,
    RdmTrainSettings,
    embedding_set,
    evaluate_bank,
    pair_source,
    train_bank,
)

CPU = torch.device("cpu")
SCALE = 0.5  # about the train embeddings' RMS (0.57); rms() would read the split before the epochs


@pytest.fixture
def splits(embedded_cache) -> tuple[CacheSplit, CacheSplit]:
    cache = open_cache(embedded_cache[0])
    return cache.split("train"), cache.split("val")


def _record_reads(split: CacheSplit, before: Callable[[], None] = lambda: None) -> list[tuple[int, int]]:
    """Wrap ``split.read`` (on this object only) to log the rows of every read, calling
    ``before()`` ahead of each."""
    reads: list[tuple[int, int]] = []
    read = split.read

    def logged(start: int, stop: int, fields: Any = None) -> dict[str, np.ndarray]:
        reads.append((start, stop))
        before()
        return read(start, stop, fields)

    split.read = logged  # type: ignore[method-assign]
    return reads


def _settings(**over: Any) -> RdmTrainSettings:
    base: dict[str, Any] = dict(rate_weights=(4.0, 1.0), ce_weight=1.0, kl_weight=1.0, temperature=2.0,
                                distortion="mse", epochs=1, batch_size=16, eval_batch_size=32, lr=1e-2,
                                pct_start=0.3, density_lr_factor=10.0, seed=0)
    return RdmTrainSettings(**{**base, **over})


def _bank(split: CacheSplit) -> RDMBank:
    return RDMBank(num_rdms=2, in_dim=split.embed_dim, hidden=8, num_classes=split.num_classes, init_scale=1.0,
                   generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("hold_blocks", "batch_size"), [(1, 5), (2, 16), (3, 7), (50, 12)])
def test_an_epoch_yields_every_row_view_pair_once_in_full_batches(splits, hold_blocks: int,
                                                                  batch_size: int) -> None:
    train, _ = splits
    flat = embedding_set(train, views=slice(None), device=CPU)  # row-major: pair r*V + v
    keys = {row.numpy().tobytes(): i for i, row in enumerate(flat.embeddings)}
    assert len(keys) == flat.num_pairs == train.num_rows * train.num_views  # pairs are distinguishable

    source = CachePairs(split=train, views=slice(None), device=CPU, hold_blocks=hold_blocks)
    batches = list(source.shuffled(seed=3, batch_size=batch_size))
    seen = [keys[row.numpy().tobytes()] for b in batches for row in b.embeddings]

    assert sorted(seen) == list(range(flat.num_pairs))
    assert seen != sorted(seen)  # shuffled
    assert len(batches) == math.ceil(source.num_pairs / batch_size)  # the step count train_bank plans
    assert all(len(b.labels) == batch_size for b in batches[:-1])
    index = torch.tensor(seen)
    torch.testing.assert_close(torch.cat([b.logits for b in batches]), flat.logits[index], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([b.labels for b in batches]), flat.labels[index], rtol=0, atol=0)
    # Row order for evaluation: the flat set itself.
    ordered = list(source.in_order(batch_size=batch_size))
    torch.testing.assert_close(torch.cat([b.embeddings for b in ordered]), flat.embeddings, rtol=0, atol=0)


def _live_pairs(dim: int) -> int:
    """Pairs' worth of float32 (n, dim) tensors alive in the process."""
    return sum(o.shape[0] for o in gc.get_objects()
               if type(o) is torch.Tensor and o.dtype == torch.float32 and o.dim() == 2 and o.shape[1] == dim)


@pytest.mark.parametrize("hold_blocks", [1, 2])
def test_the_stream_never_holds_more_than_hold_blocks_blocks(splits, hold_blocks: int) -> None:
    train, _ = splits
    views, batch_size = train.num_views, 5
    block_pairs = max(b - a for a, b in train.shard_bounds) * views
    baseline = _live_pairs(train.embed_dim)
    live: list[int] = []  # counted at every block read (a group is filling) and every batch
    reads = _record_reads(train, before=lambda: live.append(_live_pairs(train.embed_dim) - baseline))
    source = CachePairs(split=train, views=slice(None), device=CPU, hold_blocks=hold_blocks)
    yielded, ahead = 0, []
    for batch in source.shuffled(seed=0, batch_size=batch_size):
        yielded += len(batch.labels)
        ahead.append(sum(b - a for a, b in reads) * views - yielded)  # read, not yet handed out
        live.append(_live_pairs(train.embed_dim) - baseline)
        del batch

    assert sorted(reads) == train.shard_bounds  # whole blocks, each once
    assert max(ahead) <= hold_blocks * block_pairs
    # Alive at most: the group of blocks being filled or cut, the batch in hand, a carried short one.
    assert max(live) <= hold_blocks * block_pairs + 2 * batch_size
    assert max(live) >= block_pairs  # the count sees the loaded blocks at all


def _train(train: CacheSplit, val: CacheSplit, *, epochs: int, seed: int,
           on_epoch: Callable[[Any], None] | None = None) -> tuple[RDMBank, list[Any]]:
    bank = _bank(train)
    logs = train_bank(bank, train=CachePairs(split=train, views=slice(None), device=CPU, hold_blocks=2),
                      val=CachePairs(split=val, views=slice(0, 1), device=CPU, hold_blocks=2),
                      cfg=_settings(epochs=epochs, seed=seed), scale=SCALE, on_epoch=on_epoch)
    return bank, logs


def test_stream_training_is_seeded_and_draws_a_new_block_order_each_epoch(splits) -> None:
    train, val = splits
    reads = _record_reads(train)
    orders: list[list[int]] = []

    def mark(_: Any) -> None:
        orders.append([a for a, _ in reads])
        reads.clear()

    first, _ = _train(train, val, epochs=3, seed=0, on_epoch=mark)
    again, _ = _train(train, val, epochs=3, seed=0, on_epoch=mark)
    other, _ = _train(train, val, epochs=1, seed=1, on_epoch=mark)

    starts = sorted(a for a, _ in train.shard_bounds)
    assert all(sorted(order) == starts for order in orders)  # every block once per epoch
    assert len({tuple(o) for o in orders[:3]}) == 3  # a new order each epoch
    assert orders[3:6] == orders[:3]  # drawn from (seed, epoch)
    assert orders[6] != orders[0]
    for name, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in first.state_dict().items())
    # The order is the one shuffled(seed=derived_seed(seed, epoch)) draws.
    reads.clear()
    list(CachePairs(split=train, views=slice(None), device=CPU, hold_blocks=2)
         .shuffled(seed=derived_seed(0, 1), batch_size=16))
    assert [a for a, _ in reads] == orders[1]


def test_a_bank_trained_on_the_stream_works_and_stream_and_memory_evaluate_alike(splits) -> None:
    train, val = splits
    bank, logs = _train(train, val, epochs=6, seed=0)

    losses = [log.loss for log in logs]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    final = logs[-1].val
    assert all(math.isfinite(b) and b >= 0 for b in final.rate_bits)
    assert all(math.isfinite(d) and d >= 0 for d in final.distortion)
    assert all(0.0 <= t <= 1.0 for t in (*final.top1, *final.teacher_agreement))
    assert final.rate_bits[0] != final.rate_bits[1]  # R = 4 and R = 1: two different RDMs

    streamed = evaluate_bank(bank, CachePairs(split=val, views=slice(0, 1), device=CPU, hold_blocks=1), scale=SCALE,
                             batch_size=3)
    flat = embedding_set(val, views=slice(0, 1), device=CPU)
    in_memory = evaluate_bank(bank, flat, scale=SCALE, batch_size=1000)
    for field in ("rate_bits", "distortion", "top1", "teacher_agreement"):
        assert getattr(streamed, field) == pytest.approx(getattr(in_memory, field), rel=1e-5), field
    teacher_top1 = float((flat.logits.argmax(1) == flat.labels).float().mean())
    assert streamed.teacher_top1 == pytest.approx(teacher_top1) == in_memory.teacher_top1


def test_pair_source_checks_every_block_up_front_and_builds_either_source(splits) -> None:
    train, _ = splits
    reads = _record_reads(train)
    stream = pair_source(train, views=slice(0, 1), device=CPU, data="stream", hold_blocks=2)
    assert reads == train.shard_bounds  # every block read (so checked) once, before any training
    memory = pair_source(train, views=slice(0, 1), device=CPU, data="memory", hold_blocks=2)
    assert isinstance(stream, CachePairs) and stream.num_pairs == memory.num_pairs == train.num_rows
    first: PairBatch = next(iter(memory.in_order(batch_size=4)))
    torch.testing.assert_close(next(iter(stream.in_order(batch_size=4))).embeddings, first.embeddings)
    with pytest.raises(ValueError, match="'disk'"):
        pair_source(train, views=slice(None), device=CPU, data="disk", hold_blocks=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hold_blocks is 0"):
        CachePairs(split=train, views=slice(None), device=CPU, hold_blocks=0)
