"""``cifd distill --method M`` (stage three): a student from replayed views + cached targets.

Runs in one process, or under ``torchrun --nproc_per_node N`` (DDP: NCCL on GPUs, gloo on
CPU); rank 0 writes the outputs. ``distill.data`` picks the image source: ``memory`` (the
decoded train split on the device) or ``stream`` (the WebDataset shards, decoded by
``distill.loader_workers`` processes).
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.cache.join import CleanViewJoin, cached_chunks
from pipeline.cache.rdm_store import open_rdm_cache
from pipeline.cache.reader import CacheExpectation, check_alignment, open_cache
from pipeline.cache.store import CacheError
from pipeline.data.held import held_images
from pipeline.data.preprocess import Preprocess, PreprocessError, resolve_preprocess
from pipeline.data.shards import Manifest, load_manifest, load_split
from pipeline.evaluate import ValSet, ValSource
from pipeline.models import build_model, load_model, save_model, state_dict_sha256
from pipeline.runtime import resolve_device
from pipeline.train.batches import BatchSource, MemoryBatches
from pipeline.train.checkpoint import config_fingerprint, resumable_seconds, student_fingerprint
from pipeline.train.distill import (
    DistillRun,
    EpochLog,
    LoopSettings,
    train_student,
)
from pipeline.train.objective import LossWeights
from pipeline.train.stream import StreamBatches
from pipeline.train.student import Student, uses_features, uses_rdms
from pipeline.train.targets import TargetInfo, Targets, load_targets, target_fields, target_info
from schemas import metrics as M
from schemas.base import ConfigError
from schemas.config import DistillConfig, Paths, TeacherConfig, load_stage
from stages._io import write_csv, write_json


class DistillResult(NamedTuple):
    student: Student  # the trained student, on the training device (every rank)
    history: list[EpochLog]


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


def loss_weights(cfg: DistillConfig) -> LossWeights:
    """The loss's record of weights, from the stage config."""
    return LossWeights(temperature=cfg.temperature, kd_alpha=cfg.kd_alpha, ce_weight=cfg.ce_weight,
                       kl_weight=cfg.kl_weight, rdm_weights=cfg.rdm_weights, feature_weight=cfg.feature_weight,
                       rate_weight=cfg.rate_weight, kd_dropout=cfg.kd_dropout, distortion=cfg.distortion,
                       ckd_weight=cfg.ckd_weight, feature_warmup=cfg.feature_warmup,
                       feature_norm=cfg.feature_norm)


def loop_settings(cfg: DistillConfig) -> LoopSettings:
    """The loop's settings, from the stage config."""
    return LoopSettings(epochs=cfg.epochs, seed=cfg.seed, optim=cfg.optim, amp=cfg.amp,
                        channels_last=cfg.channels_last, eval_batch_size=cfg.eval_batch_size, views=cfg.views)


def train_rows(num_rows: int, fraction: float, seed: int) -> torch.Tensor | None:
    """The seeded subset of the train rows a student trains on (``distill.rows_fraction``),
    ascending; None for every row. The same seed gives every method the same rows."""
    if fraction >= 1.0:
        return None
    keep = max(1, int(round(num_rows * fraction)))
    return torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))[:keep].sort().values


def teacher_forwards(cfg: DistillConfig, info: TargetInfo, rows: torch.Tensor | None, method: str) -> int:
    """The teacher forwards behind the targets a student learns from: rows × views drawn (0
    for ``ce``, which learns from the labels alone)."""
    if method == "ce":
        return 0
    return (info.num_rows if rows is None else len(rows)) * (info.num_views if cfg.views is None else len(cfg.views))


def student_preprocess(cfg: DistillConfig, backbone: torch.nn.Module, *, teacher: Preprocess,
                       in_chans: int) -> Preprocess:
    """The student's input: the teacher's when ``distill.preprocess`` is null; else its fields,
    the rest from the student's timm pretrained config, else from the teacher's."""
    if cfg.preprocess is None:
        return teacher
    try:
        return resolve_preprocess(cfg.preprocess.to_dict(), backbone, in_chans=in_chans, fallback=teacher.to_spec(),
                                  section="distill.preprocess")[0]
    except PreprocessError as exc:
        raise ConfigError(str(exc)) from exc


def run(params: Path, method: str) -> DistillResult:
    began = time.perf_counter()  # end to end from the cache: loading, training, per-epoch val, saving
    paths, cfg = load_stage(params, "distill", DistillConfig)
    if method not in cfg.methods:
        raise ConfigError(f"--method {method!r} is not in params 'distill.methods' = {list(cfg.methods)}")
    cfg = cfg.for_method(method)  # its own settings (distill.per_method), if any
    teacher_model = load_stage(params, "teacher", TeacherConfig)[1].model  # the entrypoint trusted for paths.teacher
    torch.set_num_threads(cfg.threads)
    rank, world, device = _distributed(cfg.device)
    try:
        return _distill(paths, cfg, method, rank=rank, world=world, device=device, teacher_model=teacher_model,
                        began=began)
    finally:
        if world > 1:
            dist.destroy_process_group()


@dataclass
class DistillInputs:
    """Everything :func:`~pipeline.train.distill.train_student` needs, checked and on the device."""

    student: Student
    run: DistillRun
    info: TargetInfo
    targets: Targets | None  # memory mode: every row's targets on the device; stream mode: None
    batches: BatchSource
    val: ValSource  # memory mode: the val split held on the device; stream mode: read shard by shard
    manifest: Manifest
    teacher_spec: dict[str, Any]
    cache_fingerprint: str


def build_inputs(paths: Paths, cfg: DistillConfig, method: str, *, rank: int = 0, world: int = 1,
                 device: torch.device | None = None, teacher_model: str | None = None,
                 started: float | None = None) -> DistillInputs:
    """Open and check the cache (and RDM cache) against the teacher and shards, then build
    the targets (memory mode) or their shape (stream mode: the loader reads them block by
    block), the batch source (``cfg.data``), the val set and the initialised student.

    ``teacher_model``: the user's ``teacher.model`` param, the one entrypoint outside timm and
    ``pipeline.models`` the teacher file may name. ``started``: ``time.perf_counter()`` when the
    stage began (the run's wall seconds count from there)."""
    cfg = cfg.for_method(method)  # idempotent: run() has applied it already
    device = device if device is not None else resolve_device(cfg.device)
    teacher, spec = load_model(paths.teacher, allow_entrypoint=teacher_model)
    manifest = load_manifest(paths.shards)
    cache = open_cache(paths.cache, CacheExpectation(teacher_sha256=state_dict_sha256(teacher),
                                                     manifest_sha256=manifest.sha256))
    del teacher  # stage three never runs the teacher: its outputs come from the cache
    check_alignment(cache, manifest)
    teacher_preprocess = Preprocess.from_spec(spec, source=str(paths.teacher))
    rdm = None
    rdm_info = {}
    if uses_rdms(method):
        rdm = open_rdm_cache(paths.rdm_cache, cache, model_file=paths.rdm_models)
        if cfg.rdm_weights is not None and len(cfg.rdm_weights) != rdm.num_rdms:
            raise ConfigError(f"distill.rdm_weights has {len(cfg.rdm_weights)} values but the RDM cache "
                              f"{paths.rdm_cache} holds {rdm.num_rdms} RDMs; give one weight per RDM, or null")
        rdm_info = {"rdm_cache": rdm.checkpoint_sha256}
    torch.manual_seed(cfg.seed)  # timm initialisers use the global generator: the same init on every rank
    train_split = cache.split("train")
    backbone = build_model(cfg.student, num_classes=train_split.num_classes,
                           in_chans=manifest.channels, model_kwargs=dict(cfg.student_kwargs))
    preprocess = student_preprocess(cfg, backbone, teacher=teacher_preprocess, in_chans=manifest.channels)
    batches: BatchSource
    targets: Targets | None = None
    if cfg.data == "stream":  # targets are read block by block and labels checked as they stream
        info = target_info(cache, rdm, method=method)
        batches = StreamBatches(manifest, "train", teacher=cache.split("train"),
                                rdm=rdm.split("train") if rdm is not None else None,
                                fields=target_fields(method, cache.logits_format, mixed=cache.mixup is not None),
                                preprocess=preprocess,
                                batch_size=cfg.batch_size, workers=cfg.loader_workers, device=device,
                                rank=rank, world=world, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
                                rdm_head=rdm.head if rdm is not None else None)
    else:
        targets = load_targets(cache, rdm, method=method, device=device)
        info = targets.info
        labels = targets.labels.cpu().numpy()
        block = load_split(manifest, "train")
        if not np.array_equal(block.labels, labels):
            row = int(np.flatnonzero(block.labels != labels)[0])
            raise CacheError(f"cache and shards disagree at row {row}: label {int(block.labels[row])} in the "
                             f"shards, {int(labels[row])} in the cache; rerun `cifd embed`")
        batches = MemoryBatches(held_images(block, manifest, device), targets, preprocess=preprocess,
                                batch_size=cfg.batch_size, rank=rank, world=world,
                                rows=train_rows(info.num_rows, cfg.rows_fraction, cfg.rows_seed))
    if cfg.views is not None and max(cfg.views) >= info.num_views:
        raise ConfigError(f"distill.views = {list(cfg.views)}: the cache {paths.cache} holds {info.num_views} views "
                          f"per row (indices 0..{info.num_views - 1}); list views it holds, or null for all")
    if batches.steps < 1:
        raise ConfigError(f"distill.batch_size = {cfg.batch_size} leaves no full batch per rank "
                          f"({info.num_rows} rows, {world} ranks, data: {cfg.data}); lower it")
    val: ValSource
    if cfg.data == "stream":  # validated one shard at a time: memory does not grow with the val split
        val = cached_chunks(manifest, cache, "val", device)
    else:
        val_block = load_split(manifest, "val")  # held on the device, joined to the cache as one chunk
        views, teacher_logits = CleanViewJoin(cache.split("val"), device, expected_rows=len(val_block.labels))(
            0, len(val_block.labels), val_block.labels)
        val = ValSet(images=held_images(val_block, manifest, device), views=views,
                     labels=torch.from_numpy(val_block.labels).to(device), teacher_logits=teacher_logits)
    student = Student(backbone, teacher_dim=train_split.embed_dim if uses_features(method) else None,
                      ibm=cfg.ibm and method == "cifd", ibm_init_scale=cfg.ibm_init_scale,
                      ibm_noise_scale=cfg.ibm_noise_scale).to(device)
    if cfg.channels_last:
        student = student.to(memory_format=torch.channels_last)
    run_ = DistillRun(method=method, loop=loop_settings(cfg), weights=loss_weights(cfg), preprocess=preprocess,
                      device=device, rank=rank, world=world, started=started,
                      checkpoint=Path(paths.checkpoints) / f"{method}.safetensors",
                      # The schedule and each rank's rows depend on the world size and steps per epoch.
                      fingerprint=config_fingerprint(cfg.to_dict(), method, {"cache": cache.fingerprint, **rdm_info,
                                                                             "world": world, "steps": batches.steps,
                                                                             "student": student_fingerprint(cfg.student)}))
    return DistillInputs(student=student, run=run_, info=info, targets=targets, batches=batches, val=val, manifest=manifest,
                         teacher_spec=spec, cache_fingerprint=cache.fingerprint)


def _distill(paths: Paths, cfg: DistillConfig, method: str, *, rank: int, world: int, device: torch.device,
             teacher_model: str, began: float) -> DistillResult:
    inputs = build_inputs(paths, cfg, method, rank=rank, world=world, device=device, teacher_model=teacher_model,
                          started=began)
    # A resumed run reports its whole wall time: the pieces before the checkpoint plus this one.
    previous = resumable_seconds(inputs.run.checkpoint, inputs.run.fingerprint)
    student = inputs.student
    bar = tqdm(total=cfg.epochs, desc=f"distill {method}", unit="epoch", disable=rank != 0, dynamic_ncols=True)

    def on_epoch(log: EpochLog) -> None:
        bar.n = log.epoch
        bar.set_postfix(loss=f"{log.train_loss:.3f}", val_top1=f"{log.val_top1:.4f}",
                        agree=f"{log.val_agreement:.4f}")
        bar.refresh()

    history = train_student(student, run=inputs.run, info=inputs.info, batches=inputs.batches,
                            val=inputs.val, on_epoch=on_epoch)
    bar.close()
    if rank == 0:
        out_dir = Path(paths.students)
        backbone = student.backbone
        save_model(out_dir / f"{method}.safetensors", copy.deepcopy(backbone).cpu().eval(), spec={
            "name": cfg.student, "num_classes": backbone.num_classes, "in_chans": inputs.manifest.channels,
            "model_kwargs": dict(cfg.student_kwargs), "preprocess": inputs.run.preprocess.to_spec(),
            "method": method, "teacher_cache_fingerprint": inputs.cache_fingerprint, "epochs": cfg.epochs,
        })
        write_csv(Path(paths.plots) / "distill" / f"{method}.csv",
                  [{"epoch": h.epoch, "train_loss": round(h.train_loss, 5), "val_top1": round(h.val_top1, 5),
                    "val_agreement": round(h.val_agreement, 5)} for h in history])
        last = history[-1]
        seconds = previous + time.perf_counter() - began
        write_json(Path(paths.metrics) / M.DISTILL_DIR / f"{method}.json", {
            M.VAL_TOP1: round(last.val_top1, 5), M.EVAL_AGREEMENT: round(last.val_agreement, 5),
            M.EPOCHS: cfg.epochs, M.SECONDS: round(seconds, 2), M.DEVICE: device.type, M.WORLD: world,
            M.THREADS: torch.get_num_threads(),
            M.TEACHER_FORWARDS: teacher_forwards(cfg, inputs.info, inputs.batches.rows, method),
        })
        print(f"distill {method}: val top-1 {last.val_top1:.4f}, agreement {last.val_agreement:.4f} "
              f"after {cfg.epochs} epochs ({seconds:.1f}s, {world} rank(s), data: {cfg.data})")
    if world > 1:
        dist.barrier()  # outputs are written before any rank leaves
    return DistillResult(student, history)
