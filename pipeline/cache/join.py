"""The teacher cache joined to a streamed split for evaluation: each row's clean view (the
cache's view 0, the box the teacher saw) and the teacher's logits on it, read one block of
rows at a time (:class:`pipeline.evaluate.ShardChunks` calls it once per shard)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from pipeline.cache.reader import CacheSplit, TeacherCache
from pipeline.cache.store import CacheError
from pipeline.data.shards import Manifest
from pipeline.evaluate import ShardChunks
from schemas import layout as L

__all__ = ["CleanViewJoin", "cached_chunks"]


class CleanViewJoin:
    """Rows ``start:stop`` of a teacher-cache split: view-0 boxes (n, 5) and the teacher's
    view-0 logits (n, C) float32 on ``device`` (made there for a compact cache). The shard's
    labels must be the cached ones (else :class:`CacheError`, naming the row)."""

    def __init__(self, split: CacheSplit, device: torch.device, *, expected_rows: int) -> None:
        if split.num_rows != expected_rows:
            raise CacheError(f"the teacher cache's {split.name} split has {split.num_rows} rows but the shards have "
                             f"{expected_rows}; rerun `cifd embed`")
        self.split, self.device = split, device

    def __call__(self, start: int, stop: int, labels: np.ndarray) -> tuple[Tensor, Tensor]:
        fmt = self.split.logits_format
        cached = self.split.read(start, stop, (*fmt.fields, L.VIEWS, L.LABELS))
        if not np.array_equal(cached[L.LABELS], labels):
            i = int(np.flatnonzero(cached[L.LABELS] != labels)[0])
            raise CacheError(f"cache and shards disagree at {self.split.name} row {start + i}: label {int(labels[i])} "
                             f"in the shards, {int(cached[L.LABELS][i])} in the cache; rerun `cifd embed`")
        views = torch.from_numpy(cached[L.VIEWS][:, 0])
        return views, fmt.dense_on({f: cached[f][:, 0] for f in fmt.fields}, self.device)


def cached_chunks(manifest: Manifest, cache: TeacherCache, split: str, device: torch.device) -> ShardChunks:
    """``split`` streamed shard by shard with the cache's clean views and teacher logits."""
    return ShardChunks(manifest, split, device, join=CleanViewJoin(
        cache.split(split), device, expected_rows=int(manifest.split(split)["num_samples"])))
