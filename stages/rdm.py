"""``cifd rdm`` (stage two): train the RDMs on the teacher cache alone, then cache their
outputs for every (row, view) in ``rdm.zarr``. No images, no teacher backbone."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.cache.rdm_store import cache_bank_outputs
from pipeline.cache.reader import CacheExpectation, open_cache
from pipeline.data.shards import load_manifest
from pipeline.evaluate import top1
from pipeline.models import file_sha256, load_model, state_dict_sha256
from pipeline.rd import RDMBank
from pipeline.runtime import resolve_device
from pipeline.train.rdm import (
    RdmEpochLog,
    RdmTrainSettings,
    embedding_set,
    evaluate_bank,
    train_bank,
)
from report.plots import plot_rate_accuracy
from schemas import layout as L
from schemas import metrics as M
from schemas.config import RdmConfig, load_stage
from stages._io import write_csv, write_json


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
    train_split, val_split = cache.split("train"), cache.split("val")
    n, v, d, c = train_split.num_rows, train_split.num_views, train_split.embed_dim, train_split.num_classes
    train_set = embedding_set(train_split, views=slice(None), device=device)  # every view of every train image
    val_set = embedding_set(val_split, views=slice(0, 1), device=device)  # the clean view
    scale = max(train_split.rms(L.EMBEDDINGS), 1e-12) if cfg.scale_embeddings else 1.0
    settings = RdmTrainSettings(
        rate_weights=cfg.rate_weights, ce_weight=cfg.ce_weight, kl_weight=cfg.kl_weight,
        temperature=cfg.temperature, distortion=cfg.distortion, epochs=cfg.epochs, batch_size=cfg.batch_size,
        eval_batch_size=cfg.eval_batch_size, lr=cfg.lr, pct_start=cfg.pct_start,
        density_lr_factor=cfg.density_lr_factor, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    bank = RDMBank(num_rdms=len(cfg.rate_weights), in_dim=d, hidden=cfg.hidden, num_classes=c,
                   init_scale=cfg.init_scale, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    bar = tqdm(total=cfg.epochs, desc=f"rdm ×{len(cfg.rate_weights)}", unit="epoch", dynamic_ncols=True)

    def on_epoch(log: RdmEpochLog) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{log.loss:.3f}", bits=[round(b, 1) for b in log.val.rate_bits],
                        top1=[round(t, 3) for t in log.val.top1])

    train_bank(bank, train=train_set, val=val_set, cfg=settings, scale=scale, on_epoch=on_epoch)
    bar.close()
    train_seconds = time.perf_counter() - began
    result = evaluate_bank(bank, val_set, scale=scale, batch_size=cfg.eval_batch_size)

    Path(paths.rdm_models).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": cfg.to_dict(), "scale": scale, "in_dim": d, "num_classes": c,
                "teacher_cache_fingerprint": cache.fingerprint, "state_dict": bank.cpu().state_dict()},
               paths.rdm_models)
    bank.to(device)
    attrs = {"rate_weights": list(cfg.rate_weights), "config": cfg.to_dict(), "embedding_scale": scale,
             "checkpoint_sha256": file_sha256(paths.rdm_models)}
    cache_bank_outputs(bank, teacher=cache, path=Path(paths.rdm_cache), scale=scale,
                       attrs=attrs, batch_size=cfg.eval_batch_size)

    rows = []
    metrics = {}
    for i, r in enumerate(cfg.rate_weights):
        entry = {M.RDM_RATE_WEIGHT: r, M.RDM_RATE_BITS: round(result.rate_bits[i], 3),
                 M.RDM_DISTORTION: round(result.distortion[i], 5), M.RDM_VAL_TOP1: round(result.top1[i], 5),
                 M.RDM_AGREEMENT: round(result.teacher_agreement[i], 5)}
        metrics[f"rdm_{i}"] = entry
        rows.append(entry)
    teacher_val = top1(val_set.logits, val_set.labels)
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
