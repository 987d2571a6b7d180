"""Stage three's loop: distill a student from replayed views + cached teacher/RDM targets.

Each epoch every image gets one of its V cached views, drawn from a seeded generator; the
view's exact box and flip are rendered by the batch source (``pipeline.data.preprocess``), and
the targets are the cached teacher (and RDM) outputs of that very view
(``pipeline.train.targets``). Images come from a :class:`~pipeline.train.batches.BatchSource`
(device memory or streamed shards); both join to the cache by the global row index.

Under DDP (``world > 1``) every rank runs the same number of steps per epoch (a batch
source announces it as ``steps``), draws the same permutation and view choice (a host
generator seeded alike on every rank), the same KD-dropout masks and comparative pairs (a
generator on the training device, reseeded by ``(seed, epoch)`` each epoch, so drawing them
never syncs the host), its own IBM noise (seeded by ``(seed, epoch, rank)``), and the BatchNorm running statistics are averaged over ranks at
the end of each epoch, so every rank ends an epoch with identical weights and buffers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline.data.preprocess import Preprocess
from pipeline.evaluate import ValSource, evaluate_classifier
from pipeline.runtime import derived_seed
from pipeline.train.batches import BatchSource
from pipeline.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from pipeline.train.objective import LossWeights, feature_ramp, method_loss, rdm_weight_tensor
from pipeline.train.optim import clip_gradients, make_optimizer, make_scheduler
from pipeline.train.student import Student, uses_rdms
from pipeline.train.targets import TargetInfo
from schemas.config import OptimConfig

log = logging.getLogger(__name__)

__all__ = ["DistillRun", "EpochLog", "LoopSettings", "StepInfo", "TrainingDiverged", "train_student"]


DRAWS_STREAM = 2**32 + 1  # third part of the KD-dropout generator's seed: never a rank (IBM noise)


class TrainingDiverged(RuntimeError):
    """The training loss became inf/nan: nothing after the last finite epoch is saved."""


@dataclass(frozen=True)
class EpochLog:
    epoch: int
    train_loss: float
    val_top1: float
    val_agreement: float
    val_kl: float = math.nan  # KL(teacher ‖ student) at τ = 1, nats per image (checkpoints before it: NaN)

    def record(self) -> dict[str, float | None]:
        """JSON-able, for a checkpoint's document (finite numbers only: NaN / inf become None)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in vars(self).items()}

    @classmethod
    def from_record(cls, record: dict[str, float | None]) -> EpochLog:
        return cls(**{k: (math.nan if v is None else v) for k, v in record.items()})


class StepInfo(NamedTuple):
    """What a per-step hook sees (after ``optimizer.step()``); tensors stay on the device."""

    epoch: int
    step: int
    rows: Tensor  # (B,) global row indices of the batch
    loss: Tensor  # scalar, detached


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs of the stage config."""

    epochs: int
    seed: int
    optim: OptimConfig
    amp: bool  # bf16 autocast on CUDA
    channels_last: bool
    eval_batch_size: int
    views: tuple[int, ...] | None = None  # the cached views drawn from (None: all)


@dataclass
class DistillRun:
    """Inputs of one distillation run."""

    method: str
    loop: LoopSettings
    weights: LossWeights
    preprocess: Preprocess
    device: torch.device
    fingerprint: str
    checkpoint: Path | None
    rank: int = 0
    world: int = 1
    # time.perf_counter() when the run's process began (the stage's start): a checkpoint records
    # the seconds since then plus those of the pieces it resumes. None: when training begins.
    started: float | None = None


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
    info: TargetInfo,
    batches: BatchSource,
    val: ValSource,
    on_epoch: Callable[[EpochLog], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
) -> list[EpochLog]:
    """Train ``student`` for ``run.loop.epochs`` epochs, checkpointing (atomically, rank 0)
    after each one and resuming from ``run.checkpoint`` when it holds a run with the same
    fingerprint (another fingerprint: a fresh start). ``on_epoch`` runs on every rank after
    the checkpoint is written; ``on_step`` after every optimizer step (benchmarks and
    profilers hook in here; it must not sync the device unless it means to). An unreadable or
    edited checkpoint is a `ModelFileError`, never a silent fresh start."""
    started = run.started if run.started is not None else time.perf_counter()
    loop, device = run.loop, run.device
    num_rows = info.num_rows
    pool = batches.rows  # the rows trained on (None: all); views are drawn for every row, by global index
    allowed = None if loop.views is None else torch.tensor(loop.views, dtype=torch.int64)
    if allowed is not None and int(allowed.max()) >= info.num_views:
        raise ValueError(f"views {list(loop.views or ())} asked for, but the cache holds {info.num_views} per row")
    if batches.steps < 1:
        raise ValueError(f"the batch source yields no batch per epoch ({num_rows} rows, {run.world} rank(s)); "
                         "lower distill.batch_size")
    generator = torch.Generator().manual_seed(loop.seed)  # order, views: alike on all ranks
    draws = torch.Generator(device=device)  # KD-dropout masks, comparative pairs: reseeded per epoch
    noise = torch.Generator(device=device)  # IBM noise: reseeded per (epoch, rank)
    model: nn.Module = student
    if run.world > 1:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    opt = make_optimizer(student.parameters(), loop.optim)
    steps = batches.steps
    sched = make_scheduler(opt, loop.optim, total_steps=loop.epochs * steps)
    # λ_n only for the methods that learn from the RDMs (ce/kd ignore distill.rdm_weights).
    rdm_weights = (rdm_weight_tensor(run.weights, info.num_rdms, device) if uses_rdms(run.method)
                   else torch.zeros(0, device=device))
    history: list[EpochLog] = []
    start_epoch = 0
    previous_seconds = 0.0  # spent by the runs this one resumes, up to their last checkpoint
    if run.checkpoint is not None and run.checkpoint.is_file():
        state = load_checkpoint(run.checkpoint)
        if state.fingerprint == run.fingerprint:
            student.load_state_dict(state.student)
            opt.load_state_dict(state.optimizer)
            sched.load_state_dict(state.scheduler)
            generator.set_state(state.generator)
            history = [EpochLog.from_record(h) for h in state.history]
            start_epoch = state.epoch
            previous_seconds = state.seconds
            log.info("resuming %s from %s after epoch %d", run.method, run.checkpoint, start_epoch)
        else:
            log.info("ignoring checkpoint %s: it holds another run (other config, cache or method)",
                     run.checkpoint)
    use_amp = loop.amp and device.type == "cuda"
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext())
    for epoch in range(start_epoch, loop.epochs):
        model.train()
        order = (torch.randperm(num_rows, generator=generator) if pool is None
                 else pool[torch.randperm(len(pool), generator=generator)])
        choice = (torch.randint(info.num_views, (num_rows,), generator=generator) if allowed is None
                  else allowed[torch.randint(len(allowed), (num_rows,), generator=generator)])
        noise.manual_seed(derived_seed(loop.seed, epoch, run.rank))
        draws.manual_seed(derived_seed(loop.seed, epoch, DRAWS_STREAM))
        total = torch.zeros((), device=device)
        count = torch.zeros((), device=device)
        done = 0
        for rows, _views, x, batch in batches(epoch, order, choice):
            if loop.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                out = model(x, generator=noise)
            loss = method_loss(run.method, out=out, batch=batch, weights=run.weights, rdm_weights=rdm_weights,
                               emb_scale=info.emb_scale, generator=draws,
                               ramp=feature_ramp(run.weights, epoch * steps + done, loop.epochs * steps))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(model.parameters(), loop.optim)
            opt.step()
            sched.step()
            total += loss.detach() * len(rows)
            count += len(rows)
            if on_step is not None:
                on_step(StepInfo(epoch=epoch, step=done, rows=rows, loss=loss.detach()))
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
                f"the student diverged. Lower distill.optim.lr (now {loop.optim.lr:g}) or "
                f"distill.feature_weight (now {run.weights.feature_weight:g}), or set distill.optim.grad_clip "
                f"(now {loop.optim.grad_clip}); the checkpoint keeps epoch {epoch} and a changed config restarts")
        scores = evaluate_classifier(student.backbone, val, preprocess=run.preprocess,
                                     batch_size=loop.eval_batch_size, channels_last=loop.channels_last)
        epoch_log = EpochLog(epoch=epoch + 1, train_loss=float(total) / max(float(count), 1.0),
                             val_top1=scores.top1, val_agreement=scores.agreement, val_kl=scores.kl)
        history.append(epoch_log)
        if run.checkpoint is not None and run.rank == 0:
            save_checkpoint(run.checkpoint, Checkpoint(
                fingerprint=run.fingerprint, epoch=epoch + 1, seconds=previous_seconds + time.perf_counter() - started,
                student=student.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                generator=generator.get_state(), history=[h.record() for h in history]))
        if run.world > 1:
            dist.barrier()
        if on_epoch is not None:
            on_epoch(epoch_log)
    return history
