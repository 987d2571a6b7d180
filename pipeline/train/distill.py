"""Stage three's loop: distill a student from replayed views + cached teacher/RDM targets.

Each epoch every image gets one of its V cached views, drawn from a seeded generator; the
view's exact crop and flip are replayed on the device (``pipeline.data.views``), and the
targets are the cached teacher (and RDM) outputs of that very view. Images come either
from device memory (CIFAR-sized data) or streamed from the WebDataset shards
(``pipeline.train.stream``); both join to the cache by the global row index.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.data.views import render_views
from pipeline.losses import cifd_loss, comparative_kd, dgkd_loss, hinton_kd, kd_dropout_mask
from pipeline.models import ImageClassifier
from pipeline.rd import InformationBottleneck
from schemas.config import DistillConfig


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
class Preprocess:
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class EpochLog:
    epoch: int
    train_loss: float
    val_top1: float
    val_agreement: float


@torch.inference_mode()
def evaluate_student(model: nn.Module, images: Tensor, labels: Tensor, teacher_logits: Tensor, *,
                     preprocess: Preprocess, batch_size: int, channels_last: bool) -> dict[str, float]:
    """Top-1, top-1 agreement with the teacher and KL(teacher ‖ student) at τ=1, on clean views."""
    from pipeline.data.views import clean_views

    was = model.training
    model.eval()
    _, _, h, w = images.shape
    correct = agree = kl = 0.0
    for start in range(0, len(images), batch_size):
        sl = slice(start, start + batch_size)
        x = render_views(images[sl], clean_views(len(images[sl]), h, w), out_size=preprocess.image_size,
                         mean=preprocess.mean, std=preprocess.std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x).logits.float() if isinstance(model, Student) else model(x).float()
        t = teacher_logits[sl].float()
        correct += float((logits.argmax(-1) == labels[sl]).sum())
        agree += float((logits.argmax(-1) == t.argmax(-1)).sum())
        kl += float(F.kl_div(logits.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum"))
    model.train(was)
    n = max(len(images), 1)
    return {"top1": correct / n, "agreement": agree / n, "kl": kl / n}


def config_fingerprint(cfg: DistillConfig, method: str, extra: dict[str, Any]) -> str:
    """What decides a run's result: a checkpoint resumes only under the same fingerprint."""
    data = {"cfg": cfg.to_dict(), "method": method, **extra}
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


BatchSource = Callable[[int, Tensor, Tensor], Iterator[tuple[Tensor, Tensor, Tensor]]]
"""(epoch, permutation, view choice) → iterator of (rows, views, uint8 images) on device."""


def memory_batches(images: Tensor, batch_size: int, rank: int, world: int) -> BatchSource:
    """Batches from device-resident uint8 images: no host work in the loop."""

    def source(epoch: int, order: Tensor, choice: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        mine = order[rank::world].to(images.device, non_blocking=True)
        steps = len(mine) // batch_size if world > 1 else math.ceil(len(mine) / batch_size)
        choice = choice.to(images.device, non_blocking=True)
        for step in range(steps):
            rows = mine[step * batch_size:(step + 1) * batch_size]
            yield rows, choice[rows], images[rows]

    return source


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
    """Train ``student`` for ``cfg.epochs`` epochs, checkpointing (atomically) after each
    one and resuming from ``run.checkpoint`` when it holds a run with the same fingerprint."""
    cfg, device = run.cfg, run.device
    generator = torch.Generator().manual_seed(cfg.seed)
    noise = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    model: nn.Module = student
    if run.world > 1:
        model = nn.parallel.DistributedDataParallel(student)
    opt: torch.optim.Optimizer
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True,
                              weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_rank = num_rows // run.world if run.world > 1 else num_rows
    steps = max(1, per_rank // cfg.batch_size if run.world > 1 else math.ceil(per_rank / cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps, pct_start=0.15)
    history: list[EpochLog] = []
    start_epoch = 0
    if run.checkpoint is not None and run.checkpoint.is_file():
        state = torch.load(run.checkpoint, map_location=device, weights_only=False)
        if state.get("fingerprint") == run.fingerprint:
            student.load_state_dict(state["student"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            generator.set_state(state["generator"])
            noise.set_state(state["noise"].to(noise.get_state().device) if device.type != "cpu" else state["noise"])
            history = [EpochLog(**h) for h in state["history"]]
            start_epoch = state["epoch"]
    use_amp = cfg.amp and device.type == "cuda"
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext())
    val_images, val_labels, val_teacher = val
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        order = torch.randperm(num_rows, generator=generator)
        choice = torch.randint(targets.num_views, (num_rows,), generator=generator)
        total = torch.zeros((), device=device)
        count = 0
        for rows, views, images in batches(epoch, order, choice):
            x = render_views(images, targets.views[rows, views], out_size=run.preprocess.image_size,
                             mean=run.preprocess.mean, std=run.preprocess.std)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            batch = gather_targets(targets, rows, views)
            with autocast:
                out = model(x, generator=noise)
            loss = method_loss(run.method, out=out, batch=batch, cfg=cfg, emb_scale=targets.emb_scale,
                               generator=generator, device=device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach() * len(rows)
            count += len(rows)
        metrics = evaluate_student(student, val_images, val_labels, val_teacher, preprocess=run.preprocess,
                                   batch_size=4 * cfg.batch_size, channels_last=cfg.channels_last)
        log = EpochLog(epoch=epoch + 1, train_loss=float(total) / max(count, 1), val_top1=metrics["top1"],
                       val_agreement=metrics["agreement"])
        history.append(log)
        if run.checkpoint is not None and run.rank == 0:
            _save_atomic({"fingerprint": run.fingerprint, "epoch": epoch + 1, "student": student.state_dict(),
                          "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                          "generator": generator.get_state(), "noise": noise.get_state(),
                          "history": [vars(h) for h in history]}, run.checkpoint)
        if run.world > 1:
            dist.barrier()
        if on_epoch is not None:
            on_epoch(log)
    return history
