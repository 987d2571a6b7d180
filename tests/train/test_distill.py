"""Stage three on the tiny cache: one step per method (its loss against the method's formula,
computed here from the batch tensors), the stage config reaching the loss, comparative KD
inside the loop, resume, stream join, crop replay, and the checks that refuse a mismatched
cache before training."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import kd_reference as ref
from pipeline.cache.store import CacheError
from pipeline.data.preprocess import Preprocess, render_inputs
from pipeline.data.shards import load_split
from pipeline.train.batches import MemoryBatches
from pipeline.train.checkpoint import load_checkpoint
from pipeline.runtime import derived_seed
from pipeline.train.distill import DRAWS_STREAM, EpochLog, TrainingDiverged, train_student
from pipeline.train.objective import method_loss, rdm_weight_tensor
from pipeline.train.stream import StreamBatches
from pipeline.train.student import uses_rdms
from pipeline.train.targets import load_targets, target_fields, gather_targets
from schemas import layout as L
from schemas.config import DistillConfig, load_stage

CPU = torch.device("cpu")


def _inputs(project, where: Path, method: str, *, optim: dict | None = None, **distill):
    from stages.distill import build_inputs

    if optim is not None:
        distill["optim"] = {**project.base["distill"]["optim"], **optim}
    paths, cfg = load_stage(project.params(where, distill=distill), "distill", DistillConfig)
    return build_inputs(paths, cfg, method, device=CPU)


def _train(inputs, **kwargs) -> list[EpochLog]:
    return train_student(inputs.student, run=inputs.run, info=inputs.info, batches=inputs.batches,
                         val=inputs.val, **kwargs)


def _cached_labels(embedded_cache) -> np.ndarray:
    from pipeline.cache.reader import open_cache

    return open_cache(embedded_cache[0]).split("train").read_all((L.LABELS,))[L.LABELS]


def _boxes_and_preprocess(embedded_cache) -> tuple[torch.Tensor, Preprocess]:
    """The cached view boxes (N, V, 5) of the train split and the teacher's preprocessing."""
    from pipeline.cache.reader import open_cache

    cache = open_cache(embedded_cache[0])
    boxes = torch.from_numpy(cache.split("train").read_all((L.VIEWS,))[L.VIEWS])
    return boxes, Preprocess.from_spec(cache.provenance, source="cache")


def _stream(manifest, embedded_cache, teacher=None, method: str = "kd", **kwargs) -> StreamBatches:
    """A stream source over the session cache (``teacher``: another split object to read)."""
    from pipeline.cache.reader import open_cache

    _, pre = _boxes_and_preprocess(embedded_cache)
    settings = {"batch_size": 4, "workers": 0, "device": CPU, "rank": 0, "world": 1, "seed": 0, "shuffle_buffer": 1000,
                **kwargs}
    split = teacher if teacher is not None else open_cache(embedded_cache[0]).split("train")
    return StreamBatches(manifest, "train", teacher=split, rdm=None, fields=target_fields(method), preprocess=pre,
                         **settings)


def _memory_targets(embedded_cache):
    from pipeline.cache.reader import open_cache

    return load_targets(open_cache(embedded_cache[0]), None, method="kd", device=CPU)


def _epoch_pairs(source, choice: torch.Tensor, epoch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(choice), generator=torch.Generator().manual_seed(epoch))
    return list(source(epoch, order, choice))


# ----------------------------------------------------------------------------- methods


def _reference_loss(method: str, out, batch, *, temperature: float, kd_alpha: float, ce_weight: float,
                    kl_weight: float, lam: list[float], feature_weight: float, rate_weight: float,
                    scale: float) -> float:
    """DESIGN §2 on the batch tensors, every target kept (KD dropout 0), float64:
    ce: CE; kd: (1−α)·CE + α·τ²·KL(T‖S); dgkd: λ_CE·CE + λ_KL·τ²·[KL_T + Σ λ_n KL_n];
    cifd: dgkd + β·[mse(û, x/s) + Σ λ_n mse(û, x̂_n/s)] + λ_I·mean bits."""
    z, y = out.logits.detach(), batch.labels
    if method == "ce":
        return float(ref.ce(z, y))
    kl_t = ref.kl(batch.teacher_logits, z, temperature)
    if method == "kd":
        return float((1 - kd_alpha) * ref.ce(z, y) + kd_alpha * kl_t)
    kl = kl_t + sum(lam[n] * ref.kl(batch.rdm_logits[n], z, temperature) for n in range(len(lam)))
    total = ce_weight * ref.ce(z, y) + kl_weight * kl
    if method == "cifd":
        u = out.projected.detach()
        feat = ref.dist(u, batch.teacher_emb.double() / scale)
        feat = feat + sum(lam[n] * ref.dist(u, batch.rdm_emb[n].double() / scale) for n in range(len(lam)))
        total = total + feature_weight * feat + rate_weight * out.bits.detach().double().mean()
    return float(total)


# The loss weights given through params (none of them a default), so the expected values
# below hold only if the stage config reaches the loss. λ_n only for the methods with RDMs
# (see test_rdm_weights_in_params_do_not_break_the_methods_without_rdms).
WEIGHTS = {"temperature": 3.0, "kd_alpha": 0.6, "ce_weight": 0.8, "kl_weight": 1.5, "feature_weight": 20.0,
           "rate_weight": 0.01, "kd_dropout": 0.0}


def _first_batch(inputs):
    info, run = inputs.info, inputs.run
    choice = torch.randint(info.num_views, (info.num_rows,), generator=torch.Generator().manual_seed(0))
    rows, views, x, batch = _epoch_pairs(inputs.batches, choice)[0]
    if inputs.targets is not None:  # memory mode: the source's batch is the gather of the held targets
        expected = gather_targets(inputs.targets, rows, views)
        assert torch.equal(batch.teacher_logits, expected.teacher_logits)
    if run.loop.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return rows, x, batch


@pytest.mark.parametrize("method", ["ce", "kd", "dgkd", "cifd"])
def test_one_step_per_method(project, tmp_path: Path, method: str) -> None:
    inputs = _inputs(project, tmp_path, method, **WEIGHTS, **({"rdm_weights": [0.7, 0.2]} if uses_rdms(method) else {}))
    student, targets, run = inputs.student, inputs.info, inputs.run
    rows, x, batch = _first_batch(inputs)
    student.train()
    out = student(x, generator=torch.Generator().manual_seed(1))

    def loss_of(*, weights=run.weights, lam=(0.7, 0.2), scale=targets.emb_scale):
        return method_loss(method, out=out, batch=batch, weights=weights,
                           rdm_weights=torch.tensor(lam) if uses_rdms(method) else torch.zeros(0),
                           emb_scale=scale, generator=torch.Generator().manual_seed(2))

    def expected(*, kd_alpha=0.6, lam=(0.7, 0.2), scale=targets.emb_scale):
        return _reference_loss(method, out, batch, temperature=3.0, kd_alpha=kd_alpha, ce_weight=0.8,
                               kl_weight=1.5, lam=list(lam) if uses_rdms(method) else [], feature_weight=20.0,
                               rate_weight=0.01, scale=scale)

    loss = method_loss(method, out=out, batch=batch, weights=run.weights,
                       rdm_weights=rdm_weight_tensor(run.weights, targets.num_rdms, CPU),
                       emb_scale=targets.emb_scale, generator=torch.Generator().manual_seed(2))
    # The value is the method's formula on this batch, with the weights from params.
    base = expected()
    assert loss.item() == pytest.approx(base, rel=1e-5)
    assert loss_of().item() == pytest.approx(base, rel=1e-5)
    # Each knob moves the value as the formula says, and only where the method uses it.
    other_alpha = loss_of(weights=dataclasses.replace(run.weights, kd_alpha=0.1)).item()
    assert other_alpha == pytest.approx(expected(kd_alpha=0.1), rel=1e-5)
    assert (other_alpha != pytest.approx(base, rel=1e-4)) == (method == "kd")
    other_scale = loss_of(scale=3 * targets.emb_scale).item()
    assert other_scale == pytest.approx(expected(scale=3 * targets.emb_scale), rel=1e-5)
    assert (other_scale != pytest.approx(base, rel=1e-4)) == (method == "cifd")
    if uses_rdms(method):
        other_lam = loss_of(lam=(2.0, 0.0)).item()
        assert other_lam == pytest.approx(expected(lam=(2.0, 0.0)), rel=1e-5)
        assert other_lam != pytest.approx(base, rel=1e-4)
    loss.backward()

    assert loss.ndim == 0 and torch.isfinite(loss)
    for name, param in student.named_parameters():
        assert param.grad is not None, f"{method}: no gradient reaches {name}"
        assert torch.isfinite(param.grad).all(), name
    assert any(float(p.grad.abs().sum()) > 0 for p in student.backbone.parameters())
    cached = [t for t in vars(inputs.targets).values() if isinstance(t, torch.Tensor)]
    cached += [t for t in vars(batch).values() if isinstance(t, torch.Tensor)]
    assert all(not t.requires_grad and t.grad is None for t in cached)  # gradients reach only the student
    if method in ("dgkd", "cifd"):
        assert batch.rdm_logits is not None and batch.rdm_logits.shape[:2] == (2, len(rows))  # 2 RDMs
    else:
        assert inputs.targets.rdm_emb is None and batch.rdm_logits is None
    if method == "cifd":
        assert student.ibm is not None and out.bits is not None and bool((out.bits > 0).all())
        assert batch.teacher_emb is not None
        assert out.projected is not None and out.projected.shape == (len(rows), batch.teacher_emb.shape[-1])
        student.eval()  # the IBM is removed at inference: the student is its bare backbone
        with torch.no_grad():
            assert torch.equal(student(x).logits, student.backbone(x))
    else:
        assert batch.teacher_emb is None  # only the feature losses read the cached embeddings
        assert student.ibm is None and out.bits is None
        assert (out.projected is None) == (student.proj is None)


@pytest.mark.parametrize(("method", "distill", "weights"), [
    ("kd", {"kd_alpha": 0.2}, {"kd_alpha": 0.2}),
    ("kd", {"kd_alpha": 0.9}, {"kd_alpha": 0.9}),
    ("dgkd", {"rdm_weights": [1.0, 3.0]}, {"lam": [1.0, 3.0]}),
    ("dgkd", {"rdm_weights": None}, {"lam": [1.0, 1.0]}),  # null: every RDM weighs 1
    ("cifd", {"rdm_weights": [0.0, 2.0]}, {"lam": [0.0, 2.0]}),
    # distill.per_method: each method's own settings, over the section, for that method only
    ("kd", {"kd_alpha": 0.5, "per_method": {"kd": {"kd_alpha": 0.3}, "dgkd": {"kd_alpha": 0.7}}}, {"kd_alpha": 0.3}),
    ("dgkd", {"rdm_weights": [1.0, 1.0], "per_method": {"kd": {"rdm_weights": [5.0, 5.0]},
                                                        "dgkd": {"rdm_weights": [2.0, 0.5]}}}, {"lam": [2.0, 0.5]}),
])
def test_kd_alpha_and_rdm_weights_reach_the_loss_from_params(project, tmp_path: Path, method: str, distill: dict,
                                                            weights: dict) -> None:
    inputs = _inputs(project, tmp_path, method, kd_dropout=0.0, **distill)
    run, targets = inputs.run, inputs.info
    if "kd_alpha" in weights:
        assert run.weights.kd_alpha == weights["kd_alpha"]
    if "rdm_weights" in distill:
        assert run.weights.rdm_weights == (None if distill["rdm_weights"] is None else tuple(weights["lam"]))
    _, x, batch = _first_batch(inputs)
    inputs.student.train()
    out = inputs.student(x, generator=torch.Generator().manual_seed(1))
    loss = method_loss(method, out=out, batch=batch, weights=run.weights,
                       rdm_weights=rdm_weight_tensor(run.weights, targets.num_rdms, CPU),
                       emb_scale=targets.emb_scale, generator=torch.Generator().manual_seed(2))
    defaults = DistillConfig()
    expected = _reference_loss(method, out, batch, temperature=defaults.temperature,
                               kd_alpha=weights.get("kd_alpha", defaults.kd_alpha), ce_weight=defaults.ce_weight,
                               kl_weight=defaults.kl_weight, lam=weights.get("lam", []),
                               feature_weight=defaults.feature_weight, rate_weight=defaults.rate_weight,
                               scale=targets.emb_scale)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("method", ["ce", "kd"])
def test_rdm_weights_in_params_do_not_break_the_methods_without_rdms(project, tmp_path: Path, method: str) -> None:
    # One distill section serves every method (dvc.yaml's foreach), so λ_n given for the
    # RDM methods must leave ce and kd runnable.
    inputs = _inputs(project, tmp_path, method, rdm_weights=[0.5, 2.0])
    history = _train(inputs)
    assert math.isfinite(history[0].train_loss)


class _Stop(Exception):
    pass


def _first_step(inputs, *, record_logits: bool = False):
    """Train until the first optimizer step; its StepInfo, and (optionally) the logits the
    student gave on that step's batch, recorded by a forward hook."""
    seen: dict = {}

    def keep_logits(module, args, output) -> None:
        seen.setdefault("logits", output.logits.detach().float().clone())

    def stop(info) -> None:
        seen["info"] = info
        raise _Stop

    handle = inputs.student.register_forward_hook(keep_logits) if record_logits else None
    try:
        with pytest.raises(_Stop):
            _train(inputs, on_step=stop)
    finally:
        if handle is not None:
            handle.remove()
    return seen["info"], seen.get("logits")


def test_ckd_weight_adds_the_comparative_term_inside_the_loop(project, tmp_path: Path) -> None:
    """With ckd_weight = w the first step's loss is the ckd_weight = 0 loss plus w times the
    comparative term on the same batch, with pairs drawn from the loop's device generator
    right after the KD-dropout mask (cifd, KD dropout 0.25: the mask is a real draw).

    The host generator (``distill.seed``) draws only the epoch's permutation and view choice;
    the mask and the pairs come from a generator on the training device reseeded with
    ``derived_seed(seed, epoch, DRAWS_STREAM)`` each epoch, so neither costs a host-to-device
    copy (or a sync) per step and a resumed run redraws them alike."""
    w = 5.0
    base_info, _ = _first_step(_inputs(project, tmp_path / "base", "cifd"))
    inputs = _inputs(project, tmp_path / "ckd", "cifd", ckd_weight=w)
    info, logits = _first_step(inputs, record_logits=True)
    assert inputs.run.weights.ckd_weight == w
    assert torch.equal(info.rows, base_info.rows)  # the same batch: the same generator draws before it

    # The host generator's draws: the epoch's permutation and view choice. The device
    # generator's, on the first step: the KD-dropout mask over [teacher, 2 RDMs], then the
    # comparative pairs.
    targets = inputs.info
    g = torch.Generator().manual_seed(0)  # distill.seed
    order = torch.randperm(targets.num_rows, generator=g)
    choice = torch.randint(targets.num_views, (targets.num_rows,), generator=g)
    assert torch.equal(info.rows, order[: len(info.rows)])
    draws = torch.Generator(device=CPU).manual_seed(derived_seed(0, 0, DRAWS_STREAM))  # (seed, epoch 0)
    torch.rand(1 + targets.num_rdms, generator=draws)  # the KD-dropout mask (keep where >= 0.25)
    cycle = torch.randperm(len(info.rows), generator=draws)
    teacher_logits = inputs.targets.teacher_logits[info.rows, choice[info.rows]]
    term = float(ref.comparative(logits, teacher_logits, cycle))
    assert term > 1e-3
    assert float(info.loss) - float(base_info.loss) == pytest.approx(w * term, rel=1e-4, abs=1e-4)


# ----------------------------------------------------------------------------- resume


def test_resume_is_bit_exact_and_foreign_checkpoints_are_ignored(project, tmp_path: Path) -> None:
    whole = _inputs(project, tmp_path / "whole", "cifd", epochs=2)
    expected = _train(whole)
    assert len(expected) == 2 and all(math.isfinite(h.train_loss) for h in expected)

    class Killed(Exception):
        pass

    def kill(log: EpochLog) -> None:
        if log.epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        _train(_inputs(project, tmp_path / "split", "cifd", epochs=2), on_epoch=kill)
    ckpt = tmp_path / "split" / "checkpoints" / "cifd.safetensors"
    assert load_checkpoint(ckpt).epoch == 1
    shutil.copy(ckpt, tmp_path / "after_epoch_1.safetensors")

    resumed = _inputs(project, tmp_path / "split", "cifd", epochs=2)  # a fresh process: new student
    seen: list[int] = []
    assert _train(resumed, on_epoch=lambda log: seen.append(log.epoch)) == expected
    assert seen == [2]
    final = whole.student.state_dict()
    for key, value in resumed.student.state_dict().items():
        assert torch.equal(value, final[key]), key

    # The same checkpoint under another fingerprint (other config/cache): a fresh start.
    other = _inputs(project, tmp_path / "other", "cifd", epochs=2)
    other.run.checkpoint.parent.mkdir(parents=True)
    shutil.copy(tmp_path / "after_epoch_1.safetensors", other.run.checkpoint)
    other.run.fingerprint = "f" * 64
    seen.clear()
    assert _train(other, on_epoch=lambda log: seen.append(log.epoch)) == expected
    assert seen == [1, 2]
    assert load_checkpoint(other.run.checkpoint).fingerprint == "f" * 64


# ----------------------------------------------------------------------------- stream mode


def test_stream_join_with_two_workers(manifest, embedded_cache) -> None:
    labels = _cached_labels(embedded_cache)
    n = len(labels)
    source = _stream(manifest, embedded_cache, batch_size=5, workers=2)
    choice = torch.randint(3, (n,), generator=torch.Generator().manual_seed(0))
    batches = _epoch_pairs(source, choice)
    assert len(batches) == source.steps == math.ceil(n / 5)
    assert [len(b[0]) for b in batches] == [5] * (n // 5) + [n % 5]
    rows = torch.cat([b[0] for b in batches])
    views = torch.cat([b[1] for b in batches])
    inputs = torch.cat([b[2] for b in batches])
    assert sorted(rows.tolist()) == list(range(n))  # each row exactly once
    assert torch.equal(views, choice[rows])
    decoded = torch.from_numpy(load_split(manifest, "train").stacked())
    boxes, pre = _boxes_and_preprocess(embedded_cache)
    assert torch.equal(inputs, render_inputs(decoded[rows], boxes[rows, views], preprocess=pre))  # the cached views


def test_memory_and_stream_sources_yield_the_same_pairs(manifest, embedded_cache) -> None:
    labels = _cached_labels(embedded_cache)
    block = load_split(manifest, "train")
    images = torch.from_numpy(block.stacked())
    boxes, pre = _boxes_and_preprocess(embedded_cache)
    choice = torch.randint(3, (len(labels),), generator=torch.Generator().manual_seed(3))
    targets = _memory_targets(embedded_cache)
    memory = MemoryBatches(images, targets, preprocess=pre, batch_size=8, rank=0, world=1)
    stream = _stream(manifest, embedded_cache, batch_size=8)
    # Images of many sizes (the same pixels, held as a list): rendered one by one, same inputs.
    listed = MemoryBatches([torch.from_numpy(im) for im in block.images], targets, preprocess=pre, batch_size=8, rank=0,
                           world=1)
    assert memory.steps == stream.steps == listed.steps

    def pairs(source) -> set[tuple[int, int]]:
        out = set()
        for rows, views, x, batch in _epoch_pairs(source, choice):
            assert torch.equal(batch.teacher_logits, targets.teacher_logits[rows, views])  # the join is exact
            assert torch.equal(batch.labels, targets.labels[rows])
            torch.testing.assert_close(x, render_inputs(images[rows], boxes[rows, views], preprocess=pre),
                                       atol=1e-6, rtol=0)
            out |= set(zip(rows.tolist(), views.tolist(), strict=True))
        return out

    assert pairs(memory) == pairs(stream) == pairs(listed) == {(r, int(choice[r])) for r in range(len(labels))}


def test_stream_ranks_get_disjoint_shards_and_equal_steps(manifest, embedded_cache, monkeypatch) -> None:
    labels = _cached_labels(embedded_cache)
    choice = torch.zeros(len(labels), dtype=torch.int64)
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        source = _stream(manifest, embedded_cache, rank=rank, world=2)
        assert source.steps == (4 + 4 + 3) // 4  # the 3 smallest of 7 shards: the fewest rows a rank can get
        epoch0 = _epoch_pairs(source, choice)
        assert len(epoch0) == source.steps and all(len(b[0]) == 4 for b in epoch0)
        again = _epoch_pairs(source, choice)  # an epoch is reproducible (resume in stream mode)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch0, again, strict=True))
        per_rank.append(set(torch.cat([b[0] for b in epoch0]).tolist()))
        # Whole shards: a rank's rows cover whole 4-row blocks of the same shards.
        assert len({r // 4 for r in per_rank[-1]}) <= 4
    assert not per_rank[0] & per_rank[1]
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="webdataset sees rank 0 of 2 but training runs as rank 1"):
        next(_stream(manifest, embedded_cache, rank=1, world=2)(0, torch.arange(len(labels)), choice))


class _AlteredSplit:
    """A split of the session cache (train by default), with one cached label changed or fewer rows."""

    def __init__(self, embedded_cache, *, label_row: int | None = None, num_rows: int | None = None,
                 split: str = "train") -> None:
        from pipeline.cache.reader import open_cache

        self.inner = open_cache(embedded_cache[0]).split(split)
        self.logits_format, self.name = self.inner.logits_format, split
        self.label_row = label_row
        self.shard_bounds = self.inner.shard_bounds
        self.num_rows = num_rows if num_rows is not None else self.inner.num_rows

    def read(self, start: int, stop: int, fields):
        block = self.inner.read(start, stop, fields)
        if self.label_row is not None and start <= self.label_row < stop:
            block[L.LABELS] = block[L.LABELS].copy()
            block[L.LABELS][self.label_row - start] = (block[L.LABELS][self.label_row - start] + 1) % 3
        return block


def test_stream_join_check_names_row_and_shard(manifest, embedded_cache) -> None:
    source = _stream(manifest, embedded_cache, teacher=_AlteredSplit(embedded_cache, label_row=5))
    with pytest.raises(CacheError, match=r"cache and shards disagree at row 5 \(train-000001\.tar\).*cifd embed"):
        _epoch_pairs(source, torch.zeros(source.num_rows, dtype=torch.int64))
    with pytest.raises(CacheError, match="27 rows but the cache holds 26"):
        _stream(manifest, embedded_cache, teacher=_AlteredSplit(embedded_cache, num_rows=26))


class _Recording:
    """A batch source that records the (row, view) pairs it yields, per epoch."""

    def __init__(self, inner) -> None:
        self.inner, self.steps, self.rows = inner, inner.steps, inner.rows
        self.pairs: dict[int, set[tuple[int, int]]] = {}

    def __call__(self, epoch, order, choice):
        for rows, views, x, batch in self.inner(epoch, order, choice):
            self.pairs.setdefault(epoch, set()).update(zip(rows.tolist(), views.tolist(), strict=True))
            yield rows, views, x, batch


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_a_student_with_its_own_input_size_and_normalisation(project, tmp_path: Path, mode: str) -> None:
    """distill.preprocess: the student renders the cached boxes at its own size and
    normalisation; the fields it leaves out come from the teacher's; the saved student records it."""
    from stages import distill as distill_stage

    own = {"image_size": 20, "mean": [0.4, 0.4, 0.4], "std": [0.3, 0.3, 0.3]}
    inputs = _inputs(project, tmp_path / mode, "kd", data=mode, preprocess=own)
    teacher = Preprocess.from_spec(inputs.teacher_spec, source="teacher")
    assert inputs.run.preprocess == Preprocess(image_size=20, crop_pct=teacher.crop_pct,
                                               interpolation=teacher.interpolation, mean=(0.4,) * 3, std=(0.3,) * 3)
    choice = torch.zeros(inputs.info.num_rows, dtype=torch.int64)  # the clean views
    rows, views, x, _ = _epoch_pairs(inputs.batches, choice)[0]
    assert x.shape[1:] == (3, 20, 20)
    images = torch.from_numpy(load_split(inputs.manifest, "train").stacked())[rows]
    # The clean box of a 12 px image at 20 px: torch's resize of the whole image, then normalised.
    expected = torch.nn.functional.interpolate(images.float() / 255, size=(20, 20), mode="bilinear", antialias=True)
    torch.testing.assert_close(x, (expected - 0.4) / 0.3, atol=1e-5, rtol=0)
    result = distill_stage.run(project.params(tmp_path / mode, distill={"data": mode, "preprocess": own}), "kd")
    assert result.history and math.isfinite(result.history[-1].val_top1)
    from pipeline.models import load_model

    _, spec = load_model(tmp_path / mode / "students" / "kd.safetensors")
    assert spec["preprocess"] == inputs.run.preprocess.to_spec()


def test_training_sees_the_same_pairs_from_memory_and_stream(project, tmp_path: Path) -> None:
    pairs = {}
    for mode in ("memory", "stream"):
        inputs = _inputs(project, tmp_path / mode, "kd", data=mode, loader_workers=2, epochs=2)
        assert isinstance(inputs.batches, StreamBatches) == (mode == "stream")
        inputs.batches = recording = _Recording(inputs.batches)
        history = _train(inputs)
        assert len(history) == 2 and all(math.isfinite(h.train_loss) for h in history)
        pairs[mode] = recording.pairs
    assert pairs["memory"] == pairs["stream"]
    assert all(len(p) == 27 for p in pairs["memory"].values())
    assert pairs["memory"][0] != pairs["memory"][1]  # views are redrawn every epoch


# ----------------------------------------------------------------------------- crop replay


def _reference_view(image: np.ndarray, view, *, size: int) -> np.ndarray:
    """One view of a uint8 image (C, H, W) in [0, 1], float64, by the documented rule:
    an integer box of the output size is a plain copy (zeros outside the image); any other
    box is sampled bilinearly at the pixel centres of the box (align_corners=False),
    coordinates clamped to the edge pixels inside the image's extent, zeros outside it.
    The flip mirrors the output columns."""
    top, left, h, w, flip = (float(v) for v in view)
    img = image.astype(np.float64) / 255.0
    channels, height, width = img.shape
    if top == round(top) and left == round(left) and h == size and w == size:
        pad = size + int(abs(top) + abs(left))
        padded = np.pad(img, ((0, 0), (pad, pad), (pad, pad)))
        crop = padded[:, int(top) + pad:int(top) + pad + size, int(left) + pad:int(left) + pad + size]
        return crop[:, :, ::-1] if flip > 0.5 else crop
    out = np.zeros((channels, size, size))
    for i in range(size):
        for j in range(size):
            jj = size - 1 - j if flip > 0.5 else j
            y = top + (i + 0.5) * h / size - 0.5
            x = left + (jj + 0.5) * w / size - 0.5
            if not (-0.5 <= y <= height - 0.5 and -0.5 <= x <= width - 0.5):
                continue
            y, x = min(max(y, 0.0), height - 1.0), min(max(x, 0.0), width - 1.0)
            y0, x0 = int(math.floor(y)), int(math.floor(x))
            y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
            dy, dx = y - y0, x - x0
            out[:, i, j] = ((1 - dy) * ((1 - dx) * img[:, y0, x0] + dx * img[:, y0, x1])
                            + dy * ((1 - dx) * img[:, y1, x0] + dx * img[:, y1, x1]))
    return out


def test_replayed_crops_are_the_documented_crops_and_give_the_cached_embeddings(manifest, embedded_cache,
                                                                                 teacher_file) -> None:
    """The student loop's rendering of cached (row, view) pairs, in shuffled batches, is the
    crop the view describes (checked against a plain numpy crop / bilinear resample), and
    the teacher on those pixels gives the cached embeddings: the very pixels embed saw."""
    from pipeline.cache.reader import open_cache
    from pipeline.models import load_model

    teacher, spec = load_model(teacher_file)
    teacher.eval()
    preprocess = Preprocess.from_spec(spec, source=str(teacher_file))
    size = preprocess.image_size
    mean = torch.tensor(preprocess.mean).view(-1, 1, 1)
    std = torch.tensor(preprocess.std).view(-1, 1, 1)
    n = 8
    cached = open_cache(embedded_cache[0]).split("train").read(0, n, (L.VIEWS, L.EMBEDDINGS))
    views = torch.from_numpy(cached[L.VIEWS])  # (n, V, 5)
    v = views.shape[1]
    assert bool((views[:, 1:, 2] != manifest.image_shape[1]).any())  # real resampled crops, not only copies
    images_np = load_split(manifest, "train").stacked()[:n]
    images = torch.from_numpy(images_np)

    # The student loop: (row, view) pairs in a shuffled order, other batch boundaries.
    rows = torch.arange(n).repeat_interleave(v)
    view_ids = torch.arange(v).repeat(n)
    perm = torch.randperm(n * v, generator=torch.Generator().manual_seed(0))
    student_sees = torch.cat([
        render_inputs(images[rows[p]], views[rows[p], view_ids[p]], preprocess=preprocess, channels_last=True)
        for p in perm.split(7)
    ])
    for k, pair in enumerate(perm.tolist()):
        r, j = int(rows[pair]), int(view_ids[pair])
        pixels = torch.from_numpy(_reference_view(images_np[r], views[r, j], size=size).copy())
        expected = (pixels.float() - mean) / std
        if j == 0:  # the clean view is a copy: bit for bit
            assert torch.equal(student_sees[k], expected), (r, j)
        else:
            torch.testing.assert_close(student_sees[k], expected, atol=1e-5, rtol=0)  # float32 resampling

    # Copies shifted past the border (the CIFAR pad-and-crop) are zero outside; flips mirror.
    shifted = torch.tensor([[-3.0, 2.0, size, size, 1.0], [4.0, -4.0, size, size, 0.0], [0.0, 0.0, size, size, 1.0]])
    got = render_inputs(images[:3], shifted, preprocess=preprocess)
    for k in range(3):
        pixels = torch.from_numpy(_reference_view(images_np[k], shifted[k], size=size).copy())
        assert torch.equal(got[k], (pixels.float() - mean) / std), k
    assert torch.equal(got[0][:, :3], ((torch.zeros(3, 3, size) - mean) / std))  # rows above the image

    with torch.no_grad():
        emb = teacher.embed(student_sees)
    expected = torch.from_numpy(cached[L.EMBEDDINGS].astype(np.float32)).reshape(n * v, -1)[perm]
    torch.testing.assert_close(emb, expected, atol=2e-3 * float(expected.abs().max()), rtol=2e-3)


# ----------------------------------------------------------------------------- refusals


def test_cache_from_another_teacher_is_refused(project, tmp_path: Path, teacher_file: Path) -> None:
    from pipeline.models import load_model, save_model
    from stages import distill as stage

    teacher, spec = load_model(teacher_file)
    with torch.no_grad():
        next(teacher.parameters()).add_(0.01)
    other = tmp_path / "other_teacher.pt"
    save_model(other, teacher, spec=spec)
    params = project.params(tmp_path, paths={"teacher": str(other)}, distill={"methods": ["ce"]})
    with pytest.raises(CacheError, match="teacher state-dict sha256.*another teacher"):
        stage.run(params, "ce")
    assert not (tmp_path / "students").exists()


def test_cache_missing_rows_is_refused(project, tmp_path: Path, embedded_cache) -> None:
    from stages import distill as stage

    cache = tmp_path / "short.zarr"
    shutil.copytree(embedded_cache[0], cache)
    group = zarr.open_group(cache, mode="r+", use_consolidated=False)["train"]
    for name in L.ROW_ARRAYS:
        array = group[name]
        array.resize((24, *array.shape[1:]))  # the last shard (rows 24..26) is gone
    group.attrs["shard_bounds"] = group.attrs["shard_bounds"][:-1]
    zarr.consolidate_metadata(str(cache))
    params = project.params(tmp_path, paths={"cache": str(cache)})
    with pytest.raises(CacheError, match="split train has 24 rows but the shards have 27.*cifd embed"):
        stage.run(params, "ce")
    assert not (tmp_path / "students").exists()


def test_manifest_rows_unchanged(manifest) -> None:
    # Guards the constants the tests above rely on (27 train rows in 7 shards of 4).
    assert [s["stop"] - s["start"] for s in manifest.split("train")["shards"]] == [4] * 6 + [3]


def test_fingerprint_changes_with_the_training_code(monkeypatch, tmp_path: Path) -> None:
    """A finished checkpoint must not be resumed after the loss or IBM code changed: the real
    code_fingerprint, made to read an edited copy of one step module's source."""
    import hashlib
    import importlib

    import pipeline.losses.multi_target as edited_module
    import pipeline.train.checkpoint as checkpoint

    assert edited_module.__name__ in checkpoint.STEP_MODULES
    # Known value: sha256 over the step modules' source files, in STEP_MODULES order.
    digest = hashlib.sha256()
    for name in checkpoint.STEP_MODULES:
        digest.update(Path(importlib.import_module(name).__file__).read_bytes())
    assert checkpoint.code_fingerprint() == digest.hexdigest()

    cfg = DistillConfig().to_dict()
    before = checkpoint.config_fingerprint(cfg, "cifd", {"cache": "x"})
    assert checkpoint.config_fingerprint(cfg, "cifd", {"cache": "x"}) == before  # stable
    source = Path(edited_module.__file__).read_bytes()

    same = tmp_path / "same.py"  # a byte-identical copy elsewhere: the same fingerprint
    same.write_bytes(source)
    monkeypatch.setattr(edited_module, "__file__", str(same))
    assert checkpoint.config_fingerprint(cfg, "cifd", {"cache": "x"}) == before

    edited = tmp_path / "edited.py"  # one extra comment line: another fingerprint
    edited.write_bytes(source + b"# an edit\n")
    monkeypatch.setattr(edited_module, "__file__", str(edited))
    after = checkpoint.config_fingerprint(cfg, "cifd", {"cache": "x"})
    assert after != before
    assert checkpoint.config_fingerprint(cfg, "cifd", {"cache": "x"}) == after

    monkeypatch.undo()
    assert checkpoint.config_fingerprint(cfg, "cifd", {"cache": "x"}) == before


def test_a_users_student_module_is_part_of_the_fingerprint(monkeypatch, tmp_path: Path) -> None:
    """A student from the user's own module (``mynet:build``): its source is hashed, so an edited
    network does not resume an old checkpoint; a timm student is tied to timm's version."""
    import hashlib
    import sys

    import timm

    from pipeline.train.checkpoint import student_fingerprint

    module = tmp_path / "mynet_for_fingerprint.py"
    module.write_text("def build(num_classes):\n    raise AssertionError('not called')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mynet_for_fingerprint", raising=False)
    before = student_fingerprint("mynet_for_fingerprint:build")
    assert before == hashlib.sha256(module.read_bytes()).hexdigest()  # known value
    module.write_text(module.read_text() + "# widened\n")
    assert student_fingerprint("mynet_for_fingerprint:build") != before  # the file, not the imported copy
    assert student_fingerprint("mobilenetv3_small_050") == f"timm {timm.__version__}"
    assert student_fingerprint("pipeline.models.cifar_resnet:resnet8") == "pipeline"  # in STEP_MODULES


def test_step_modules_cover_every_module_the_training_step_imports() -> None:
    """The fingerprinted modules are found from the imports; the reference is what Python
    really loads: a fresh interpreter importing the step's entry points and every student
    module lists its pipeline.* modules in sys.modules."""
    import subprocess
    import sys

    from pipeline.train import checkpoint

    probe = ("import importlib, json, pkgutil, sys, pipeline.models as m\n"
             "for name in ('pipeline.train.distill', 'pipeline.train.stream', 'pipeline.train.batches'):\n"
             "    importlib.import_module(name)\n"
             "for info in pkgutil.iter_modules(m.__path__):\n"
             "    importlib.import_module('pipeline.models.' + info.name)\n"
             "print(json.dumps(sorted(n for n in sys.modules if n.split('.')[0] == 'pipeline')))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                                       cwd=Path(__file__).resolve().parents[2]).stdout)
    assert set(loaded) <= set(checkpoint.STEP_MODULES), set(loaded) - set(checkpoint.STEP_MODULES)
    # The mixed-view render, the row streams, the box resampling and the students were
    # missing from the hand-written list this replaced: a resumed run could mix their old code.
    assert {"pipeline.data.mixup", "pipeline.data.streaming", "pipeline.data.resample",
            "pipeline.models.cifar_resnet"} <= set(checkpoint.STEP_MODULES)
    # Nothing off the step: editing the tuner or the project checks does not void a checkpoint.
    assert not any(n.startswith(("pipeline.tune", "pipeline.project")) for n in checkpoint.STEP_MODULES)


def test_a_diverging_run_stops_with_a_clear_error_and_keeps_the_last_finite_checkpoint(project, tmp_path: Path) -> None:
    # An absurd learning rate drives the CIFD loss to inf/nan in the first epoch (as the paper's
    # weights did for a timm MobileNetV3 student at lr 0.05): stop, say what to change, save nothing.
    inputs = _inputs(project, tmp_path, "cifd", epochs=2, optim={"lr": 1e12, "name": "sgd"})
    with pytest.raises(TrainingDiverged, match=r"distill cifd: the training loss is not finite .* epoch 1.*"
                                               r"distill.optim.lr \(now 1e\+12\).*distill.optim.grad_clip"):
        _train(inputs)
    assert not inputs.run.checkpoint.exists()  # no epoch of garbage was checkpointed


def test_grad_clip_bounds_the_update(project, tmp_path: Path) -> None:
    # An absurd learning rate with the gradient norm clipped to 1e-12 (and no weight decay,
    # which clipping does not bound): every step moves a weight by at most ~1e-4.
    inputs = _inputs(project, tmp_path, "cifd", epochs=1,
                     optim={"lr": 1e8, "name": "sgd", "weight_decay": 0.0, "grad_clip": 1e-12})
    before = {k: v.clone() for k, v in inputs.student.state_dict().items()}
    history = _train(inputs)
    assert math.isfinite(history[0].train_loss)
    after = inputs.student.state_dict()
    moved = max(float((after[k].float() - before[k].float()).abs().max()) for k in before
                if before[k].is_floating_point() and "running" not in k)
    assert moved < 1e-2


def test_stream_mode_validates_one_shard_at_a_time_with_the_held_scores(project, tmp_path: Path, manifest,
                                                                       embedded_cache) -> None:
    """Stream mode does not hold the val split: each epoch it reads it a shard at a time (images,
    clean boxes, teacher logits), with the held split's top-1 and agreement and its KL to float
    rounding; a row whose label the cache disagrees on is refused, naming the row."""
    from pipeline.cache.join import CleanViewJoin
    from pipeline.evaluate import ShardChunks, ValSet, evaluate_classifier

    memory = _inputs(project, tmp_path / "memory", "kd")
    stream = _inputs(project, tmp_path / "stream", "kd", data="stream")
    assert isinstance(memory.val, ValSet) and isinstance(stream.val, ShardChunks)
    chunks = list(stream.val.chunks())
    assert len(chunks) == len(manifest.split("val")["shards"]) > 1
    assert torch.equal(torch.cat([c.labels for c in chunks]), memory.val.labels)
    assert torch.equal(torch.cat([c.views for c in chunks]), memory.val.views)
    backbone, pre = memory.student.backbone, memory.run.preprocess
    held = evaluate_classifier(backbone, memory.val, preprocess=pre, batch_size=5)
    streamed = evaluate_classifier(backbone, stream.val, preprocess=pre, batch_size=5)
    assert (streamed.top1, streamed.agreement) == (held.top1, held.agreement)
    assert streamed.kl == pytest.approx(held.kl, rel=1e-5)
    altered = _AlteredSplit(embedded_cache, label_row=6, split="val")
    with pytest.raises(CacheError, match=r"disagree at val row 6: label \d in the shards, \d in the cache.*cifd embed"):
        list(ShardChunks(manifest, "val", CPU, join=CleanViewJoin(altered, CPU, expected_rows=altered.num_rows)).chunks())
    with pytest.raises(CacheError, match="val split has 5 rows but the shards have"):
        CleanViewJoin(_AlteredSplit(embedded_cache, num_rows=5, split="val"), CPU,  # type: ignore[arg-type]
                      expected_rows=len(memory.val.labels))


def test_stream_mode_reads_the_same_targets_as_memory_mode_block_by_block(project, tmp_path: Path) -> None:
    """cifd (teacher logits and embeddings, RDM logits and reconstructions): every (row, view)
    the stream joins in its workers carries the targets memory mode holds for it."""
    memory = _inputs(project, tmp_path / "memory", "cifd")
    stream = _inputs(project, tmp_path / "stream", "cifd", data="stream", loader_workers=2)
    assert stream.targets is None and stream.info == memory.info
    choice = torch.randint(memory.info.num_views, (memory.info.num_rows,), generator=torch.Generator().manual_seed(4))
    held = memory.targets
    rows_seen = []
    for rows, views, _, batch in _epoch_pairs(stream.batches, choice):
        expected = gather_targets(held, rows, views)
        for name in ("labels", "teacher_logits", "teacher_emb", "rdm_logits", "rdm_emb"):
            assert torch.equal(getattr(batch, name), getattr(expected, name)), name
        rows_seen += rows.tolist()
    assert sorted(rows_seen) == list(range(memory.info.num_rows))


def _mobilenet_inputs(project, where: Path, **distill):
    """The timm MobileNetV3 student on the tiny project with the CIFAR recipe (SGD, lr 0.05)."""
    from stages.distill import build_inputs
    import yaml

    params = project.params(where, distill={"epochs": 2, "optim": {"name": "sgd", "lr": 0.05, "weight_decay": 5e-4},
                                            "student": "mobilenetv3_small_050", **distill})
    data = yaml.safe_load(params.read_text())
    data["distill"]["student_kwargs"] = {}  # the tiny project's ResNet-8 width does not apply
    params.write_text(yaml.safe_dump(data))
    paths, cfg = load_stage(params, "distill", DistillConfig)
    return build_inputs(paths, cfg, "cifd", device=CPU)


def test_mobilenet_student_diverges_at_the_papers_weights_and_a_grad_clip_keeps_it_finite(project,
                                                                                          tmp_path: Path) -> None:
    # As on CIFAR-10 (README, the study): the paper's β = 100 with SGD at lr 0.05 drives the
    # timm MobileNetV3's CIFD loss to NaN in the second epoch; the validated clip of 5 keeps it finite.
    with pytest.raises(TrainingDiverged, match="epoch 2"):
        _train(_mobilenet_inputs(project, tmp_path / "paper", feature_weight=100.0))
    history = _train(_mobilenet_inputs(project, tmp_path / "clip", feature_weight=100.0,
                                       optim={"name": "sgd", "lr": 0.05, "weight_decay": 5e-4, "grad_clip": 5.0}))
    assert all(math.isfinite(h.train_loss) for h in history)


def test_an_epoch_with_a_non_finite_score_is_checkpointed_as_null_and_read_back_as_nan() -> None:
    """A checkpoint's document holds finite numbers only: a NaN KL (a student whose val logits
    overflowed) is written as null and comes back as NaN; finite fields are untouched."""
    import json
    import math

    log = EpochLog(epoch=3, train_loss=0.5, val_top1=0.25, val_agreement=0.5, val_kl=math.nan)
    record = log.record()
    assert record == {"epoch": 3, "train_loss": 0.5, "val_top1": 0.25, "val_agreement": 0.5, "val_kl": None}
    back = EpochLog.from_record(json.loads(json.dumps(record)))
    assert math.isnan(back.val_kl) and (back.epoch, back.train_loss, back.val_top1) == (3, 0.5, 0.25)
