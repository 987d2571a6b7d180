"""Read the teacher cache: refuse a store that does not match before any compute, then read
rows in blocks (one read per Zarr shard, never row by row), checking every block.

Checked on open: kind, schema version, that the provenance still hashes to the recorded
fingerprint (edited attributes are refused), completeness, the integrity layout (NaN / -1
fill values, a crc32c per chunk) and, when given, the expected teacher, shards and shapes.
Checked on every read: each chunk's crc32c (by Zarr), and that no value is the fill value
(a missing chunk or shard) or otherwise non-finite, and mix params in range; the error names
split, array and rows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch import Tensor
from zarr.codecs import Crc32cCodec

from pipeline.cache.logits import LogitsFormat, bf16_bits
from pipeline.cache.store import (
    CacheCorruptError,
    CacheError,
    cache_schema_of,
    fill_value,
    fingerprint,
    head_digest,
    logits_choice,
    mixup_of,
    shard_digest,
)
from pipeline.data.mixup import bad_mix_rows, mix_fields
from pipeline.data.shards import Manifest
from schemas import layout as L

# What Zarr and its codecs raise on a chunk that does not decode (crc32c mismatch, truncated
# or garbled bytes): re-raised as CacheCorruptError naming split, array and rows.
_DECODE_ERRORS = (ValueError, RuntimeError, OSError, IndexError, KeyError, TypeError)

TEACHER_FIX = ("Restore the cache (`dvc checkout` / `dvc pull`) or rebuild it (move it away, then `cifd embed`); "
               "`cifd cache verify --full` lists every bad shard.")
RDM_FIX = "Rebuild the RDM cache: `cifd rdm`."


@dataclass(frozen=True)
class CacheExpectation:
    """What the caller knows the cache must come from; ``None`` fields are not checked."""

    teacher_sha256: str | None = None  # state-dict sha256 of the frozen teacher
    manifest_sha256: str | None = None  # the shard manifest the cache was made from
    num_classes: int | None = None
    embed_dim: int | None = None


def _mismatch(path: Path, what: str, found: Any, expected: Any, fix: str) -> CacheError:
    return CacheError(f"teacher cache {path}: {what} is {found!r}, expected {expected!r}. {fix}")


def format_rows(rows: Sequence[int] | np.ndarray, limit: int = 6) -> str:
    """``"4-7, 12 (5 rows)"``: sorted rows as ranges, the first ``limit`` ranges only."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1) if len(rows) else []
    text = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs[:limit])
    return f"{text}{', …' if len(runs) > limit else ''} ({len(rows)} row{'s' if len(rows) != 1 else ''})"


def check_layout(root: zarr.Group, splits: Sequence[str], arrays: Sequence[str], *, label: str, fix: str) -> None:
    """Refuse a store whose arrays would hide a missing or corrupt chunk: every row array
    must have the NaN / -1 fill value and a crc32c in its chunk codecs."""
    for split in splits:
        group = root[split]
        for name in (*arrays, L.DONE, L.SHARD_SHA256):
            if name not in group:
                raise CacheError(f"{label} split {split} has no array '{name}'. {fix}")
        for name in arrays:
            array = group[name]
            fill = array.fill_value  # type: ignore[union-attr]
            expected = fill_value(array.dtype)  # type: ignore[union-attr]
            same_fill = bool(np.isnan(fill)) if isinstance(expected, float) else fill == expected
            inner = getattr(array.metadata.codecs[0], "codecs", array.metadata.codecs)  # type: ignore[union-attr]
            if not same_fill or not any(isinstance(c, Crc32cCodec) for c in inner):
                raise CacheError(f"{label} split {split} array {name} has fill value {fill} and codecs "
                                 f"{[type(c).__name__ for c in inner]}; expected fill {expected} and a "
                                 f"Crc32cCodec, or a missing or corrupt chunk would go unnoticed. {fix}")


class ShardedSplit:
    """One split of a shard-aligned Zarr store (the teacher cache or the RDM cache).

    Every read covers whole row ranges with one request per array and is checked: a chunk
    that fails its crc32c, a fill value (missing chunk or shard) or any other NaN / inf is a
    :class:`CacheCorruptError` naming the store, split, array and rows. :meth:`blocks` walks
    the split one Zarr shard at a time, so a pass over it holds one shard in memory.
    """

    def __init__(self, group: zarr.Group, name: str, *, label: str, fix: str, row_arrays: Sequence[str]) -> None:
        self.group = group
        self.name = name
        self.label = label  # "teacher cache <path>" / "RDM cache <path>"
        self.fix = fix
        self.row_arrays = tuple(row_arrays)
        self.shard_bounds: list[tuple[int, int]] = [tuple(b) for b in group.attrs["shard_bounds"]]  # type: ignore[misc]
        self.num_rows = self.shard_bounds[-1][1] if self.shard_bounds else 0

    def _where(self, name: str) -> str:
        return f"{self.label} split {self.name} array {name}"

    def _unreadable_rows(self, name: str, start: int, stop: int) -> list[int]:
        """The rows of the chunks in ``start:stop`` that fail to decode (one read per chunk)."""
        array = self.group[name]
        step = array.chunks[0]  # type: ignore[union-attr]
        bad: list[int] = []
        for a in range(start - start % step, stop, step):
            lo, hi = max(a, start), min(a + step, stop)
            try:
                array[lo:hi]  # type: ignore[index]
            except _DECODE_ERRORS:
                bad.extend(range(lo, hi))
        return bad or list(range(start, stop))

    def _checked(self, name: str, values: np.ndarray, start: int) -> np.ndarray:
        flat = values.reshape(len(values), -1)
        if values.dtype.kind == "f":
            bad = ~np.isfinite(flat)
            if bad.any():
                rows = np.flatnonzero(bad.any(axis=1))
                missing = np.isnan(flat[rows]).all(axis=1)
                what = ("are missing: they read as the fill value NaN, so a chunk or shard file is absent"
                        if missing.all() else "hold NaN or inf values")
                raise CacheCorruptError(f"{self._where(name)}: rows {format_rows(rows + start)} {what}. {self.fix}")
        elif values.dtype.kind == "i" and (flat < 0).any():
            rows = np.flatnonzero((flat < 0).any(axis=1))
            raise CacheCorruptError(f"{self._where(name)}: rows {format_rows(rows + start)} are missing: they read "
                                    f"as the fill value {L.INT_FILL}, so a chunk or shard file is absent. {self.fix}")
        return values

    def read(self, start: int, stop: int, fields: Sequence[str]) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` of ``fields`` (one request per array), checked."""
        out = {}
        for name in fields:
            try:
                values = self.group[name][start:stop]  # type: ignore[index]
            except _DECODE_ERRORS as exc:
                rows = self._unreadable_rows(name, start, stop)
                raise CacheCorruptError(f"{self._where(name)}: rows {format_rows(rows)} cannot be read "
                                        f"({type(exc).__name__}: {exc}). {self.fix}") from exc
            out[name] = self._checked(name, self._decode(name, np.asarray(values)), start)
        return out

    def _decode(self, name: str, values: np.ndarray) -> np.ndarray:
        """A read array as callers get it (a subclass decodes what it stores encoded)."""
        return values

    def _encode(self, name: str, values: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`_decode`: the values as stored (what the checksum covers)."""
        return values

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

    def read_shard(self, shard: int) -> dict[str, np.ndarray]:
        """Every row array of one shard, read and checked like any block."""
        a, b = self.shard_bounds[shard]
        return self.read(a, b, self.row_arrays)

    def check_digest(self, shard: int, rows: dict[str, np.ndarray]) -> None:
        """Refuse ``rows`` (from :meth:`read_shard`) unless their content sha256 is the one
        recorded when the shard was written."""
        a, b = self.shard_bounds[shard]
        recorded = bytes(np.asarray(self.group[L.SHARD_SHA256][shard], dtype=np.uint8))  # type: ignore[index]
        if recorded == bytes(32):
            raise CacheCorruptError(f"{self.label} split {self.name} shard {shard} (rows {a}:{b}) has no recorded "
                                    f"checksum although it is marked written. {self.fix}")
        stored = {name: self._encode(name, rows[name]) for name in self.row_arrays}
        if shard_digest(stored, self.row_arrays) != recorded:
            raise CacheCorruptError(f"{self.label} split {self.name} shard {shard} (rows {a}:{b}): its values differ "
                                    f"from those written (content sha256 mismatch). {self.fix}")

    def verify_shard(self, shard: int) -> dict[str, np.ndarray]:
        """Read every row array of one shard (crc32c, fill and finiteness checks), compare its
        content sha256 with the one recorded at write, and return the rows."""
        rows = self.read_shard(shard)
        self.check_digest(shard, rows)
        return rows


class CacheSplit(ShardedSplit):
    """One split of the teacher cache: N rows of V views, D-dim embeddings, C classes.

    ``L.LOGITS`` can always be read, whatever the cache keeps (``pipeline.cache.logits``):
    stored logits as stored (bfloat16 decoded to float32), float32 logits recomputed on the
    host from the embeddings (from_head) or rebuilt dense from the top-k arrays. Readers on a
    device read :attr:`logits_format`'s fields instead and call its ``dense`` there."""

    def __init__(self, group: zarr.Group, name: str, *, path: Path, logits: LogitsFormat, mixed: bool = False) -> None:
        super().__init__(group, name, label=f"teacher cache {path}", fix=TEACHER_FIX,
                         row_arrays=L.teacher_row_arrays(logits.kind, logits.topk, mixed=mixed))
        self.logits_format = logits
        emb = group[L.EMBEDDINGS]
        self.num_rows, self.num_views, self.embed_dim = emb.shape  # type: ignore[misc]
        self.num_classes = logits.num_classes

    def _decode(self, name: str, values: np.ndarray) -> np.ndarray:
        return self.logits_format.decode_values(name, values)

    def _checked(self, name: str, values: np.ndarray, start: int) -> np.ndarray:
        values = super()._checked(name, values, start)
        if name == L.MIX and len(bad := bad_mix_rows(values)):  # values no draw makes would train silently
            raise CacheCorruptError(f"{self._where(name)}: rows {format_rows(bad + start)} hold mix params out of "
                                    f"range (λ in [0, 1]; a pasted box inside the view, of area 1 − λ). {self.fix}")
        return values

    def _encode(self, name: str, values: np.ndarray) -> np.ndarray:
        if self.logits_format.dtype == "bfloat16" and name in (L.LOGITS, L.TOPK_VALUES):
            return bf16_bits(values)
        return values

    def read(self, start: int, stop: int, fields: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        fields = self.row_arrays if fields is None else tuple(fields)
        fmt = self.logits_format
        virtual = L.LOGITS in fields and L.LOGITS not in fmt.stored_arrays
        wanted = [f for f in fields if not (virtual and f == L.LOGITS)]
        needed = wanted + [f for f in fmt.fields if virtual and f not in wanted]
        out = super().read(start, stop, needed)
        if virtual:
            out[L.LOGITS] = fmt.dense({f: torch.from_numpy(out[f]) for f in fmt.fields}).numpy()
            for f in set(needed) - set(fields):
                del out[f]
        return out

    def read_all(self, fields: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        return super().read_all(self.row_arrays if fields is None else fields)


def _head(root: zarr.Group, provenance: dict[str, Any], path: Path) -> tuple[Tensor, Tensor]:
    """The from_head cache's head arrays, checked (crc32c, finite, the sha256 the provenance records)."""
    try:
        weight = np.asarray(root[L.HEAD_WEIGHT][...], dtype=np.float32)  # type: ignore[index]
        bias = np.asarray(root[L.HEAD_BIAS][...], dtype=np.float32)  # type: ignore[index]
    except _DECODE_ERRORS as exc:
        raise CacheCorruptError(f"teacher cache {path}: the classifier head cannot be read "
                                f"({type(exc).__name__}: {exc}). {TEACHER_FIX}") from exc
    if head_digest(weight, bias) != logits_choice(provenance)["head_sha256"]:
        raise CacheCorruptError(f"teacher cache {path}: the stored classifier head differs from the one its provenance "
                                f"records (sha256 mismatch). {TEACHER_FIX}")
    return torch.from_numpy(weight), torch.from_numpy(bias)


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

    @functools.cached_property
    def logits_format(self) -> LogitsFormat:
        """How this cache keeps its logits (the head read and checked once, from_head)."""
        prov = self.provenance
        choice = logits_choice(prov)
        head = _head(self.root, prov, self.path) if choice["kind"] == "from_head" else (None, None)
        return LogitsFormat(choice["kind"], choice["dtype"], choice["topk"], prov["teacher"]["num_classes"], *head)

    @property
    def row_arrays(self) -> tuple[str, ...]:
        return L.teacher_row_arrays(self.logits_format.kind, self.logits_format.topk, mixed=self.mixup is not None)

    @property
    def mixup(self) -> dict[str, Any] | None:
        """The mixed views' record (views, alpha, ...) of a cache that has them, else None."""
        return mixup_of(self.provenance)

    def split(self, name: str) -> CacheSplit:
        if name not in self.root:
            raise CacheError(f"teacher cache {self.path} has no split '{name}'; it has {self.splits}")
        return CacheSplit(self.root[name], name, path=self.path, logits=self.logits_format,  # type: ignore[arg-type]
                          mixed=self.mixup is not None)


def open_cache(path: str | Path, expect: CacheExpectation | None = None) -> TeacherCache:
    """Open a teacher cache and check kind, schema version, completeness and provenance."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise CacheError(f"no teacher cache at {path}; run `cifd embed` (dvc repro embed) or fix paths.cache")
    try:
        root = zarr.open_group(path, mode="r")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CacheError(f"teacher cache {path}: its metadata cannot be read ({type(exc).__name__}: {exc}). "
                         f"{TEACHER_FIX}") from exc
    attrs = dict(root.attrs)
    if attrs.get(L.ATTR_KIND) != L.CACHE_KIND:
        raise _mismatch(path, "kind", attrs.get(L.ATTR_KIND), L.CACHE_KIND, "Point paths.cache at a teacher cache.")
    if attrs.get(L.ATTR_SCHEMA) not in L.READABLE_CACHE_SCHEMAS:
        raise _mismatch(path, "schema version", attrs.get(L.ATTR_SCHEMA), L.READABLE_CACHE_SCHEMAS,
                        "It was written by another version of cifd: rebuild it (`cifd embed`).")
    recorded = attrs.get(L.ATTR_FINGERPRINT)
    provenance = attrs.get(L.ATTR_PROVENANCE)
    actual = fingerprint(provenance) if isinstance(provenance, dict) else None
    if actual is None or actual != recorded:
        raise CacheError(
            f"teacher cache {path}: its provenance hashes to {str(actual)[:16]}…, not to its recorded fingerprint "
            f"{str(recorded)[:16]}…: its attributes were edited after it was written, so it cannot be trusted. "
            f"{TEACHER_FIX}")
    cache = TeacherCache(path, root)
    if attrs.get(L.ATTR_SCHEMA) != cache_schema_of(cache.provenance):  # the version says what is in it
        raise _mismatch(path, "schema version", attrs.get(L.ATTR_SCHEMA), cache_schema_of(cache.provenance),
                        "Its provenance and its schema disagree on mixed views: rebuild it (`cifd embed`).")
    for split in cache.splits if cache.mixup is not None else ():  # the mix width decides how a view renders
        found, want = (tuple(root[split][L.MIX].shape[2:]) if L.MIX in root[split] else None,  # type: ignore[union-attr]
                       (len(mix_fields(bool(cache.mixup.get("cutmix")))),))  # type: ignore[union-attr]
        if found != want:
            raise _mismatch(path, f"split {split}'s {L.MIX} fields", found, want, "Its mix array does not hold the "
                            "mixed views its provenance records: rebuild it (`cifd embed`).")
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
    check_layout(root, cache.splits, cache.row_arrays, label=f"teacher cache {path}", fix=TEACHER_FIX)
    _ = cache.logits_format  # a from_head cache's head: read and checked here, before any compute
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
