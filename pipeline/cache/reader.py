"""Read the teacher cache: refuse a store that does not match before any compute, then read
rows in blocks (one read per Zarr shard, never row by row)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.cache.store import CacheError
from pipeline.data.shards import Manifest
from schemas import layout as L


@dataclass(frozen=True)
class CacheExpectation:
    """What the caller knows the cache must come from; ``None`` fields are not checked."""

    teacher_sha256: str | None = None  # state-dict sha256 of the frozen teacher
    manifest_sha256: str | None = None  # the shard manifest the cache was made from
    num_classes: int | None = None
    embed_dim: int | None = None


def _mismatch(path: Path, what: str, found: Any, expected: Any, fix: str) -> CacheError:
    return CacheError(f"teacher cache {path}: {what} is {found!r}, expected {expected!r}. {fix}")


class ShardedSplit:
    """One split of a shard-aligned Zarr store (the teacher cache or the RDM cache).

    Every read covers whole row ranges with one request per array; :meth:`blocks` walks the
    split one Zarr shard at a time, so a pass over it holds one shard in memory.
    """

    def __init__(self, group: zarr.Group, name: str) -> None:
        self.group = group
        self.name = name
        self.shard_bounds: list[tuple[int, int]] = [tuple(b) for b in group.attrs["shard_bounds"]]  # type: ignore[misc]
        self.num_rows = self.shard_bounds[-1][1] if self.shard_bounds else 0

    def read(self, start: int, stop: int, fields: Sequence[str]) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` of ``fields`` (one request per array)."""
        return {name: self.group[name][start:stop] for name in fields}  # type: ignore[index]

    def blocks(self, fields: Sequence[str]) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """``(start, stop, arrays)`` for each Zarr shard of the split, in row order."""
        for a, b in self.shard_bounds:
            yield a, b, self.read(a, b, fields)

    def read_all(self, fields: Sequence[str]) -> dict[str, np.ndarray]:
        """The whole split, read shard by shard (memory grows with the split: small data only)."""
        blocks = [blk for _, _, blk in self.blocks(fields)]
        if not blocks:
            return {name: self.group[name][0:0] for name in fields}  # type: ignore[index]
        return {name: np.concatenate([blk[name] for blk in blocks]) for name in fields}

    def rms(self, field: str) -> float:
        """Root mean square of every value of ``field``, in one pass over the shards (float64
        sums, so the result does not depend on the shard size)."""
        total, count = 0.0, 0
        for _, _, blk in self.blocks((field,)):
            values = blk[field].astype(np.float64)
            total += float(np.square(values).sum())
            count += values.size
        return math.sqrt(total / count) if count else 0.0


class CacheSplit(ShardedSplit):
    """One split of the teacher cache: N rows of V views, D-dim embeddings, C classes."""

    def __init__(self, group: zarr.Group, name: str) -> None:
        super().__init__(group, name)
        emb = group[L.EMBEDDINGS]
        self.num_rows, self.num_views, self.embed_dim = emb.shape  # type: ignore[misc]
        self.num_classes = group[L.LOGITS].shape[2]  # type: ignore[index]

    def read(self, start: int, stop: int, fields: Sequence[str] = L.ROW_ARRAYS) -> dict[str, np.ndarray]:
        return super().read(start, stop, fields)

    def read_all(self, fields: Sequence[str] = L.ROW_ARRAYS) -> dict[str, np.ndarray]:
        return super().read_all(fields)


class TeacherCache:
    """An opened, validated teacher cache."""

    def __init__(self, path: Path, root: zarr.Group) -> None:
        self.path = path
        self.root = root
        self.attrs: dict[str, Any] = dict(root.attrs)

    @property
    def provenance(self) -> dict[str, Any]:
        return self.attrs[L.ATTR_PROVENANCE]

    @property
    def fingerprint(self) -> str:
        return self.attrs[L.ATTR_FINGERPRINT]

    @property
    def splits(self) -> list[str]:
        return [name for name in L.SPLITS if name in self.root]

    def split(self, name: str) -> CacheSplit:
        if name not in self.root:
            raise CacheError(f"teacher cache {self.path} has no split '{name}'; it has {self.splits}")
        return CacheSplit(self.root[name], name)  # type: ignore[arg-type]


def open_cache(path: str | Path, expect: CacheExpectation | None = None) -> TeacherCache:
    """Open a teacher cache and check kind, schema version, completeness and provenance."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise CacheError(f"no teacher cache at {path}; run `cifd embed` (dvc repro embed) or fix paths.cache")
    root = zarr.open_group(path, mode="r")
    attrs = dict(root.attrs)
    if attrs.get(L.ATTR_KIND) != L.CACHE_KIND:
        raise _mismatch(path, "kind", attrs.get(L.ATTR_KIND), L.CACHE_KIND, "Point paths.cache at a teacher cache.")
    if attrs.get(L.ATTR_SCHEMA) != L.CACHE_SCHEMA_VERSION:
        raise _mismatch(path, "schema version", attrs.get(L.ATTR_SCHEMA), L.CACHE_SCHEMA_VERSION,
                        "Rebuild it with this version of cifd (`cifd embed`).")
    cache = TeacherCache(path, root)
    if not attrs.get(L.ATTR_COMPLETE):
        done = {s: int(np.asarray(root[s][L.DONE][:]).sum()) for s in cache.splits}
        total = {s: len(root[s].attrs["shard_bounds"]) for s in cache.splits}
        raise CacheError(
            f"teacher cache {path} is incomplete (shards done per split: "
            f"{ {s: f'{done[s]}/{total[s]}' for s in done} }); rerun `cifd embed` to resume it"
        )
    if expect is not None:
        prov = cache.provenance
        checks = [
            ("teacher state-dict sha256", prov["teacher"]["state_dict_sha256"], expect.teacher_sha256,
             "It was made by another teacher: rerun `cifd embed` with this teacher, or use the teacher it names."),
            ("dataset manifest sha256", prov["dataset"]["manifest_sha256"], expect.manifest_sha256,
             "It was made from other shards: rerun `cifd embed`, or `cifd prepare` with the source it names."),
            ("num_classes", prov["teacher"]["num_classes"], expect.num_classes,
             "The cache and the task disagree on the label set."),
            ("embedding dim", prov["teacher"]["embed_dim"], expect.embed_dim,
             "The cache holds another teacher's embeddings."),
        ]
        for what, found, expected, fix in checks:
            if expected is not None and found != expected:
                raise _mismatch(path, what, found, expected, fix)
    for name in cache.splits:
        done = np.asarray(root[name][L.DONE][:])
        if not done.all():
            raise CacheError(f"teacher cache {path} split {name}: shards {np.flatnonzero(done == 0).tolist()} "
                             "are not written although the store says complete; rerun `cifd embed`")
    return cache


def check_alignment(cache: TeacherCache, manifest: Manifest) -> None:
    """Refuse a cache whose rows are not exactly the shards' rows, before any training."""
    for split in L.SPLITS:
        part = cache.split(split)
        shards = manifest.split(split)["num_samples"]
        if part.num_rows != shards:
            raise CacheError(f"teacher cache {cache.path} split {split} has {part.num_rows} rows but the shards "
                             f"have {shards}; the cache is incomplete or from other shards: rerun `cifd embed`")
        for a, b, blk in part.blocks((L.INDEX,)):
            index = blk[L.INDEX]
            expected = np.arange(a, b)
            if not np.array_equal(index, expected):
                first = int(np.flatnonzero(index != expected)[0]) if len(index) == len(expected) else 0
                raise CacheError(f"teacher cache {cache.path} split {split} holds row {int(index[first])} at "
                                 f"position {a + first}; the cache rows are not aligned with the shards: "
                                 "rerun `cifd embed`")
