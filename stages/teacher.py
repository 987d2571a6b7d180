"""``cifd teacher``: build the teacher, optionally fine-tune it, evaluate, freeze it."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline.data.preprocess import PreprocessError, resolve_preprocess
from pipeline.data.held import held_images
from pipeline.data.shards import load_manifest, load_split
from pipeline.evaluate import ShardChunks, ValSet, ValSource, evaluate_classifier, sizes_of
from pipeline.models import build_model, file_sha256, save_model
from pipeline.runtime import resolve_device
from pipeline.train.supervised import (
    EpochLog,
    HeldLabelled,
    LabelledSource,
    LabelledStream,
    TrainSettings,
    train_classifier,
)
from schemas import metrics as M
from schemas.base import ConfigError
from schemas.config import FALLBACK_PREPROCESS, TeacherConfig, load_stage
from stages._io import write_csv, write_json


def run(params: Path) -> None:
    paths, cfg = load_stage(params, "teacher", TeacherConfig)
    manifest = load_manifest(paths.shards)
    if manifest.channels != cfg.in_chans:
        raise ConfigError(
            f"params 'teacher.in_chans' = {cfg.in_chans}: the shards hold {manifest.channels}-channel images "
            f"(prepare mode {manifest.mode}); set teacher.in_chans: {manifest.channels} and give "
            f"teacher.preprocess.mean/std {manifest.channels} values"
        )
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)  # timm initialisers draw from the global generator
    model = build_model(cfg.model, num_classes=len(manifest.classes), in_chans=cfg.in_chans,
                        weights=cfg.weights, model_kwargs=dict(cfg.model_kwargs)).to(device)
    try:
        preprocess, origin = resolve_preprocess(cfg.preprocess.to_dict(), model, in_chans=cfg.in_chans,
                                                fallback=FALLBACK_PREPROCESS, section="teacher.preprocess")
    except PreprocessError as exc:
        raise ConfigError(str(exc)) from exc
    print(f"teacher preprocess: {preprocess.to_spec()} (from {', '.join(f'{k}: {v}' for k, v in origin.items())})")
    curve: list[dict[str, float]] = []

    def on_epoch(log: EpochLog) -> None:
        curve.append({"epoch": log.epoch, "train_loss": round(log.train_loss, 5), "val_top1": round(log.val_top1, 5)})
        print(f"teacher epoch {log.epoch}/{cfg.epochs}: loss {log.train_loss:.4f} val top-1 {log.val_top1:.4f}")

    began = time.perf_counter()
    if cfg.epochs > 0:
        settings = TrainSettings(
            epochs=cfg.epochs, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size, optim=cfg.optim,
            label_smoothing=cfg.label_smoothing, augment=cfg.augment, preprocess=preprocess, seed=cfg.seed,
        )
        batches: LabelledSource
        val: ValSource
        if cfg.data == "stream":  # a few samples per loader worker, one val shard at a time
            batches = LabelledStream(manifest, "train", preprocess=preprocess, batch_size=cfg.batch_size,
                                     workers=cfg.loader_workers, device=device, seed=cfg.seed,
                                     shuffle_buffer=cfg.shuffle_buffer)
            sizes, val = torch.from_numpy(manifest.sizes("train")), ShardChunks(manifest, "val", device)
        else:  # both splits decoded and held (a device batch when same-size)
            train, held_val = load_split(manifest, "train"), load_split(manifest, "val")
            images = held_images(train, manifest, device)
            batches = HeldLabelled(images, torch.from_numpy(train.labels).to(device), preprocess=preprocess,
                                   batch_size=cfg.batch_size)
            sizes = sizes_of(images)
            val = ValSet(images=held_images(held_val, manifest, device), views=None,
                         labels=torch.from_numpy(held_val.labels).to(device), teacher_logits=None)
            del train, held_val
        train_classifier(model, batches=batches, sizes=sizes, val=val, settings=settings, on_epoch=on_epoch)
        del batches, val
    # Scored one shard at a time on the model's own clean views: memory does not grow with the split.
    val_top1, train_top1 = (evaluate_classifier(model, ShardChunks(manifest, split, device), preprocess=preprocess,
                                                batch_size=cfg.eval_batch_size).top1 for split in ("val", "train"))
    spec = {
        "name": cfg.model, "num_classes": len(manifest.classes), "in_chans": cfg.in_chans,
        "model_kwargs": dict(cfg.model_kwargs), "preprocess": preprocess.to_spec(), "preprocess_origin": origin,
        "source_weights_sha256": file_sha256(cfg.weights) if cfg.weights else None,
        "fine_tune_epochs": cfg.epochs, "classes": manifest.classes, "dataset_manifest_sha256": manifest.sha256,
    }
    sha = save_model(paths.teacher, model.cpu().eval(), spec=spec)
    write_json(Path(paths.metrics) / M.TEACHER, {M.VAL_TOP1: round(val_top1, 5), M.TRAIN_TOP1: round(train_top1, 5),
                                                 M.EPOCHS: cfg.epochs,
                                                 M.SECONDS: round(time.perf_counter() - began, 1)})
    write_csv(Path(paths.plots) / M.TEACHER_CURVE, curve)
    print(f"teacher: val top-1 {val_top1:.4f} (train {train_top1:.4f}) after {cfg.epochs} epochs "
          f"in {time.perf_counter() - began:.1f}s; weights sha256 {sha[:12]} → {paths.teacher}")
