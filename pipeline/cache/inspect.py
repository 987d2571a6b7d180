"""``cifd cache info`` and ``cifd cache verify``: describe a teacher cache, and check it
against the live teacher on a random subset of (sample, view) pairs of every split; with
``full``, also every stored value of every shard (crc32c, fill, finiteness, content sha256)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache.embed import teacher_outputs
from pipeline.cache.logits import bytes_per_view
from pipeline.cache.reader import CacheExpectation, CacheSplit, open_cache
from pipeline.cache.store import CacheCorruptError
from pipeline.data.preprocess import Preprocess
from pipeline.data.shards import load_manifest, read_shard
from pipeline.evaluate import agreement_hits
from pipeline.models import load_model, state_dict_sha256
from schemas import layout as L


def _stored_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")


# The k of the top-k line of ``cache info`` for a cache that keeps all classes.
INFO_TOPK = 5


def cache_info(path: str | Path, *, topk: int | None = None) -> dict[str, Any]:
    """Teacher, N, V, D, C, dtypes, the logits choice, bytes per sample per view (uncompressed
    for every logits choice, from D, C, V and k; on disk for this cache, per array) and the
    compression ratio. ``topk``: k of the top-k line (default: the cache's, else 5). Also
    where it was made (``origin``: repository, revision, dataset source and prepare params,
    versions; None for a cache made before it was recorded), and the whole ``provenance``."""
    cache = open_cache(path)
    prov = cache.provenance
    fmt = cache.logits_format
    k = topk or fmt.topk or INFO_TOPK
    splits = {}
    raw_total, stored_total = 0, 0
    for name in cache.splits:
        split = cache.split(name)
        raw = sum(
            math.prod(split.group[a].shape) * split.group[a].dtype.itemsize for a in split.row_arrays
        )
        stored = _stored_bytes(cache.path / name)
        raw_total += raw
        stored_total += stored
        pairs = max(split.num_rows * split.num_views, 1)
        splits[name] = {
            "N": split.num_rows, "V": split.num_views, "D": split.embed_dim, "C": split.num_classes,
            "shards": len(split.shard_bounds),
            "bytes_per_sample_view_raw": round(raw / pairs, 1),
            "bytes_per_sample_view_stored": round(stored / pairs, 1),
            "stored_bytes_per_sample_view_by_array": {
                a: round(_stored_bytes(cache.path / name / a) / pairs, 2) for a in split.row_arrays},
            "bytes_per_sample_view_by_choice": bytes_per_view(
                embed_dim=split.embed_dim, num_classes=split.num_classes, num_views=max(split.num_views, 1), topk=k),
        }
    return {
        "path": str(cache.path),
        "teacher": prov["teacher"]["model"],
        "teacher_state_dict_sha256": prov["teacher"]["state_dict_sha256"],
        "dataset_manifest_sha256": prov["dataset"]["manifest_sha256"],
        "classes": prov["dataset"]["classes"],
        "dtypes": prov["dtypes"],
        "logits": {"kind": fmt.kind, "dtype": fmt.dtype, "topk": fmt.topk,
                   "head_bytes": (_stored_bytes(cache.path / L.HEAD_WEIGHT) + _stored_bytes(cache.path / L.HEAD_BIAS)
                                  if fmt.kind == "from_head" else 0)},
        "views": prov["views"],
        "preprocess": prov["preprocess"],
        "preprocess_origin": prov.get("preprocess_origin", {}),
        "images": {"mode": prov["dataset"].get("mode"), "shape": prov["dataset"].get("image_shape")},
        "classifier_check": prov["classifier_check"],
        "splits": splits,
        "compression_ratio": round(raw_total / max(stored_total, 1), 3),
        "fingerprint": cache.fingerprint,
        "library_versions": prov["teacher"].get("library_versions", {}),
        "origin": prov.get("origin"),
        "provenance": prov,
    }


@dataclass(frozen=True)
class SplitCheck:
    """The live teacher against the cache on the sampled (row, view) pairs of one split."""

    samples: int
    embedding_max_abs_err: float
    logits_max_abs_err: float
    embedding_rel_err: float  # max abs error / max |cached value|
    logits_rel_err: float
    embedding_min_cosine: float
    top1_agreement: float


@dataclass(frozen=True)
class VerifyReport:
    seed: int
    tolerance: float
    full: bool
    shards_checked: int  # shards whose every stored value was read and checked
    shards_total: int
    splits: dict[str, SplitCheck]
    problems: list[str]  # every failed check, one line each
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _worst(current: float, value: float) -> float:
    """max() that lets NaN through as inf (Python's max drops a NaN in second place)."""
    return math.inf if not math.isfinite(value) else max(current, value)


def _compare_split(
    part: CacheSplit, *, split: str, model: torch.nn.Module, manifest: Any, preprocess: Preprocess,
    rng: np.random.Generator, samples: int, full: bool, device: str, problems: list[str],
) -> tuple[SplitCheck, int]:
    """Check the shards of ``split`` that hold sampled pairs (all of them with ``full``) and
    re-run the teacher on the sampled pairs; returns the comparison and the shards checked."""
    count = min(samples, part.num_rows * part.num_views)
    flat = np.sort(rng.choice(part.num_rows * part.num_views, size=count, replace=False))
    rows, views = flat // part.num_views, flat % part.num_views
    emb_err, log_err, min_cos, agree, compared = 0.0, 0.0, 1.0, 0, 0
    emb_scale, log_scale = 1e-12, 1e-12
    checked = 0
    for i, shard in enumerate(manifest.split(split)["shards"]):
        a, b = shard["start"], shard["stop"]
        sel = (rows >= a) & (rows < b)
        if not (full or sel.any()):
            continue
        try:
            cached = part.read_shard(i)
        except CacheCorruptError as exc:  # unreadable, missing or non-finite: nothing to compare
            problems.append(str(exc))
            continue
        checked += 1
        try:
            part.check_digest(i, cached)
        except CacheCorruptError as exc:  # readable but not what was written: still compared below
            problems.append(str(exc))
        if not sel.any():
            continue
        block = read_shard(manifest.root / shard["file"], mode=manifest.mode, start=a, stop=b)
        r, v = rows[sel] - a, views[sel]
        params = torch.from_numpy(cached[L.VIEWS][r, v])[:, None]  # (k, 1, 5)
        chosen = r.tolist()
        mix = None
        if L.MIX in cached:  # mixed views: each pair's partner image follows the k sampled images
            partner = cached[L.MIX_PARTNER][r, v] - a
            if partner.min(initial=0) < 0 or partner.max(initial=0) >= b - a:
                problems.append(f"{split} shard {i}: a mixed view's partner row lies outside its shard")
                continue
            chosen += partner.tolist()
            mix = (torch.arange(len(r), 2 * len(r))[:, None], torch.from_numpy(cached[L.MIX][r, v])[:, None])
        images: torch.Tensor | list[torch.Tensor] = [torch.from_numpy(block.images[k]) for k in chosen]
        if manifest.image_shape is not None:  # same size: one batch on the device, as embed renders it
            images = torch.stack(images).to(device)
        emb, logits = teacher_outputs(model, images, params, preprocess=preprocess, batch_size=256, mix=mix)
        emb, logits = emb[:, 0].cpu(), logits[:, 0].cpu()
        c_emb = torch.from_numpy(cached[L.EMBEDDINGS][r, v].astype(np.float32))
        fmt = part.logits_format  # the cache's logits as readers get them (from_head: head(float16 embedding))
        held = {f: torch.from_numpy(cached[f][r, v]) for f in fmt.fields}
        c_log, kept = fmt.dense(held), fmt.kept(held)
        if kept is not None:  # top-k: compare the kept classes only (the rest are a share of the tail mass)
            c_log, logits = c_log.gather(1, kept), logits.gather(1, kept)
        emb_scale = max(emb_scale, float(c_emb.abs().max()))
        log_scale = max(log_scale, float(c_log.abs().max()))
        emb_err = _worst(emb_err, float((emb - c_emb).abs().max()))
        log_err = _worst(log_err, float((logits - c_log).abs().max()))
        cos = torch.nn.functional.cosine_similarity(emb, c_emb, dim=-1, eps=1e-12)
        min_cos = -math.inf if not bool(torch.isfinite(cos).all()) else min(min_cos, float(cos.min()))
        agree += int(agreement_hits(logits, c_log).sum())
        compared += len(r)
    check = SplitCheck(samples=compared, embedding_max_abs_err=emb_err, logits_max_abs_err=log_err,
                       embedding_rel_err=emb_err / emb_scale, logits_rel_err=log_err / log_scale,
                       embedding_min_cosine=min_cos, top1_agreement=agree / max(compared, 1))
    return check, checked


def verify_cache(
    path: str | Path,
    *,
    teacher: str | Path,
    shards: str | Path,
    samples: int,
    seed: int,
    tolerance: float,
    full: bool = False,
    device: str = "cpu",
    allow_entrypoint: str | None = None,
) -> VerifyReport:
    """Re-run the live ``teacher`` (the user's file, never one the cache names) on
    ``samples`` random (row, view) pairs of each split, drawn from ``seed``.

    Refuses a teacher or shards that are not the ones the cache was made from (by hash).
    Every shard that holds a sampled pair (with ``full``: every shard) is read whole and
    checked: crc32c of each chunk, no fill value, no NaN / inf, content sha256 as recorded
    at write. ``ok`` when no check failed, the max abs errors of embeddings and logits,
    relative to the largest cached magnitude, are within ``tolerance`` and top-1 agrees on
    at least 99% of the pairs of each split. Embeddings are stored in float16 (relative
    rounding ~5e-4), so a tolerance of 1e-2 leaves room for float16 and for CPU/GPU kernel
    differences while catching a wrong or drifted teacher.
    """
    model, spec = load_model(str(teacher), allow_entrypoint=allow_entrypoint)
    manifest = load_manifest(shards)
    cache = open_cache(path, CacheExpectation(teacher_sha256=state_dict_sha256(model),
                                              manifest_sha256=manifest.sha256))
    model = model.to(device).eval()
    preprocess = Preprocess.from_spec(spec, source=str(teacher))
    rng = np.random.default_rng(seed)
    problems: list[str] = []
    splits: dict[str, SplitCheck] = {}
    checked = total = 0
    for split in cache.splits:
        part = cache.split(split)
        total += len(part.shard_bounds)
        check, n = _compare_split(part, split=split, model=model, manifest=manifest, preprocess=preprocess, rng=rng,
                                  samples=samples, full=full, device=device, problems=problems)
        checked += n
        splits[split] = check
        for what, value in (("embedding", check.embedding_rel_err), ("logits", check.logits_rel_err)):
            if not value <= tolerance:
                problems.append(f"split {split}: {what} error relative to the largest cached value is {value:.3g}, "
                                f"beyond the tolerance {tolerance:g}")
        if not check.top1_agreement >= 0.99:
            problems.append(f"split {split}: top-1 agreement with the live teacher is {check.top1_agreement:.4f} "
                            "(expected >= 0.99)")
    return VerifyReport(seed=seed, tolerance=tolerance, full=full, shards_checked=checked, shards_total=total,
                        splits=splits, problems=problems, ok=not problems)
