"""``cifd rdm`` (stage two): train the RDMs on the teacher cache alone, then cache their
outputs for every (row, view) in ``rdm.zarr``. No images, no teacher backbone."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.cache.rdm_store import cache_bank_outputs
from pipeline.cache.reader import CacheExpectation, open_cache
from pipeline.data.shards import load_manifest
from pipeline.models import file_sha256, load_model, state_dict_sha256
from pipeline.rd import RDMBank
from pipeline.train.common import resolve_device
from pipeline.train.rdm import (
    EmbeddingSet,
    RdmEpochLog,
    embedding_scale,
    evaluate_bank,
    train_bank,
)
from schemas import layout as L
from schemas import metrics as M
from schemas.config import RdmConfig, load_stage
from stages._io import write_csv, write_json
from stages.plots import plot_rate_accuracy


def _expectation(teacher: Path, shards: Path) -> CacheExpectation:
    """Check the cache against the teacher and shards in this workspace, where present
    (an imported cache may come without them)."""
    teacher_sha = state_dict_sha256(load_model(str(teacher))[0]) if teacher.is_file() else None
    manifest_sha = load_manifest(shards).sha256 if (shards / L.MANIFEST_NAME).is_file() else None
    return CacheExpectation(teacher_sha256=teacher_sha, manifest_sha256=manifest_sha)


def run(params: Path) -> None:
    paths, cfg = load_stage(params, "rdm", RdmConfig)
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    cache = open_cache(paths.cache, _expectation(Path(paths.teacher), Path(paths.shards)))
    began = time.perf_counter()
    train = cache.split("train").read_all((L.EMBEDDINGS, L.LOGITS, L.LABELS))
    val = cache.split("val").read_all((L.EMBEDDINGS, L.LOGITS, L.LABELS))
    n, v, d = train[L.EMBEDDINGS].shape
    c = train[L.LOGITS].shape[-1]

    def flat(block: dict[str, np.ndarray], views: slice) -> EmbeddingSet:
        emb = torch.from_numpy(block[L.EMBEDDINGS][:, views].astype(np.float32))
        k = emb.shape[1]
        return EmbeddingSet(
            embeddings=emb.reshape(-1, d).to(device),
            logits=torch.from_numpy(block[L.LOGITS][:, views].astype(np.float32)).reshape(-1, c).to(device),
            labels=torch.from_numpy(np.repeat(block[L.LABELS], k)).to(device),
        )

    train_set = flat(train, slice(None))  # every view of every train image
    val_set = flat(val, slice(0, 1))  # the clean view
    scale = embedding_scale(train_set.embeddings) if cfg.scale_embeddings else 1.0
    torch.manual_seed(cfg.seed)
    bank = RDMBank(num_rdms=len(cfg.rate_weights), in_dim=d, hidden=cfg.hidden, num_classes=c,
                   init_scale=cfg.init_scale, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    bar = tqdm(total=cfg.epochs, desc=f"rdm ×{len(cfg.rate_weights)}", unit="epoch", dynamic_ncols=True)

    def on_epoch(log: RdmEpochLog) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{log.loss:.3f}", bits=[round(b, 1) for b in log.val.rate_bits],
                        top1=[round(t, 3) for t in log.val.top1])

    train_bank(bank, train=train_set, val=val_set, cfg=cfg, scale=scale, on_epoch=on_epoch)
    bar.close()
    train_seconds = time.perf_counter() - began
    result = evaluate_bank(bank, val_set, scale=scale, batch_size=4 * cfg.batch_size)

    Path(paths.rdm_models).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": cfg.to_dict(), "scale": scale, "in_dim": d, "num_classes": c,
                "teacher_cache_fingerprint": cache.fingerprint, "state_dict": bank.cpu().state_dict()},
               paths.rdm_models)
    bank.to(device)
    attrs = {"rate_weights": list(cfg.rate_weights), "config": cfg.to_dict(), "embedding_scale": scale,
             "checkpoint_sha256": file_sha256(paths.rdm_models)}
    cache_bank_outputs(bank, teacher=cache, path=Path(paths.rdm_cache), scale=scale,
                       attrs=attrs, batch_size=4 * cfg.batch_size)

    rows = []
    metrics = {}
    for i, r in enumerate(cfg.rate_weights):
        entry = {M.RDM_RATE_WEIGHT: r, M.RDM_RATE_BITS: round(result.rate_bits[i], 3),
                 M.RDM_DISTORTION: round(result.distortion[i], 5), M.RDM_VAL_TOP1: round(result.top1[i], 5),
                 M.RDM_AGREEMENT: round(result.teacher_agreement[i], 5)}
        metrics[f"rdm_{i}"] = entry
        rows.append(entry)
    teacher_val = float((val_set.logits.argmax(-1) == val_set.labels).float().mean())
    metrics["teacher_val_top1"] = round(teacher_val, 5)
    write_json(Path(paths.metrics) / M.RDM, metrics)
    write_csv(Path(paths.plots) / M.RDM_CURVE, sorted(rows, key=lambda e: e[M.RDM_RATE_BITS]))
    plot_rate_accuracy(rows, teacher_top1=teacher_val, path=Path(paths.plots) / M.RDM_PLOT)
    print(f"rdm: {len(cfg.rate_weights)} RDMs on {n}×{v} cached embeddings (D={d}) in {train_seconds:.1f}s; "
          f"embedding RMS {scale:.3f}")
    for i, entry in enumerate(rows):
        print(f"  RDM {i}: R={entry[M.RDM_RATE_WEIGHT]:g} rate {entry[M.RDM_RATE_BITS]:.1f} bits "
              f"distortion {entry[M.RDM_DISTORTION]:.4f} val top-1 {entry[M.RDM_VAL_TOP1]:.4f} "
              f"agreement {entry[M.RDM_AGREEMENT]:.4f} (teacher {teacher_val:.4f})")
