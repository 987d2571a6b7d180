"""Streaming a split's WebDataset shards, shared by the loops that read them each epoch
(stage three's stream mode, :mod:`pipeline.train.stream`, and the teacher fine-tune,
:mod:`pipeline.train.supervised`).

* :func:`shard_stream`: the epoch's shard order (reseeded per epoch, permuted before the
  DDP node split so ranks get other shards each epoch), the split across ranks and loader
  workers, a per-sample join, a shuffle buffer and host chunks;
* :func:`sample_row`: a sample's global row index (its ``__key__``), checked;
* :func:`exact_batches`: re-cuts the workers' chunks into batches of exactly the batch size,
  so the step count does not depend on how the workers' streams end;
* :func:`check_rows_seen`: refuses an epoch that did not give every row the expected number
  of times.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from torch import Tensor

from pipeline.data.shards import CorruptSampleError
from schemas.layout import IMAGE_EXTS, KEY_DIGITS, LABEL_EXT

__all__ = ["check_rows_seen", "exact_batches", "sample_row", "shard_stream"]


def _collate(samples: list[tuple]) -> list[Tensor | None]:
    """Samples → one chunk: a list of batched tensors (None where the method reads nothing)."""
    out: list[Tensor | None] = [torch.tensor([s[0] for s in samples], dtype=torch.int64)]
    for k in range(1, len(samples[0])):
        values = [s[k] for s in samples]
        if values[0] is None:
            out.append(None)
        elif isinstance(values[0], Tensor):
            out.append(torch.stack(values))  # type: ignore[arg-type]
        else:
            out.append(torch.from_numpy(np.stack(values)))  # type: ignore[arg-type]
    return out


def _cut(chunks: list[list[Tensor | None]], size: int) -> tuple[list[Tensor | None], list[list[Tensor | None]]]:
    """The first ``size`` rows of the pending chunks, and what is left."""
    joined = [None if parts[0] is None else torch.cat(parts)  # type: ignore[arg-type]
              for parts in zip(*chunks, strict=True)]
    head = [None if t is None else t[:size] for t in joined]
    rest = [None if t is None else t[size:] for t in joined]
    return head, ([rest] if rest[0] is not None and len(rest[0]) else [])


def sample_row(sample: dict) -> tuple[int, str, str, str]:
    """A streamed sample's global row index (its ``__key__``), its shard's file name, a
    "shard … sample …" label for errors and its image member's extension; refuses a sample
    whose key is not a row index or that lacks one image and one label."""
    key = str(sample["__key__"])
    shard = str(sample.get("__url__", "?")).rsplit("/", 1)[-1]
    where = f"shard {shard} sample {key}"
    if len(key) != KEY_DIGITS or not key.isdigit():
        raise CorruptSampleError(f"{where}: key is not a {KEY_DIGITS}-digit row index; rerun `cifd prepare`")
    exts = [e for e in IMAGE_EXTS if e in sample]
    if len(exts) != 1 or LABEL_EXT not in sample:
        raise CorruptSampleError(f"{where}: expected one image and a '.{LABEL_EXT}' member, got "
                                 f"{sorted(k for k in sample if not k.startswith('__'))}")
    return int(key), shard, where, exts[0]


def shard_stream(urls: Sequence[str], *, seed: int, join: Callable[[dict], tuple], shuffle_buffer: int,
                 batch_size: int) -> wds.WebDataset:
    """The samples of ``urls`` as host chunks of up to ``batch_size``: the shard list permuted
    by ``seed`` (before the node split, so that ranks get other shards each epoch; webdataset's
    own shard shuffle would run after it), split across DDP ranks and loader workers, each
    sample mapped through ``join``, then shuffled in a buffer and collated."""
    perm = torch.randperm(len(urls), generator=torch.Generator().manual_seed(seed)).tolist()
    pipeline = wds.WebDataset([urls[i] for i in perm], shardshuffle=False, seed=seed,
                              nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker, empty_check=False)
    return pipeline.map(join).shuffle(shuffle_buffer, seed=seed).batched(batch_size, collation_fn=_collate,
                                                                          partial=True)


def exact_batches(chunks: Iterable[list[Tensor | None]], *, batch_size: int, steps: int,
                  partial_last: bool) -> Iterator[list[Tensor | None]]:
    """Re-cut host chunks into exactly ``steps`` batches of ``batch_size`` (the last one partial
    if ``partial_last`` and rows are left), whatever sizes the workers' chunks have; stops
    reading once ``steps`` are out. Yields fewer when the stream runs dry (the caller checks)."""
    pending: list[list[Tensor | None]] = []
    count = done = 0
    for chunk in chunks:
        pending.append(chunk)
        count += len(chunk[0])  # type: ignore[arg-type]
        while count >= batch_size and done < steps:
            parts, pending = _cut(pending, batch_size)
            count -= batch_size
            done += 1
            yield parts
        if done == steps:
            return
    if done < steps and count > 0 and partial_last:
        parts, pending = _cut(pending, count)
        yield parts


def check_rows_seen(seen: Tensor, *, batches: int, steps: int, batch_size: int, world: int, rank: int,
                    epoch: int) -> None:
    """Refuse an epoch whose stream gave fewer than ``steps`` batches, or a row other than
    exactly once (single process) or at most once (a DDP rank): the shards do not match
    their manifest."""
    if batches != steps:
        raise CorruptSampleError(f"rank {rank} streamed {int(seen.sum())} rows in epoch {epoch + 1}, fewer than the "
                         f"{steps} batches of {batch_size} expected; the shards do not match "
                         "their manifest: rerun `cifd prepare`")
    expected = "exactly once" if world == 1 else "at most once"
    bad = (seen != 1) if world == 1 else (seen > 1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise CorruptSampleError(f"row {row} was streamed {int(seen[row])} times in epoch {epoch + 1}, expected "
                         f"{expected}; the shards do not match their manifest: rerun `cifd prepare`")
