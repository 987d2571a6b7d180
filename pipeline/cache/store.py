"""The teacher cache as a Zarr v3 store: creation (preallocated, sharded), resumption and
the write of one shard.

Layout (``schemas.layout``): root attributes carry the schema version, provenance and a
fingerprint of everything that determines the content; one group per split holds
``embeddings (N, V, D) f16``, ``logits (N, V, C)``, ``views (N, V, 5) f32``,
``labels (N,)``, ``index (N,)``, ``done (num_shards,)`` and ``shard_sha256 (num_shards, 32)``;
the logits arrays depend on the logits choice (``pipeline.cache.logits``): ``from_head``
stores none and keeps the head in two root arrays, ``head_weight`` and ``head_bias``.
A Zarr shard spans exactly the rows of one WebDataset tar, so one worker owns each shard file.

Integrity: every chunk ends with a crc32c of its bytes (a flipped byte fails the read); a
missing chunk reads as NaN / -1, which no writer stores and every reader refuses; each shard's
row values are hashed at write (``shard_sha256``) for ``cifd cache verify --full``. A store is
created beside its path and renamed into place, so it is absent or whole, never half made.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from pipeline.cache.logits import LogitsFormat
from pipeline.data.mixup import mix_fields
from schemas import layout as L

# Provenance keys recorded but not hashed: the classifier check (measured) and the origin
# (described: pipeline.cache.provenance).
NOT_HASHED = ("classifier_check", "origin")


class CacheError(ValueError):
    """The cache is missing, incomplete, of another schema, or from other inputs."""


class CacheCorruptError(CacheError):
    """Stored values are missing, unreadable, non-finite or differ from what was written."""


def fingerprint(provenance: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the inputs in the provenance: equal inputs, equal
    fingerprint. Measured or described facts (the classifier check, the origin) are recorded
    but not hashed."""
    inputs = {k: v for k, v in provenance.items() if k not in NOT_HASHED}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 24 else text[:12] + "…"


def input_changes(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"key: old → new"`` for every hashed input that differs (dotted keys, sorted)."""
    old = _flatten({k: v for k, v in json.loads(json.dumps(recorded)).items() if k not in NOT_HASHED})
    new = _flatten({k: v for k, v in json.loads(json.dumps(current)).items() if k not in NOT_HASHED})
    return [f"{key}: {_short(old.get(key))} → {_short(new.get(key))}"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


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
    logits: str = "stored"  # embed.logits
    logits_topk: int | None = None
    head: tuple[np.ndarray, np.ndarray] | None = None  # (weight (C, D), bias (C,)) float32, from_head


def logits_choice(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The provenance's ``logits`` entry (kind, topk, head_sha256) and the logits dtype; a
    provenance without them (hand-made in tests) means stored dense float32 logits."""
    choice = dict(provenance.get("logits") or {"kind": "stored", "topk": None, "head_sha256": None})
    return {**choice, "dtype": provenance.get("dtypes", {}).get(L.LOGITS, "float32")}


def mixup_of(provenance: Mapping[str, Any]) -> dict[str, Any] | None:
    """The provenance's mixed-view record (views, alpha), or None for a cache without them."""
    views = provenance.get("views")
    return views.get("mixup") if isinstance(views, Mapping) else None


def cache_schema_of(provenance: Mapping[str, Any]) -> int:
    """The schema version of a teacher cache with this provenance (mixed views, CutMix ones)."""
    mix = mixup_of(provenance)
    return L.cache_schema(mix is not None, bool(mix and mix.get("cutmix")))


def row_arrays_of(provenance: Mapping[str, Any]) -> tuple[str, ...]:
    """The row arrays of a teacher cache with this provenance (its logits choice, mixed views)."""
    choice = logits_choice(provenance)
    return L.teacher_row_arrays(choice["kind"], choice["topk"], mixed=mixup_of(provenance) is not None)


def head_digest(weight: np.ndarray, bias: np.ndarray) -> str:
    """sha256 (hex) of the head arrays as stored (float32): recorded in the provenance."""
    return shard_digest({L.HEAD_WEIGHT: np.asarray(weight, np.float32), L.HEAD_BIAS: np.asarray(bias, np.float32)},
                        (L.HEAD_WEIGHT, L.HEAD_BIAS)).hex()


def chunk_codecs() -> list[Any]:
    """The codecs of every chunk, as ``schemas.layout.COMPRESSOR`` says, then a crc32c."""
    spec = L.COMPRESSOR
    return [BloscCodec(cname=spec["cname"], clevel=int(spec["clevel"]), shuffle=BloscShuffle(spec["shuffle"])),
            Crc32cCodec()]


def fill_value(dtype: str | np.dtype) -> float | int:
    """NaN for float arrays, -1 for integer arrays: what a missing chunk reads as."""
    return L.FLOAT_FILL if np.dtype(dtype).kind == "f" else L.INT_FILL


def create_row_array(group: zarr.Group, name: str, *, shape: tuple[int, ...], dtype: str, chunk_rows: int,
                     shard_rows: int) -> zarr.Array:
    """One row-major array: chunks and shards span whole rows, NaN / -1 fill, crc32c per chunk."""
    tail = shape[1:]
    return group.create_array(name, shape=shape, dtype=dtype, chunks=(chunk_rows, *tail),
                              shards=(shard_rows, *tail), compressors=chunk_codecs(), fill_value=fill_value(dtype))


def create_shard_arrays(group: zarr.Group, shard_bounds: Sequence[tuple[int, int]]) -> None:
    """The per-shard bookkeeping of a split: ``done`` flags, content checksums, the bounds."""
    n = len(shard_bounds)
    group.create_array(L.DONE, shape=(n,), dtype="uint8", chunks=(1,), fill_value=0, compressors=None)
    group.create_array(L.SHARD_SHA256, shape=(n, 32), dtype="uint8", chunks=(1, 32), fill_value=0,
                       compressors=None)
    group.attrs["shard_bounds"] = [list(b) for b in shard_bounds]


def shard_digest(rows: Mapping[str, np.ndarray], names: Sequence[str]) -> bytes:
    """sha256 over the named arrays of one shard (name, dtype, shape, C-order bytes)."""
    h = hashlib.sha256()
    for name in names:
        values = np.ascontiguousarray(rows[name])
        h.update(f"{name}|{values.dtype.str}|{values.shape}|".encode())
        h.update(values.tobytes())
    return h.digest()


def create_store(path: Path, spec: StoreSpec, *, provenance: dict[str, Any]) -> zarr.Group:
    """Create a store at ``path`` (which must not exist) with all rows preallocated."""
    if spec.shard_rows % spec.chunk_rows:
        raise CacheError(
            f"embed.chunk_rows = {spec.chunk_rows} does not divide the shard size {spec.shard_rows} "
            f"(prepare.samples_per_shard); pick a divisor of {spec.shard_rows}"
        )
    root = zarr.open_group(path, mode="w-", zarr_format=3)
    v, d, c = spec.num_views, spec.embed_dim, spec.num_classes
    head = spec.head
    fmt = LogitsFormat(spec.logits, spec.logits_dtype, spec.logits_topk, c,
                       *((None, None) if head is None else (torch.from_numpy(head[0]), torch.from_numpy(head[1]))))
    arrays = {
        L.EMBEDDINGS: ((v, d), "float16"),
        **{name: ((v, *tail), dtype) for name, (tail, dtype) in fmt.array_specs().items()},
        L.VIEWS: ((v, len(L.VIEW_FIELDS)), "float32"),
        L.LABELS: ((), "int64"),
        L.INDEX: ((), "int64"),
    }
    mix = mixup_of(provenance)
    if mix is not None:
        arrays[L.MIX_PARTNER] = ((v,), "int64")
        arrays[L.MIX] = ((v, len(mix_fields(bool(mix.get("cutmix"))))), "float32")
    if head is not None:
        for name, values in ((L.HEAD_WEIGHT, head[0]), (L.HEAD_BIAS, head[1])):
            array = root.create_array(name, shape=values.shape, dtype="float32", chunks=values.shape,
                                      compressors=chunk_codecs(), fill_value=L.FLOAT_FILL)
            array[...] = np.asarray(values, dtype=np.float32)
    for split in spec.splits:
        group = root.create_group(split.name)
        for name, (tail, dtype) in arrays.items():
            create_row_array(group, name, shape=(split.num_rows, *tail), dtype=dtype,
                             chunk_rows=spec.chunk_rows, shard_rows=spec.shard_rows)
        create_shard_arrays(group, split.shard_bounds)
    root.attrs.update({
        L.ATTR_KIND: L.CACHE_KIND,
        L.ATTR_SCHEMA: cache_schema_of(provenance),
        L.ATTR_PROVENANCE: provenance,
        L.ATTR_FINGERPRINT: fingerprint(provenance),
        L.ATTR_COMPLETE: False,
    })
    return root


def sibling(path: Path, tag: str, token: str) -> Path:
    """A hidden working path beside ``path`` (same file system, so renames are atomic)."""
    return path.with_name(f".{path.name}.{tag}-{token[:12]}")


def remove_leftovers(path: Path) -> None:
    """Remove the working copies (``sibling``) a killed writer of ``path`` left beside it.
    Call it under the writer lock: no live writer owns them then."""
    for tag in ("new", "old"):
        for leftover in path.parent.glob(f".{path.name}.{tag}-*"):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def swap_in(new: Path, target: Path, token: str) -> None:
    """Put the directory ``new`` at ``target``, replacing what was there (two renames on one
    file system; the old directory is removed only once the new one is in place)."""
    old = sibling(target, "old", token)
    if target.exists():
        os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _open_existing(path: Path, *, what: str, fix: str) -> zarr.Group:
    try:
        return zarr.open_group(path, mode="r+", use_consolidated=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CacheError(
            f"the existing {what} at {path} cannot be read ({type(exc).__name__}: {exc}); it is left as it is: "
            f"{fix}") from exc


def existing_store(path: Path, provenance: dict[str, Any]) -> tuple[zarr.Group | None, list[str]]:
    """What is at ``path`` for a writer with inputs ``provenance``:

    ``(None, [])`` nothing there; ``(root, [])`` a store with the same inputs (resume it);
    ``(None, changes)`` a cache from other inputs, ``changes`` naming each input that differs.
    Anything else (unreadable metadata, not a teacher cache, edited attributes) is a
    :class:`CacheError`: the directory is never removed on a read error.
    """
    fix = "restore it (`dvc checkout`) or move it away to rebuild"
    if not path.exists():
        return None, []
    if not (path / "zarr.json").is_file():
        if path.is_dir() and not any(path.iterdir()):
            return None, []
        raise CacheError(f"{path} exists and is not a teacher cache (no zarr.json); it is left as it is: "
                         "fix paths.cache or move it away")
    root = _open_existing(path, what="teacher cache", fix=fix)
    attrs = dict(root.attrs)
    if attrs.get(L.ATTR_KIND) != L.CACHE_KIND:
        raise CacheError(f"{path} is a Zarr store of kind {attrs.get(L.ATTR_KIND)!r}, not a teacher cache; it is "
                         "left as it is: fix paths.cache or move it away")
    want = cache_schema_of(provenance)
    if attrs.get(L.ATTR_SCHEMA) != want:
        return None, [f"schema_version: {attrs.get(L.ATTR_SCHEMA)} → {want}"]
    recorded = attrs.get(L.ATTR_PROVENANCE)
    if not isinstance(recorded, dict) or fingerprint(recorded) != attrs.get(L.ATTR_FINGERPRINT):
        raise CacheError(f"the existing teacher cache at {path} has attributes that do not hash to its recorded "
                         f"fingerprint (edited after it was written); it is left as it is: {fix}")
    changes = input_changes(recorded, provenance)
    return (None, changes) if changes else (root, [])


def claim(root: zarr.Group, token: str) -> None:
    """Record ``token`` as the store's writer: writes carrying another token are refused."""
    root.attrs[L.ATTR_WRITER] = token


def check_writer(root: zarr.Group, *, fingerprint_: str, token: str, where: str) -> None:
    """Refuse to write unless ``root`` is still the store this run created or resumed."""
    attrs = dict(root.attrs)
    if attrs.get(L.ATTR_FINGERPRINT) != fingerprint_ or attrs.get(L.ATTR_WRITER) != token:
        raise CacheError(
            f"{where}: the store was recreated or taken over by another run (fingerprint "
            f"{str(attrs.get(L.ATTR_FINGERPRINT))[:12]}…, writer {str(attrs.get(L.ATTR_WRITER))[:12]}…, "
            f"this run has {fingerprint_[:12]}…, {token[:12]}…); this run stops without writing")


def write_rows(root: zarr.Group, split: str, start: int, stop: int, rows: Mapping[str, np.ndarray], *,
               fingerprint_: str, token: str) -> None:
    """Write one shard's rows (all arrays) and their checksum, then mark the shard done.

    Checks first that the store is still this run's (``check_writer``). The done flag is
    written last, so a killed writer leaves the shard marked unfinished.
    """
    where = f"teacher cache {getattr(root.store, 'root', root.store)} split {split} rows {start}:{stop}"
    check_writer(root, fingerprint_=fingerprint_, token=token, where=where)
    names = row_arrays_of(dict(root.attrs)[L.ATTR_PROVENANCE])
    group = root[split]
    values = {name: np.asarray(rows[name], dtype=group[name].dtype) for name in names}  # type: ignore[union-attr]
    bounds = [tuple(b) for b in group.attrs["shard_bounds"]]  # type: ignore[union-attr]
    shard = bounds.index((start, stop))
    try:
        for name in names:
            group[name][start:stop] = values[name]  # type: ignore[index]
        group[L.SHARD_SHA256][shard] = np.frombuffer(shard_digest(values, names), dtype=np.uint8)  # type: ignore[index]
        group[L.DONE][shard] = 1  # type: ignore[index]
    except OSError as exc:
        raise CacheError(f"cannot write {where} ({exc}); free space or fix permissions, then rerun") from exc


def finalize(path: Path) -> None:
    """Mark the store complete, drop the writer token and consolidate the metadata (the last
    write: a complete store's bytes depend on its content only)."""
    try:
        root = zarr.open_group(path, mode="r+", use_consolidated=False)
        root.attrs[L.ATTR_COMPLETE] = True
        if L.ATTR_WRITER in root.attrs:
            del root.attrs[L.ATTR_WRITER]
        zarr.consolidate_metadata(str(path))
    except OSError as exc:
        raise CacheError(f"cannot finalize the store at {path} ({exc}); free space or fix permissions, "
                         "then rerun") from exc
