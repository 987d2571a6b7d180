"""``cifd cache info`` and ``cifd cache verify``: describe a teacher cache, and check it
against the live teacher on a random subset of (sample, view) pairs."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache.embed import teacher_outputs
from pipeline.cache.reader import CacheExpectation, open_cache
from pipeline.data.preprocess import Preprocess
from pipeline.data.shards import load_manifest, read_shard
from pipeline.evaluate import agreement_hits
from pipeline.models import load_model, state_dict_sha256
from schemas import layout as L


def _stored_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")


def cache_info(path: str | Path) -> dict[str, Any]:
    """Teacher, N, V, D, C, dtypes, bytes per sample per view and compression ratio."""
    cache = open_cache(path)
    prov = cache.provenance
    splits = {}
    raw_total, stored_total = 0, 0
    for name in cache.splits:
        split = cache.split(name)
        raw = sum(
            math.prod(split.group[a].shape) * split.group[a].dtype.itemsize for a in L.ROW_ARRAYS
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
        }
    return {
        "path": str(cache.path),
        "teacher": prov["teacher"]["model"],
        "teacher_state_dict_sha256": prov["teacher"]["state_dict_sha256"],
        "dataset_manifest_sha256": prov["dataset"]["manifest_sha256"],
        "classes": prov["dataset"]["classes"],
        "dtypes": prov["dtypes"],
        "views": prov["views"],
        "preprocess": prov["preprocess"],
        "classifier_check": prov["classifier_check"],
        "splits": splits,
        "compression_ratio": round(raw_total / max(stored_total, 1), 3),
        "fingerprint": cache.fingerprint,
    }


@dataclass(frozen=True)
class VerifyReport:
    samples: int
    embedding_max_abs_err: float
    logits_max_abs_err: float
    embedding_rel_err: float  # max abs error / max |cached value|
    logits_rel_err: float
    embedding_min_cosine: float
    top1_agreement: float
    tolerance: float
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify_cache(
    path: str | Path,
    *,
    teacher: str | Path,
    shards: str | Path,
    samples: int,
    seed: int,
    tolerance: float,
    split: str = "train",
    device: str = "cpu",
) -> VerifyReport:
    """Re-run the live teacher on ``samples`` random (row, view) pairs of ``split``.

    Refuses a teacher or shards that are not the ones the cache names (by hash). ``ok`` when
    the max abs error of embeddings and of logits, relative to the largest cached magnitude,
    is within ``tolerance`` and top-1 agrees on at least 99% of checked pairs. Embeddings are stored in
    float16 (relative rounding ~5e-4), so a tolerance of 1e-2 leaves room for float16 and
    for CPU/GPU kernel differences while catching a wrong or drifted teacher.
    """
    model, spec = load_model(str(teacher))
    manifest = load_manifest(shards)
    cache = open_cache(path, CacheExpectation(teacher_sha256=state_dict_sha256(model),
                                              manifest_sha256=manifest.sha256))
    model = model.to(device).eval()
    part = cache.split(split)
    rng = np.random.default_rng(seed)
    count = min(samples, part.num_rows * part.num_views)
    flat = np.sort(rng.choice(part.num_rows * part.num_views, size=count, replace=False))
    rows, views = flat // part.num_views, flat % part.num_views
    entry = manifest.split(split)
    channels = manifest.image_shape[0]
    preprocess = Preprocess.from_spec(spec, source=str(teacher))
    emb_err, log_err, min_cos, agree = 0.0, 0.0, 1.0, 0
    emb_scale, log_scale = 1e-12, 1e-12
    for shard in entry["shards"]:
        a, b = shard["start"], shard["stop"]
        sel = (rows >= a) & (rows < b)
        if not sel.any():
            continue
        block = read_shard(manifest.root / shard["file"], channels=channels, start=a, stop=b)
        cached = part.read(a, b, (L.EMBEDDINGS, L.LOGITS, L.VIEWS))
        r, v = rows[sel] - a, views[sel]
        params = torch.from_numpy(cached[L.VIEWS][r, v])[:, None]  # (k, 1, 5)
        images = torch.from_numpy(block.images[r]).to(device)
        emb, logits = teacher_outputs(model, images, params, preprocess=preprocess, batch_size=256)
        emb, logits = emb[:, 0].cpu(), logits[:, 0].cpu()
        c_emb = torch.from_numpy(cached[L.EMBEDDINGS][r, v].astype(np.float32))
        c_log = torch.from_numpy(cached[L.LOGITS][r, v].astype(np.float32))
        emb_scale = max(emb_scale, float(c_emb.abs().max()))
        log_scale = max(log_scale, float(c_log.abs().max()))
        emb_err = max(emb_err, float((emb - c_emb).abs().max()))
        log_err = max(log_err, float((logits - c_log).abs().max()))
        cos = torch.nn.functional.cosine_similarity(emb, c_emb, dim=-1, eps=1e-12)
        min_cos = min(min_cos, float(cos.min()))
        agree += int(agreement_hits(logits, c_log).sum())
    agreement = agree / max(count, 1)
    emb_rel, log_rel = emb_err / emb_scale, log_err / log_scale
    ok = emb_rel <= tolerance and log_rel <= tolerance and agreement >= 0.99
    return VerifyReport(samples=count, embedding_max_abs_err=emb_err, logits_max_abs_err=log_err,
                        embedding_rel_err=emb_rel, logits_rel_err=log_rel,
                        embedding_min_cosine=min_cos, top1_agreement=agreement, tolerance=tolerance, ok=ok)
