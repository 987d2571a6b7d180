"""The RDM cache (``rdm.zarr``): each RDM's x̂ for every cached (row, view), the RDMs' logit
heads, and the RDM model file whose outputs it holds.

An RDM's logits are its linear head applied to its x̂ (``RDMBank.forward``), so the store
keeps the heads (two small root arrays, crc32c-checked, their sha256 in the attributes and
so in the fingerprint) instead of an (N, V, M, C) logits array: readers make the logits on
their own device (:class:`RdmHead`). For C = 1,000 and M = 3 that is 12 kB less per view
written, kept and read, against M·D·C multiply-adds per chosen view in stage three.

A separate store from the teacher cache, which stays immutable and shareable. Rows and
Zarr shards align with the teacher cache; the root attributes name the teacher cache's
fingerprint and the sha256 of the RDM model file, so a mismatched store is refused before
any compute. The model file and the store are written as one pair (:func:`rdm_writer`):
both go to working copies beside their targets and are swapped in at the end, so a failed
run leaves the previous pair.
"""

from __future__ import annotations

import functools
import json

import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch import Tensor

from pipeline.cache.lock import writer_lock
from pipeline.cache.reader import RDM_FIX, ShardedSplit, TeacherCache, check_layout, format_rows
from pipeline.cache.store import (
    CacheCorruptError,
    CacheError,
    chunk_codecs,
    create_row_array,
    create_shard_arrays,
    finalize,
    fingerprint,
    remove_leftovers,
    shard_digest,
    sibling,
    swap_in,
)
from pipeline.models import file_sha256
from pipeline.models.files import write_tensor_file
from pipeline.rd import RDMBank, bank_outputs
from schemas import layout as L

FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class RdmHead:
    """The M logit heads of an RDM bank: ``logits = x̂ / scale @ weight.T + bias`` per RDM,
    as :meth:`pipeline.rd.RDMBank.forward` makes them (x̂ is stored in the teacher's
    embedding units, the bank works in units of ``scale``)."""

    weight: Tensor  # (M, C, D) float32
    bias: Tensor  # (M, C) float32
    scale: float

    def to(self, device: torch.device | str) -> RdmHead:
        """The same heads on ``device`` (move them once, not per batch)."""
        return RdmHead(self.weight.to(device), self.bias.to(device), self.scale)

    def __call__(self, x_hat: Tensor) -> Tensor:
        """(M, B, D) x̂ (any float dtype) → (M, B, C) float32 logits."""
        x = x_hat.float() / self.scale
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


def head_sha256(weight: np.ndarray, bias: np.ndarray) -> str:
    """sha256 (hex) of the heads as stored (float32), recorded in the store's attributes."""
    return shard_digest({L.RDM_HEAD_WEIGHT: np.asarray(weight, np.float32), L.RDM_HEAD_BIAS: np.asarray(bias, np.float32)},
                        (L.RDM_HEAD_WEIGHT, L.RDM_HEAD_BIAS)).hex()


def rdm_fingerprint(teacher_fingerprint: str, attrs: Mapping[str, Any]) -> str:
    """What the RDM store's content follows from: its teacher cache and its RDM attributes."""
    return fingerprint({"teacher_cache": teacher_fingerprint, "rdm": dict(attrs)})


def create_rdm_store(path: Path, *, teacher: TeacherCache, num_rdms: int, attrs: dict[str, Any],
                     head: tuple[np.ndarray, np.ndarray]) -> zarr.Group:
    """Create an RDM store at ``path`` (which must not exist) shaped like ``teacher`` with
    ``num_rdms`` outputs per view and the heads ``(weight (M, C, D), bias (M, C))``; Zarr
    chunks and shards are those of the teacher cache."""
    weight, bias = (np.asarray(a, dtype=np.float32) for a in head)
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise CacheError(f"RDM store {path}: the RDMs' logit heads hold NaN or inf; the RDMs diverged: lower rdm.lr")
    attrs = {**attrs, "head_sha256": head_sha256(weight, bias)}
    root = zarr.open_group(path, mode="w-", zarr_format=3)
    for name, values in ((L.RDM_HEAD_WEIGHT, weight), (L.RDM_HEAD_BIAS, bias)):
        array = root.create_array(name, shape=values.shape, dtype="float32", chunks=values.shape,
                                  compressors=chunk_codecs(), fill_value=L.FLOAT_FILL)
        array[...] = values
    for name in teacher.splits:
        part = teacher.split(name)
        shard_rows = part.group[L.EMBEDDINGS].shards[0]  # type: ignore[index,union-attr]
        chunk_rows = part.group[L.EMBEDDINGS].chunks[0]  # type: ignore[index,union-attr]
        group = root.create_group(name)
        n, v = part.num_rows, part.num_views
        create_row_array(group, L.RDM_X_HAT, shape=(n, v, num_rdms, part.embed_dim), dtype="float16",
                         chunk_rows=chunk_rows, shard_rows=shard_rows)
        create_shard_arrays(group, part.shard_bounds)
    root.attrs.update({
        L.ATTR_KIND: L.RDM_KIND,
        L.ATTR_SCHEMA: L.RDM_SCHEMA_VERSION,
        L.ATTR_TEACHER_CACHE: teacher.fingerprint,
        L.ATTR_RDM: attrs,
        L.ATTR_FINGERPRINT: rdm_fingerprint(teacher.fingerprint, attrs),
        L.ATTR_COMPLETE: False,
    })
    return root


def write_rdm_rows(group: zarr.Group, start: int, stop: int, x_hat: np.ndarray, logits: np.ndarray) -> None:
    """Write one shard's x̂ (n, V, M, D) with its checksum; refuse NaN / inf outputs (x̂, or
    the logits (n, V, M, C) the bank made from it, which readers will remake) and x̂ beyond
    the float16 range, naming split and rows."""
    where = f"RDM outputs for split {group.basename} rows {start}:{stop}"
    for name, values in ((L.RDM_X_HAT, x_hat), ("logits", logits)):
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if bad.any():
            raise CacheError(f"{where}: {name} is NaN or inf at rows {format_rows(np.flatnonzero(bad) + start)}; "
                             "the RDMs diverged: lower rdm.lr or check the teacher cache")
    big = np.abs(x_hat.reshape(len(x_hat), -1)).max(axis=1) > FLOAT16_MAX
    if big.any():
        raise CacheError(f"{where}: {L.RDM_X_HAT} exceeds the float16 range ({FLOAT16_MAX:g}) at rows "
                         f"{format_rows(np.flatnonzero(big) + start)}; the RDMs diverged: lower rdm.lr")
    rows = {L.RDM_X_HAT: x_hat.astype(np.float16)}
    for name in L.RDM_ROW_ARRAYS:
        group[name][start:stop] = rows[name]  # type: ignore[index]
    shard = [tuple(b) for b in group.attrs["shard_bounds"]].index((start, stop))  # type: ignore[union-attr]
    group[L.SHARD_SHA256][shard] = np.frombuffer(shard_digest(rows, L.RDM_ROW_ARRAYS), dtype=np.uint8)  # type: ignore[index]
    group[L.DONE][shard] = 1  # type: ignore[index]


def cache_bank_outputs(
    bank: RDMBank, *, teacher: TeacherCache, path: Path, scale: float,
    attrs: dict[str, Any], batch_size: int = 2048,
    on_shard: Callable[[str, int, int], None] | None = None,
) -> None:
    """Run ``bank`` once (rounding mode) over every cached (row, view) of ``teacher`` and
    write x̂ and logits to a new RDM store at ``path``, one teacher-cache shard at a time;
    ``on_shard(split, start, stop)`` is called after each shard (progress)."""
    device = next(bank.parameters()).device
    head = (bank.head.weight.detach().cpu().float().numpy(), bank.head.bias.detach().cpu().float().numpy())
    root = create_rdm_store(path, teacher=teacher, num_rdms=bank.num_rdms, attrs=attrs, head=head)
    for name in teacher.splits:
        part = teacher.split(name)
        d, v = part.embed_dim, part.num_views
        for a, b in part.shard_bounds:
            emb = torch.from_numpy(part.read(a, b, (L.EMBEDDINGS,))[L.EMBEDDINGS].astype(np.float32)).to(device)
            x_hat, logits = bank_outputs(bank, emb.reshape(-1, d), scale=scale, batch_size=batch_size)
            m = x_hat.shape[1]
            write_rdm_rows(root[name], a, b, x_hat.reshape(b - a, v, m, d).cpu().numpy(),  # type: ignore[arg-type]
                           logits.reshape(b - a, v, m, -1).cpu().numpy())
            if on_shard is not None:
                on_shard(name, a, b)
    finalize(path)


class RdmWriter:
    """Writes the RDM model file and the RDM store as one pair; get one from :func:`rdm_writer`."""

    def __init__(self, store: Path, model_file: Path, token: str) -> None:
        self.store, self.model_file, self.token = store, model_file, token

    def publish(
        self, bank: RDMBank, *, teacher: TeacherCache, document: Mapping[str, Any], attrs: Mapping[str, Any],
        scale: float, batch_size: int, on_shard: Callable[[str, int, int], None] | None = None,
        readers: Mapping[str, bool] | None = None,
    ) -> str:
        """Write the bank's weights + ``document`` (a safetensors file) and its outputs over
        ``teacher`` (a store whose attributes are ``attrs`` plus the model file's sha256) to
        working copies, then swap both in. Returns the model file's sha256. On any failure
        the working copies are removed and the previous pair is left as it was.

        ``readers`` (consumer name → whether it reads this store) writes one small JSON file per
        consumer under ``uses/`` in the store: what that consumer depends on. A DVC stage that
        depends on its own file reruns when the RDMs change only if it reads them (``distill@ce``
        and ``@kd`` do not)."""
        new_model = sibling(self.model_file, "new", self.token)
        new_store = sibling(self.store, "new", self.token)
        try:
            write_tensor_file(new_model, bank.state_dict(), document)
            sha = file_sha256(new_model)
            cache_bank_outputs(bank, teacher=teacher, path=new_store, scale=scale,
                               attrs={**attrs, "checkpoint_sha256": sha}, batch_size=batch_size, on_shard=on_shard)
            write_readers(new_store, readers or {}, model_sha256=sha, teacher_fingerprint=teacher.fingerprint)
            swap_in(new_store, self.store, self.token)
            os.replace(new_model, self.model_file)
        except OSError as exc:
            raise CacheError(f"cannot write the RDM model file {self.model_file} and store {self.store} ({exc}); "
                             "the previous pair is left as it was: free space or fix permissions, then rerun") from exc
        finally:
            new_model.unlink(missing_ok=True)
            shutil.rmtree(new_store, ignore_errors=True)
        return sha


def write_readers(store: Path, readers: Mapping[str, bool], *, model_sha256: str, teacher_fingerprint: str) -> None:
    """``store/uses/<name>.json`` for each consumer: the RDM model and teacher cache it reads,
    or a constant document when it reads nothing of this store."""
    folder = store / L.RDM_USES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, reads in sorted(readers.items()):
        doc = ({"consumer": name, "reads_rdm_cache": True, "rdm_model_sha256": model_sha256,
                "teacher_cache_fingerprint": teacher_fingerprint} if reads
               else {"consumer": name, "reads_rdm_cache": False})
        (folder / f"{name}.json").write_text(json.dumps(doc, sort_keys=True, indent=1) + "\n")


@contextmanager
def rdm_writer(store: str | Path, model_file: str | Path) -> Iterator[RdmWriter]:
    """Hold the writer lock of the RDM store (it covers the model file too) for the block and
    clear what a killed writer left; a second writer is refused at once, naming the holder."""
    store, model_file = Path(store), Path(model_file)
    with writer_lock(store, command="cifd rdm") as token:
        remove_leftovers(store)
        remove_leftovers(model_file)
        model_file.parent.mkdir(parents=True, exist_ok=True)
        yield RdmWriter(store, model_file, token)


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

    @functools.cached_property
    def head(self) -> RdmHead:
        """The RDMs' logit heads (on the CPU), checked against the sha256 in the attributes."""
        try:
            weight = np.asarray(self.root[L.RDM_HEAD_WEIGHT][...], dtype=np.float32)  # type: ignore[index]
            bias = np.asarray(self.root[L.RDM_HEAD_BIAS][...], dtype=np.float32)  # type: ignore[index]
        except (KeyError, ValueError, OSError, TypeError) as exc:
            raise CacheCorruptError(f"RDM cache {self.path}: the RDMs' logit heads cannot be read "
                                    f"({type(exc).__name__}: {exc}). {RDM_FIX}") from exc
        if head_sha256(weight, bias) != self.attrs[L.ATTR_RDM].get("head_sha256"):
            raise CacheCorruptError(f"RDM cache {self.path}: the stored logit heads differ from those its attributes "
                                    f"record (sha256 mismatch). {RDM_FIX}")
        m = self.num_rdms
        if weight.ndim != 3 or weight.shape[0] != m or bias.shape != weight.shape[:2]:
            raise CacheCorruptError(f"RDM cache {self.path}: heads of shapes {weight.shape} / {bias.shape}, expected "
                                    f"({m}, C, D) / ({m}, C). {RDM_FIX}")
        return RdmHead(torch.from_numpy(weight), torch.from_numpy(bias), self.embedding_scale)

    def split(self, name: str) -> ShardedSplit:
        """One split, read (and checked) with the same shard-aligned reader as the teacher cache."""
        if name not in self.root:
            raise CacheError(f"RDM cache {self.path} has no split '{name}'")
        return ShardedSplit(self.root[name], name, label=f"RDM cache {self.path}", fix=RDM_FIX,  # type: ignore[arg-type]
                            row_arrays=L.RDM_ROW_ARRAYS)


def open_rdm_cache(path: str | Path, teacher: TeacherCache, *, model_file: str | Path | None = None) -> RdmCache:
    """Open ``rdm.zarr`` and refuse it unless it was made from exactly ``teacher`` (and, when
    ``model_file`` is given, by exactly that RDM model file)."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise CacheError(f"no RDM cache at {path}; run `cifd rdm` (dvc repro rdm) or fix paths.rdm_cache")
    try:
        root = zarr.open_group(path, mode="r")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CacheError(f"RDM cache {path}: its metadata cannot be read ({type(exc).__name__}: {exc}). "
                         f"{RDM_FIX}") from exc
    attrs = dict(root.attrs)
    if attrs.get(L.ATTR_KIND) != L.RDM_KIND or attrs.get(L.ATTR_SCHEMA) != L.RDM_SCHEMA_VERSION:
        raise CacheError(f"{path} is not an RDM cache of schema {L.RDM_SCHEMA_VERSION} "
                         f"(kind {attrs.get(L.ATTR_KIND)!r}, schema {attrs.get(L.ATTR_SCHEMA)!r}): rebuild it "
                         "(`cifd rdm`)")
    rdm_attrs = attrs.get(L.ATTR_RDM)
    if not isinstance(rdm_attrs, dict) or rdm_fingerprint(str(attrs.get(L.ATTR_TEACHER_CACHE)), rdm_attrs) != attrs.get(
            L.ATTR_FINGERPRINT):
        raise CacheError(f"RDM cache {path}: its attributes do not hash to its recorded fingerprint: they were "
                         f"edited after it was written. {RDM_FIX}")
    if not attrs.get(L.ATTR_COMPLETE):
        raise CacheError(f"RDM cache {path} is incomplete; rerun `cifd rdm`")
    found = attrs.get(L.ATTR_TEACHER_CACHE)
    if found != teacher.fingerprint:
        raise CacheError(
            f"RDM cache {path} was made from teacher cache {str(found)[:16]}…, but the teacher cache at "
            f"{teacher.path} is {teacher.fingerprint[:16]}…. Rerun `cifd rdm` on this teacher cache, or "
            "point paths.cache at the cache the RDMs were trained on."
        )
    splits = [name for name in teacher.splits if name in root]
    if splits != teacher.splits:
        raise CacheError(f"RDM cache {path} has splits {splits}, its teacher cache {teacher.splits}. {RDM_FIX}")
    check_layout(root, splits, L.RDM_ROW_ARRAYS, label=f"RDM cache {path}", fix=RDM_FIX)
    for name in splits:
        rows = root[name][L.RDM_X_HAT].shape[0]  # type: ignore[index,union-attr]
        if rows != teacher.split(name).num_rows:
            raise CacheError(f"RDM cache {path} split {name} has {rows} rows, teacher cache has "
                             f"{teacher.split(name).num_rows}; rerun `cifd rdm`")
        done = np.asarray(root[name][L.DONE][:])  # type: ignore[index]
        if not done.all():
            raise CacheError(f"RDM cache {path} split {name}: shards {np.flatnonzero(done == 0).tolist()} are not "
                             f"written although the store says complete. {RDM_FIX}")
    cache = RdmCache(path, root)
    _ = cache.head  # read and checked here, before any compute
    if model_file is not None:
        model_sha = file_sha256(model_file) if Path(model_file).is_file() else "absent"
        if model_sha != cache.checkpoint_sha256:
            raise CacheError(f"RDM cache {path} holds the outputs of the RDM model file with sha256 "
                             f"{cache.checkpoint_sha256[:16]}…, but {model_file} is {model_sha[:16]}…: the pair "
                             f"is out of step. {RDM_FIX}")
    return cache
