"""Read the teacher cache: refuse a store that does not match before any compute, then read
rows in blocks (one read per Zarr shard, never row by row)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.cache.store import CacheError
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


class CacheSplit:
    """One split of the cache; reads are in blocks aligned with Zarr shards."""

    def __init__(self, group: zarr.Group, name: str) -> None:
        self.group = group
        self.name = name
        self.shard_bounds: list[tuple[int, int]] = [tuple(b) for b in group.attrs["shard_bounds"]]  # type: ignore[misc]
        emb = group[L.EMBEDDINGS]
        self.num_rows, self.num_views, self.embed_dim = emb.shape
        self.num_classes = group[L.LOGITS].shape[2]

    def read(self, start: int, stop: int, fields: Sequence[str] = L.ROW_ARRAYS) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` of ``fields`` (one request per array)."""
        return {name: self.group[name][start:stop] for name in fields}

    def read_all(self, fields: Sequence[str] = L.ROW_ARRAYS) -> dict[str, np.ndarray]:
        """The whole split, read shard by shard."""
        blocks = [self.read(a, b, fields) for a, b in self.shard_bounds]
        if not blocks:
            return {name: self.group[name][0:0] for name in fields}
        return {name: np.concatenate([blk[name] for blk in blocks]) for name in fields}


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
