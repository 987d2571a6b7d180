"""Stage three's loop: distill a student from replayed views + cached teacher/RDM targets.

Each epoch every image gets one of its V cached views, drawn from a seeded generator; the
view's exact crop and flip are replayed on the device (``pipeline.data.views``), and the
targets are the cached teacher (and RDM) outputs of that very view. Images come either
from device memory (CIFAR-sized data, :func:`memory_batches`) or streamed from the
WebDataset shards (``pipeline.train.stream``); both join to the cache by the global row
index and draw the view of a row from the same ``choice`` tensor, so the two modes train
on the same (row, view) pairs, in a different order.

Under DDP (``world > 1``) every rank runs the same number of steps per epoch (a batch
source announces it as ``steps``), draws the same permutation, view choice and KD-dropout
masks (one generator seeded alike on every rank), its own IBM noise (seeded by
``(seed, epoch, rank)``), and the BatchNorm running statistics are averaged over ranks at
the end of each epoch, so every rank ends an epoch with identical weights and buffers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.cache.embed import Preprocess
from pipeline.data.views import clean_views, render_views
from pipeline.losses import (
    cifd_loss,
    comparative_kd,
    dgkd_loss,
    hinton_kd,
    kd_dropout_mask,
)
from pipeline.models import ImageClassifier
from pipeline.rd import InformationBottleneck
from pipeline.train.common import make_optimizer
from schemas.config import DistillConfig

log = logging.getLogger(__name__)

__all__ = [
    "BatchSource",
    "DistillRun",
    "EpochLog",
    "Preprocess",
    "Student",
    "Targets",
    "config_fingerprint",
    "evaluate_student",
    "memory_batches",
    "method_loss",
    "render_batch",
    "train_student",
]


@dataclass(frozen=True)
class Targets:
    """Cached per-(row, view) targets, row-aligned, on the training device."""

    views: Tensor  # (N, V, 5) float32
    labels: Tensor  # (N,) int64
    teacher_logits: Tensor  # (N, V, C) float32
    teacher_emb: Tensor  # (N, V, D) float16
    rdm_logits: Tensor | None  # (N, V, M, C) float32
    rdm_emb: Tensor | None  # (N, V, M, D) float16
    emb_scale: float  # embeddings are compared divided by this (the teacher embedding RMS)

    @property
    def num_views(self) -> int:
        return self.views.shape[1]

    @property
    def num_rdms(self) -> int:
        return 0 if self.rdm_logits is None else self.rdm_logits.shape[2]


class TrainingDiverged(RuntimeError):
    """The training loss became inf/nan: nothing after the last finite epoch is saved."""


class StudentOutput(NamedTuple):
    logits: Tensor  # (B, C)
    projected: Tensor | None  # (B, D) student embedding mapped to the teacher's dim
    bits: Tensor | None  # (B,) IBM rate


class Student(nn.Module):
    """A student backbone plus, for CIFD, the IBM (noise + rate) and a projection to D.

    In eval mode the IBM passes the embedding through unchanged, so the deployed student
    is the bare backbone.
    """

    def __init__(self, backbone: ImageClassifier, *, teacher_dim: int | None, ibm: bool) -> None:
        super().__init__()
        self.backbone = backbone
        dim = backbone.embed_dim
        self.ibm = InformationBottleneck(dim, out_dim=teacher_dim) if ibm and teacher_dim else None
        self.proj = nn.Linear(dim, teacher_dim) if teacher_dim and not ibm else None

    def forward(self, x: Tensor, *, generator: torch.Generator | None = None) -> StudentOutput:
        w = self.backbone.embed(x)
        if self.ibm is not None:
            out = self.ibm(w, generator=generator)
            return StudentOutput(self.backbone.classify(out.noisy), out.projected, out.bits)
        projected = self.proj(w) if self.proj is not None else None
        return StudentOutput(self.backbone.classify(w), projected, None)


def uses_features(method: str) -> bool:
    return method == "cifd"


def uses_rdms(method: str) -> bool:
    return method in ("dgkd", "cifd")


@dataclass(frozen=True)
class Batch:
    labels: Tensor
    teacher_logits: Tensor
    teacher_emb: Tensor
    rdm_logits: Tensor | None  # (M, B, C)
    rdm_emb: Tensor | None  # (M, B, D)


def gather_targets(targets: Targets, rows: Tensor, views: Tensor) -> Batch:
    """Targets of (row, view) pairs; ``rows``/``views`` (B,) on the targets' device."""
    rl = targets.rdm_logits[rows, views].transpose(0, 1) if targets.rdm_logits is not None else None
    re = targets.rdm_emb[rows, views].transpose(0, 1) if targets.rdm_emb is not None else None
    return Batch(labels=targets.labels[rows], teacher_logits=targets.teacher_logits[rows, views],
                 teacher_emb=targets.teacher_emb[rows, views], rdm_logits=rl, rdm_emb=re)


def method_loss(
    method: str, *, out: StudentOutput, batch: Batch, cfg: DistillConfig, emb_scale: float,
    generator: torch.Generator, device: torch.device,
) -> Tensor:
    """The training loss of ``method`` on one batch (a scalar, float32)."""
    logits = out.logits.float()
    if method == "ce":
        loss = F.cross_entropy(logits, batch.labels)
    elif method == "kd":
        loss = hinton_kd(student_logits=logits, teacher_logits=batch.teacher_logits, labels=batch.labels,
                         temperature=cfg.temperature, alpha=cfg.kd_alpha).total
    else:
        m = 0 if batch.rdm_logits is None else batch.rdm_logits.shape[0]
        weights = torch.tensor(cfg.rdm_weights if cfg.rdm_weights is not None else [1.0] * m,
                               dtype=torch.float32, device=device)
        if weights.shape[0] != m:
            raise ValueError(f"distill.rdm_weights has {weights.shape[0]} values but the RDM cache holds {m} RDMs")
        keep = kd_dropout_mask(num_targets=1 + m, rate=cfg.kd_dropout, generator=generator, device=device)
        rdm_logits = batch.rdm_logits if batch.rdm_logits is not None else logits.new_zeros(0, *logits.shape)
        if method == "dgkd":
            loss = dgkd_loss(student_logits=logits, labels=batch.labels, teacher_logits=batch.teacher_logits,
                             assistant_logits=rdm_logits, assistant_weights=weights, ce_weight=cfg.ce_weight,
                             kl_weight=cfg.kl_weight, temperature=cfg.temperature, keep=keep).total
        else:
            x = batch.teacher_emb.float() / emb_scale
            xr = batch.rdm_emb.float() / emb_scale if batch.rdm_emb is not None else x.new_zeros(0, *x.shape)
            assert out.projected is not None  # Student has a projection for cifd
            loss = cifd_loss(student_logits=logits, labels=batch.labels, teacher_logits=batch.teacher_logits,
                             rdm_logits=rdm_logits, student_embedding_proj=out.projected.float(),
                             teacher_embedding=x, rdm_embeddings=xr, student_bits=out.bits, rdm_weights=weights,
                             ce_weight=cfg.ce_weight, kl_weight=cfg.kl_weight, temperature=cfg.temperature,
                             feature_weight=cfg.feature_weight, rate_weight=cfg.rate_weight,
                             distortion=cfg.distortion, keep=keep).total
    if cfg.ckd_weight > 0:
        loss = loss + cfg.ckd_weight * comparative_kd(student_logits=logits, teacher_logits=batch.teacher_logits,
                                                      generator=generator)
    return loss


@dataclass(frozen=True)
class EpochLog:
    epoch: int
    train_loss: float
    val_top1: float
    val_agreement: float


def render_batch(images: Tensor, views: Tensor, *, preprocess: Preprocess, channels_last: bool) -> Tensor:
    """uint8 images (B, C, H, W) + their cached view parameters (B, 5) → student inputs.

    The same :func:`~pipeline.data.views.render_views` ``embed`` ran before the teacher, so
    the student sees exactly the pixels the teacher saw for that (row, view).
    """
    x = render_views(images, views, out_size=preprocess.image_size, mean=preprocess.mean, std=preprocess.std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.inference_mode()
def evaluate_student(model: nn.Module, images: Tensor, labels: Tensor, teacher_logits: Tensor, *,
                     preprocess: Preprocess, batch_size: int, channels_last: bool) -> dict[str, float]:
    """Top-1, top-1 agreement with the teacher and KL(teacher ‖ student) at τ=1, on clean views."""
    was = model.training
    model.eval()
    _, _, h, w = images.shape
    correct = agree = kl = 0.0
    for start in range(0, len(images), batch_size):
        sl = slice(start, start + batch_size)
        x = render_batch(images[sl], clean_views(len(images[sl]), h, w), preprocess=preprocess,
                         channels_last=channels_last)
        logits = model(x).logits.float() if isinstance(model, Student) else model(x).float()
        t = teacher_logits[sl].float()
        correct += float((logits.argmax(-1) == labels[sl]).sum())
        agree += float((logits.argmax(-1) == t.argmax(-1)).sum())
        kl += float(F.kl_div(logits.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum"))
    model.train(was)
    n = max(len(images), 1)
    return {"top1": correct / n, "agreement": agree / n, "kl": kl / n}


def code_fingerprint() -> str:
    """sha256 of the source of the modules that decide what a training step computes, so a
    checkpoint from before a code change (a loss, the IBM, the view replay) is not resumed."""
    import sys

    import pipeline.data.views
    import pipeline.losses
    import pipeline.rd.entropy
    import pipeline.rd.ibm
    import pipeline.train.common
    import pipeline.train.stream  # noqa: F401  (imported for its source file)

    names = ("pipeline.data.views", "pipeline.losses", "pipeline.rd.entropy", "pipeline.rd.ibm",
             "pipeline.train.common", "pipeline.train.stream", __name__)
    digest = hashlib.sha256()
    for name in names:
        digest.update(Path(sys.modules[name].__file__ or "").read_bytes())
    return digest.hexdigest()


def config_fingerprint(cfg: DistillConfig, method: str, extra: dict[str, Any]) -> str:
    """What decides a run's result: a checkpoint resumes only under the same fingerprint
    (the config, the method, the caches, the layout of ranks and the training code)."""
    data = {"cfg": cfg.to_dict(), "method": method, "code": code_fingerprint(), **extra}
    for volatile in ("device", "threads", "loader_workers", "methods"):
        data["cfg"].pop(volatile, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def derived_seed(*parts: int) -> int:
    """A 63-bit seed mixed from ``parts`` (e.g. ``(seed, epoch, rank)``), the same on any machine."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@dataclass
class DistillRun:
    """Inputs of one distillation run."""

    method: str
    cfg: DistillConfig
    preprocess: Preprocess
    device: torch.device
    fingerprint: str
    checkpoint: Path | None
    rank: int = 0
    world: int = 1


class BatchSource(Protocol):
    """``(epoch, permutation, view choice)`` → iterator of ``(rows, views, uint8 images)`` on
    the device; ``rows`` (B,) int64 global row indices, ``views`` (B,) the view index of each
    row (``choice[rows]``), images (B, C, H, W) uint8.

    ``steps`` is the number of batches every call yields: the same on every rank (DDP needs
    equal step counts, and the LR schedule is built from it).
    """

    steps: int

    def __call__(self, epoch: int, order: Tensor, choice: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]: ...


def steps_per_epoch(rows_per_rank: int, batch_size: int, world: int) -> int:
    """Single process: every row, the last batch partial. DDP: full batches only."""
    return rows_per_rank // batch_size if world > 1 else math.ceil(rows_per_rank / batch_size)


class MemoryBatches:
    """Batches from device-resident uint8 images (N, C, H, W): no host work in the loop.

    Rank ``r`` of ``world`` takes ``order[r::world]`` cut to ``N // world`` rows, so every
    rank has the same number of full batches.
    """

    def __init__(self, images: Tensor, batch_size: int, rank: int, world: int) -> None:
        self.images, self.batch_size, self.rank, self.world = images, batch_size, rank, world
        self.per_rank = len(images) // world if world > 1 else len(images)
        self.steps = steps_per_epoch(self.per_rank, batch_size, world)

    def __call__(self, epoch: int, order: Tensor, choice: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        device = self.images.device
        mine = order[self.rank::self.world][:self.per_rank].to(device, non_blocking=True)
        choice = choice.to(device, non_blocking=True)
        for step in range(self.steps):
            rows = mine[step * self.batch_size:(step + 1) * self.batch_size]
            yield rows, choice[rows], self.images[rows]


def memory_batches(images: Tensor, batch_size: int, rank: int, world: int) -> BatchSource:
    """A :class:`BatchSource` over device-resident images (see :class:`MemoryBatches`)."""
    return MemoryBatches(images, batch_size, rank, world)


def _average_buffers(module: nn.Module, world: int) -> None:
    """Mean of every floating buffer (BatchNorm running stats) over the ranks.

    DDP broadcasts rank 0's buffers before each forward, but each rank then updates them
    with its own batch, so they differ after the last step of an epoch.
    """
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(world)


def train_student(
    student: Student,
    *,
    run: DistillRun,
    targets: Targets,
    batches: BatchSource,
    num_rows: int,
    val: tuple[Tensor, Tensor, Tensor],
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> list[EpochLog]:
    """Train ``student`` for ``cfg.epochs`` epochs, checkpointing (atomically, rank 0) after
    each one and resuming from ``run.checkpoint`` when it holds a run with the same
    fingerprint (another fingerprint: a fresh start). ``on_epoch`` runs on every rank after
    the checkpoint is written."""
    cfg, device = run.cfg, run.device
    if batches.steps < 1:
        raise ValueError(f"the batch source yields no batch per epoch ({num_rows} rows, batch_size "
                         f"{cfg.batch_size}, {run.world} rank(s)); lower distill.batch_size")
    generator = torch.Generator().manual_seed(cfg.seed)  # order, views, KD dropout: alike on all ranks
    noise = torch.Generator(device=device)  # IBM noise: reseeded per (epoch, rank)
    model: nn.Module = student
    if run.world > 1:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    opt = make_optimizer(student.parameters(), name=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = batches.steps
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps, pct_start=0.15)
    history: list[EpochLog] = []
    start_epoch = 0
    if run.checkpoint is not None and run.checkpoint.is_file():
        state = torch.load(run.checkpoint, map_location="cpu", weights_only=False)
        if state.get("fingerprint") == run.fingerprint:
            student.load_state_dict(state["student"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            generator.set_state(state["generator"])
            history = [EpochLog(**h) for h in state["history"]]
            start_epoch = state["epoch"]
            log.info("resuming %s from %s after epoch %d", run.method, run.checkpoint, start_epoch)
        else:
            log.info("ignoring checkpoint %s: it holds another run (other config, cache or method)",
                     run.checkpoint)
    use_amp = cfg.amp and device.type == "cuda"
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext())
    val_images, val_labels, val_teacher = val
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        order = torch.randperm(num_rows, generator=generator)
        choice = torch.randint(targets.num_views, (num_rows,), generator=generator)
        noise.manual_seed(derived_seed(cfg.seed, epoch, run.rank))
        total = torch.zeros((), device=device)
        count = torch.zeros((), device=device)
        done = 0
        for rows, views, images in batches(epoch, order, choice):
            x = render_batch(images, targets.views[rows, views], preprocess=run.preprocess,
                             channels_last=cfg.channels_last)
            batch = gather_targets(targets, rows, views)
            with autocast:
                out = model(x, generator=noise)
            loss = method_loss(run.method, out=out, batch=batch, cfg=cfg, emb_scale=targets.emb_scale,
                               generator=generator, device=device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            total += loss.detach() * len(rows)
            count += len(rows)
            done += 1
        if done != steps:
            raise RuntimeError(f"the batch source yielded {done} batches in epoch {epoch + 1}, but announced "
                               f"{steps}; the data and the cache disagree on the number of rows")
        if run.world > 1:
            _average_buffers(student, run.world)
            sums = torch.stack([total, count])
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            total, count = sums[0], sums[1]
        if not torch.isfinite(total):  # checked once per epoch: a per-step check would sync the GPU
            raise TrainingDiverged(
                f"distill {run.method}: the training loss is not finite ({float(total)}) in epoch {epoch + 1}; "
                f"the student ({cfg.student}) diverged. Lower distill.lr (now {cfg.lr:g}) or "
                f"distill.feature_weight (now {cfg.feature_weight:g}), or set distill.grad_clip "
                f"(now {cfg.grad_clip}); the checkpoint keeps epoch {epoch} and a changed config restarts")
        metrics = evaluate_student(student, val_images, val_labels, val_teacher, preprocess=run.preprocess,
                                   batch_size=4 * cfg.batch_size, channels_last=cfg.channels_last)
        epoch_log = EpochLog(epoch=epoch + 1, train_loss=float(total) / max(float(count), 1.0),
                             val_top1=metrics["top1"], val_agreement=metrics["agreement"])
        history.append(epoch_log)
        if run.checkpoint is not None and run.rank == 0:
            _save_atomic({"fingerprint": run.fingerprint, "epoch": epoch + 1, "student": student.state_dict(),
                          "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                          "generator": generator.get_state(), "history": [vars(h) for h in history]},
                         run.checkpoint)
        if run.world > 1:
            dist.barrier()
        if on_epoch is not None:
            on_epoch(epoch_log)
    return history
