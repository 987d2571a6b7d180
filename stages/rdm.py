"""``cifd rdm`` (stage two): train the RDMs on the teacher cache alone, then cache their
outputs for every (row, view) in ``rdm.zarr``. No images, no teacher backbone.

Training and validation read the teacher cache a few Zarr shards at a time (``stream``,
:class:`pipeline.train.rdm.CachePairs`), or hold it all on the device (``memory``); the
outputs are written one shard at a time, so memory does not grow with the cache.

The RDM store's writer lock is held from the start (a second ``cifd rdm`` is refused at
once); the model file (safetensors + JSON) and the store are swapped in together at the end.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.cache.rdm_store import RdmWriter, rdm_writer
from pipeline.cache.reader import CacheExpectation, open_cache
from pipeline.data.shards import load_manifest
from pipeline.models import load_model, state_dict_sha256
from pipeline.train.student import uses_rdms
from pipeline.rd import RDMBank
from pipeline.runtime import resolve_device
from pipeline.train.rdm import (
    RdmEpochLog,
    RdmTrainSettings,
    evaluate_bank,
    pair_source,
    train_bank,
)
from report.plots import plot_rate_accuracy
from schemas import layout as L
from schemas import metrics as M
from schemas.config import METHODS, Paths, RdmConfig, load_stage, trusted_teacher_entrypoint
from stages._io import write_csv, write_json


def _expectation(teacher: Path, shards: Path, allow_entrypoint: str) -> CacheExpectation:
    """Check the cache against the teacher and shards in this workspace, where present
    (an imported cache may come without them)."""
    teacher_sha = (state_dict_sha256(load_model(str(teacher), allow_entrypoint=allow_entrypoint)[0])
                   if teacher.is_file() else None)
    manifest_sha = load_manifest(shards).sha256 if (shards / L.MANIFEST_NAME).is_file() else None
    return CacheExpectation(teacher_sha256=teacher_sha, manifest_sha256=manifest_sha)


def run(params: Path) -> None:
    paths, cfg = load_stage(params, "rdm", RdmConfig)
    allow = trusted_teacher_entrypoint(params)
    with rdm_writer(paths.rdm_cache, paths.rdm_models) as writer:
        _train_and_publish(paths, cfg, writer, allow)


def _train_and_publish(paths: Paths, cfg: RdmConfig, writer: RdmWriter, allow_entrypoint: str) -> None:
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    cache = open_cache(paths.cache, _expectation(Path(paths.teacher), Path(paths.shards), allow_entrypoint))
    began = time.perf_counter()
    train_split, val_split = cache.split("train"), cache.split("val")
    n, v, d, c = train_split.num_rows, train_split.num_views, train_split.embed_dim, train_split.num_classes
    # Every view of every image, but mixed ones (embed.mixup: the last views): an RDM learns the
    # teacher's embeddings of images, and its CE term has no single label for a mix. The RDM
    # cache still holds its outputs on every view, mixed ones included.
    mixed = int(cache.mixup["views"]) if cache.mixup else 0
    train_set = pair_source(train_split, views=slice(0, v - mixed), device=device, data=cfg.data,
                            hold_blocks=cfg.shuffle_blocks)
    val_set = pair_source(val_split, views=slice(0, 1), device=device, data=cfg.data,  # the clean view
                          hold_blocks=cfg.shuffle_blocks)
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

    document = {"format": "cifd-rdm-bank", "config": cfg.to_dict(), "scale": scale, "in_dim": d, "num_classes": c,
                "teacher_cache_fingerprint": cache.fingerprint}
    attrs = {"rate_weights": list(cfg.rate_weights), "config": cfg.to_dict(), "embedding_scale": scale}
    # One uses/distill-<method>.json per method: DVC reruns a student only if it reads the RDMs.
    readers = {f"distill-{m}": uses_rdms(m) for m in METHODS}
    writer.publish(bank, teacher=cache, document=document, attrs=attrs, scale=scale, batch_size=cfg.eval_batch_size,
                   readers=readers)

    rows = []
    metrics = {}
    for i, r in enumerate(cfg.rate_weights):
        entry = {M.RDM_RATE_WEIGHT: r, M.RDM_RATE_BITS: round(result.rate_bits[i], 3),
                 M.RDM_DISTORTION: round(result.distortion[i], 5), M.RDM_VAL_TOP1: round(result.top1[i], 5),
                 M.RDM_AGREEMENT: round(result.teacher_agreement[i], 5)}
        metrics[f"rdm_{i}"] = entry
        rows.append(entry)
    teacher_val = result.teacher_top1
    metrics["teacher_val_top1"] = round(teacher_val, 5)
    metrics[M.SECONDS] = round(train_seconds, 2)  # training and per-epoch validation
    write_json(Path(paths.metrics) / M.RDM, metrics)
    write_csv(Path(paths.plots) / M.RDM_CURVE, sorted(rows, key=lambda e: e[M.RDM_RATE_BITS]))
    plot_rate_accuracy(rows, teacher_top1=teacher_val, path=Path(paths.plots) / M.RDM_PLOT)
    print(f"rdm: {len(cfg.rate_weights)} RDMs on {n}×{v} cached embeddings (D={d}) in {train_seconds:.1f}s; "
          f"embedding RMS {scale:.3f}")
    for i, entry in enumerate(rows):
        print(f"  RDM {i}: R={entry[M.RDM_RATE_WEIGHT]:g} rate {entry[M.RDM_RATE_BITS]:.1f} bits "
              f"distortion {entry[M.RDM_DISTORTION]:.4f} val top-1 {entry[M.RDM_VAL_TOP1]:.4f} "
              f"agreement {entry[M.RDM_AGREEMENT]:.4f} (teacher {teacher_val:.4f})")
