"""The teacher cache as a Zarr v3 store: creation (preallocated, sharded) and opening.

Layout (``schemas.layout``): root attributes carry the schema version, provenance and a
fingerprint of everything that determines the content; one group per split holds
``embeddings (N, V, D) f16``, ``logits (N, V, C)``, ``views (N, V, 5) f32``,
``labels (N,)``, ``index (N,)`` and ``done (num_shards,)``. A Zarr shard spans exactly
the rows of one WebDataset tar, so one worker owns each shard file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from schemas import layout as L

log = logging.getLogger(__name__)


class CacheError(ValueError):
    """The cache is missing, incomplete, of another schema, or from other inputs."""


def fingerprint(provenance: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the inputs in the provenance: equal inputs, equal
    fingerprint. Measured facts (the classifier check) are recorded but not hashed."""
    inputs = {k: v for k, v in provenance.items() if k != "classifier_check"}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class SplitSpec:
    """Shape of one split's arrays."""

    name: str
    num_rows: int
    shard_bounds: tuple[tuple[int, int], ...]  # (start, stop) rows of each tar / zarr shard


@dataclass(frozen=True)
class StoreSpec:
    num_views: int
    embed_dim: int
    num_classes: int
    shard_rows: int
    chunk_rows: int
    logits_dtype: str
    splits: tuple[SplitSpec, ...]


def default_compressor() -> BloscCodec:
    """The Blosc codec of every cache array, as ``schemas.layout.COMPRESSOR`` says."""
    spec = L.COMPRESSOR
    return BloscCodec(cname=spec["cname"], clevel=int(spec["clevel"]), shuffle=BloscShuffle(spec["shuffle"]))


def create_store(path: Path, spec: StoreSpec, *, provenance: dict[str, Any], sources: dict[str, str]) -> zarr.Group:
    """Create a fresh store (replacing any at ``path``) with all rows preallocated."""
    if spec.shard_rows % spec.chunk_rows:
        raise CacheError(
            f"embed.chunk_rows = {spec.chunk_rows} does not divide the shard size {spec.shard_rows} "
            f"(prepare.samples_per_shard); pick a divisor of {spec.shard_rows}"
        )
    if path.exists():
        shutil.rmtree(path)
    root = zarr.open_group(path, mode="w", zarr_format=3)
    v, d, c, s, k = spec.num_views, spec.embed_dim, spec.num_classes, spec.shard_rows, spec.chunk_rows
    arrays = {
        L.EMBEDDINGS: ((v, d), "float16"),
        L.LOGITS: ((v, c), spec.logits_dtype),
        L.VIEWS: ((v, len(L.VIEW_FIELDS)), "float32"),
        L.LABELS: ((), "int64"),
        L.INDEX: ((), "int64"),
    }
    for split in spec.splits:
        group = root.create_group(split.name)
        n = split.num_rows
        for name, (tail, dtype) in arrays.items():
            group.create_array(
                name, shape=(n, *tail), dtype=dtype, chunks=(k, *tail), shards=(s, *tail),
                compressors=default_compressor(), fill_value=0,
            )
        group.create_array(L.DONE, shape=(len(split.shard_bounds),), dtype="uint8", chunks=(1,),
                           fill_value=0, compressors=None)
        group.attrs["shard_bounds"] = [list(b) for b in split.shard_bounds]
    root.attrs.update({
        L.ATTR_KIND: L.CACHE_KIND,
        L.ATTR_SCHEMA: L.CACHE_SCHEMA_VERSION,
        L.ATTR_PROVENANCE: provenance,
        L.ATTR_FINGERPRINT: fingerprint(provenance),
        L.ATTR_SOURCES: sources,
        L.ATTR_COMPLETE: False,
    })
    return root


def open_for_resume(path: Path, provenance: dict[str, Any]) -> zarr.Group | None:
    """The existing store at ``path`` if it was started with the same inputs, else None."""
    if not (path / "zarr.json").is_file():
        return None
    try:
        root = zarr.open_group(path, mode="r+", use_consolidated=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # Unreadable metadata (a run killed while creating the store): start over.
        log.warning("existing store at %s is unreadable (%s); it will be recreated", path, exc)
        return None
    attrs = dict(root.attrs)
    if attrs.get(L.ATTR_SCHEMA) != L.CACHE_SCHEMA_VERSION or attrs.get(L.ATTR_FINGERPRINT) != fingerprint(provenance):
        return None
    return root


def write_rows(group: zarr.Group, start: int, stop: int, rows: dict[str, np.ndarray]) -> None:
    """Write one shard's rows (all arrays), then mark the shard done.

    The done flag is written last, so a killed writer leaves the shard marked unfinished.
    """
    for name in L.ROW_ARRAYS:
        group[name][start:stop] = rows[name]
    bounds = [tuple(b) for b in group.attrs["shard_bounds"]]
    group[L.DONE][bounds.index((start, stop))] = 1


def finalize(path: Path) -> None:
    """Mark the store complete and consolidate its metadata (the last write)."""
    root = zarr.open_group(path, mode="r+", use_consolidated=False)
    root.attrs[L.ATTR_COMPLETE] = True
    zarr.consolidate_metadata(str(path))
