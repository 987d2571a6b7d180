"""The RDM cache (``rdm.zarr``): each RDM's x̂ and logits for every cached (row, view).

A separate store from the teacher cache, which stays immutable and shareable. Rows and
Zarr shards align with the teacher cache; the root attributes name the teacher cache's
fingerprint, so a mismatched pair is refused before any compute.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from pipeline.cache.reader import ShardedSplit, TeacherCache
from pipeline.cache.store import CacheError, default_compressor, finalize
from pipeline.rd import RDMBank, bank_outputs
from schemas import layout as L


def create_rdm_store(path: Path, *, teacher: TeacherCache, num_rdms: int, attrs: dict[str, Any]) -> zarr.Group:
    """Create a fresh RDM store shaped like ``teacher`` with ``num_rdms`` outputs per view;
    Zarr chunks and shards are those of the teacher cache (aligned rows, one writer)."""
    if path.exists():
        shutil.rmtree(path)
    root = zarr.open_group(path, mode="w", zarr_format=3)
    for name in teacher.splits:
        part = teacher.split(name)
        shard_rows = part.group[L.EMBEDDINGS].shards[0]  # type: ignore[index]
        chunk_rows = part.group[L.EMBEDDINGS].chunks[0]  # type: ignore[index]
        group = root.create_group(name)
        n, v = part.num_rows, part.num_views
        for array, tail, dtype in ((L.RDM_X_HAT, (v, num_rdms, part.embed_dim), "float16"),
                                   (L.RDM_LOGITS, (v, num_rdms, part.num_classes), "float32")):
            group.create_array(array, shape=(n, *tail), dtype=dtype, chunks=(chunk_rows, *tail),
                               shards=(shard_rows, *tail), compressors=default_compressor(), fill_value=0)
        group.attrs["shard_bounds"] = [list(b) for b in part.shard_bounds]
    root.attrs.update({
        L.ATTR_KIND: L.RDM_KIND,
        L.ATTR_SCHEMA: L.RDM_SCHEMA_VERSION,
        L.ATTR_TEACHER_CACHE: teacher.fingerprint,
        L.ATTR_RDM: attrs,
        L.ATTR_COMPLETE: False,
    })
    return root


def cache_bank_outputs(
    bank: RDMBank, *, teacher: TeacherCache, path: Path, scale: float,
    attrs: dict[str, Any], batch_size: int = 2048,
) -> None:
    """Run ``bank`` once (rounding mode) over every cached (row, view) of ``teacher`` and
    write x̂ and logits to a fresh RDM store at ``path``, one teacher-cache shard at a time."""
    device = next(bank.parameters()).device
    root = create_rdm_store(path, teacher=teacher, num_rdms=bank.num_rdms, attrs=attrs)
    for name in teacher.splits:
        part = teacher.split(name)
        d, v = part.embed_dim, part.num_views
        for a, b in part.shard_bounds:
            emb = torch.from_numpy(part.read(a, b, (L.EMBEDDINGS,))[L.EMBEDDINGS].astype(np.float32)).to(device)
            x_hat, logits = bank_outputs(bank, emb.reshape(-1, d), scale=scale, batch_size=batch_size)
            m = x_hat.shape[1]
            write_rdm_rows(root[name], a, b, x_hat.reshape(b - a, v, m, d).cpu().numpy(),  # type: ignore[arg-type]
                           logits.reshape(b - a, v, m, -1).cpu().numpy())
    finalize(path)


def write_rdm_rows(group: zarr.Group, start: int, stop: int, x_hat: np.ndarray, logits: np.ndarray) -> None:
    """Write one shard's rows: x̂ (n, V, M, D) and logits (n, V, M, C)."""
    group[L.RDM_X_HAT][start:stop] = x_hat.astype(np.float16)
    group[L.RDM_LOGITS][start:stop] = logits.astype(np.float32)


class RdmCache:
    """An opened RDM cache, checked against its teacher cache."""

    def __init__(self, path: Path, root: zarr.Group) -> None:
        self.path = path
        self.root = root
        self.attrs: dict[str, Any] = dict(root.attrs)

    @property
    def num_rdms(self) -> int:
        return len(self.attrs[L.ATTR_RDM]["rate_weights"])

    @property
    def embedding_scale(self) -> float:
        """The scale (teacher embedding RMS) the RDMs were trained and run with."""
        return float(self.attrs[L.ATTR_RDM]["embedding_scale"])

    @property
    def checkpoint_sha256(self) -> str:
        """sha256 of the RDM model file whose outputs this store holds."""
        return str(self.attrs[L.ATTR_RDM]["checkpoint_sha256"])

    def split(self, name: str) -> ShardedSplit:
        """One split, read with the same shard-aligned reader as the teacher cache."""
        if name not in self.root:
            raise CacheError(f"RDM cache {self.path} has no split '{name}'")
        return ShardedSplit(self.root[name], name)  # type: ignore[arg-type]


def open_rdm_cache(path: str | Path, teacher: TeacherCache) -> RdmCache:
    """Open ``rdm.zarr`` and refuse it unless it was made from exactly ``teacher``."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise CacheError(f"no RDM cache at {path}; run `cifd rdm` (dvc repro rdm) or fix paths.rdm_cache")
    root = zarr.open_group(path, mode="r")
    attrs = dict(root.attrs)
    if attrs.get(L.ATTR_KIND) != L.RDM_KIND or attrs.get(L.ATTR_SCHEMA) != L.RDM_SCHEMA_VERSION:
        raise CacheError(f"{path} is not an RDM cache of schema {L.RDM_SCHEMA_VERSION} "
                         f"(kind {attrs.get(L.ATTR_KIND)!r}, schema {attrs.get(L.ATTR_SCHEMA)!r}); rerun `cifd rdm`")
    if not attrs.get(L.ATTR_COMPLETE):
        raise CacheError(f"RDM cache {path} is incomplete; rerun `cifd rdm`")
    found = attrs.get(L.ATTR_TEACHER_CACHE)
    if found != teacher.fingerprint:
        raise CacheError(
            f"RDM cache {path} was made from teacher cache {str(found)[:16]}…, but the teacher cache at "
            f"{teacher.path} is {teacher.fingerprint[:16]}…. Rerun `cifd rdm` on this teacher cache, or "
            "point paths.cache at the cache the RDMs were trained on."
        )
    for name in teacher.splits:
        rows = root[name][L.RDM_X_HAT].shape[0]  # type: ignore[index]
        if rows != teacher.split(name).num_rows:
            raise CacheError(f"RDM cache {path} split {name} has {rows} rows, teacher cache has "
                             f"{teacher.split(name).num_rows}; rerun `cifd rdm`")
    return RdmCache(path, root)
