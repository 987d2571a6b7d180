"""``cifd distill --method M`` (stage three): a student from replayed views + cached targets."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.cache.embed import resolve_device
from pipeline.cache.rdm_store import open_rdm_cache
from pipeline.cache.reader import CacheExpectation, open_cache
from pipeline.data.shards import load_manifest, load_split
from pipeline.models import build_model, load_model, save_model, state_dict_sha256
from pipeline.train.distill import (
    DistillRun,
    EpochLog,
    Preprocess,
    Student,
    Targets,
    config_fingerprint,
    memory_batches,
    train_student,
    uses_features,
    uses_rdms,
)
from schemas import layout as L
from schemas.base import ConfigError
from schemas.config import DistillConfig, load_stage
from stages._io import write_csv


def _distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world, device) under torchrun; (0, 1, resolved device) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world == 1:
        return 0, 1, device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def run(params: Path, method: str) -> None:
    paths, cfg = load_stage(params, "distill", DistillConfig)
    if method not in cfg.methods:
        raise ConfigError(f"--method {method!r} is not in params 'distill.methods' = {list(cfg.methods)}")
    torch.set_num_threads(cfg.threads)
    rank, world, device = _distributed(cfg.device)
    teacher, spec = load_model(paths.teacher)
    manifest = load_manifest(paths.shards)
    cache = open_cache(paths.cache, CacheExpectation(teacher_sha256=state_dict_sha256(teacher),
                                                     manifest_sha256=manifest.sha256))
    del teacher  # stage three never runs the teacher: its outputs come from the cache
    pre = spec["preprocess"]
    preprocess = Preprocess(image_size=int(pre["image_size"]), mean=tuple(pre["mean"]), std=tuple(pre["std"]))
    train = cache.split("train").read_all((L.VIEWS, L.LABELS, L.LOGITS, L.EMBEDDINGS))
    rdm_logits = rdm_emb = None
    emb = train[L.EMBEDDINGS]
    scale = float(np.sqrt(np.mean(np.square(emb.astype(np.float32))))) or 1.0
    rdm_info = {}
    if uses_rdms(method):
        rdm = open_rdm_cache(paths.rdm_cache, cache)
        block = rdm.read_all("train")
        rdm_logits = torch.from_numpy(block[L.RDM_LOGITS]).to(device)
        rdm_emb = torch.from_numpy(block[L.RDM_X_HAT]).to(device) if uses_features(method) else None
        scale = float(rdm.attrs[L.ATTR_RDM]["embedding_scale"])
        rdm_info = {"rdm_cache": rdm.attrs[L.ATTR_RDM]["checkpoint_sha256"]}
    targets = Targets(
        views=torch.from_numpy(train[L.VIEWS]).to(device), labels=torch.from_numpy(train[L.LABELS]).to(device),
        teacher_logits=torch.from_numpy(train[L.LOGITS].astype(np.float32)).to(device),
        teacher_emb=torch.from_numpy(emb).to(device), rdm_logits=rdm_logits, rdm_emb=rdm_emb, emb_scale=scale,
    )
    images = load_split(manifest, "train")
    if not np.array_equal(images.labels, train[L.LABELS]):
        raise ConfigError("train shard labels differ from the cached labels row by row; rerun `cifd embed`")
    val_block = load_split(manifest, "val")
    val_cache = cache.split("val").read_all((L.LOGITS,))
    val = (torch.from_numpy(val_block.images).to(device), torch.from_numpy(val_block.labels).to(device),
           torch.from_numpy(val_cache[L.LOGITS][:, 0].astype(np.float32)).to(device))
    torch.manual_seed(cfg.seed)  # timm initialisers use the global generator
    backbone = build_model(cfg.student, num_classes=cache.split("train").num_classes,
                           in_chans=manifest.image_shape[0], model_kwargs=dict(cfg.student_kwargs))
    student = Student(backbone, teacher_dim=cache.split("train").embed_dim if uses_features(method) else None,
                      ibm=cfg.ibm and method == "cifd").to(device)
    if cfg.channels_last:
        student = student.to(memory_format=torch.channels_last)
    out_dir = Path(paths.students)
    run_ = DistillRun(method=method, cfg=cfg, preprocess=preprocess, device=device, rank=rank, world=world,
                      checkpoint=out_dir / f"{method}.ckpt",
                      fingerprint=config_fingerprint(cfg, method, {"cache": cache.fingerprint, **rdm_info}))
    batches = memory_batches(torch.from_numpy(images.images).to(device), cfg.batch_size, rank, world)
    bar = tqdm(total=cfg.epochs, desc=f"distill {method}", unit="epoch", disable=rank != 0, dynamic_ncols=True)
    began = time.perf_counter()

    def on_epoch(log: EpochLog) -> None:
        bar.n = log.epoch
        bar.set_postfix(loss=f"{log.train_loss:.3f}", val_top1=f"{log.val_top1:.4f}",
                        agree=f"{log.val_agreement:.4f}")
        bar.refresh()

    history = train_student(student, run=run_, targets=targets, batches=batches, num_rows=len(images.labels),
                            val=val, on_epoch=on_epoch)
    bar.close()
    if rank == 0:
        save_model(out_dir / f"{method}.pt", student.backbone.cpu().eval(), spec={
            "name": cfg.student, "num_classes": backbone.num_classes, "in_chans": manifest.image_shape[0],
            "model_kwargs": dict(cfg.student_kwargs), "preprocess": pre, "method": method,
            "teacher_cache_fingerprint": cache.fingerprint, "epochs": cfg.epochs,
        })
        write_csv(Path(paths.plots) / "distill" / f"{method}.csv",
                  [{"epoch": h.epoch, "train_loss": round(h.train_loss, 5), "val_top1": round(h.val_top1, 5),
                    "val_agreement": round(h.val_agreement, 5)} for h in history])
        last = history[-1]
        print(f"distill {method}: val top-1 {last.val_top1:.4f}, agreement {last.val_agreement:.4f} "
              f"after {cfg.epochs} epochs ({time.perf_counter() - began:.1f}s)")
    if world > 1:
        dist.destroy_process_group()
