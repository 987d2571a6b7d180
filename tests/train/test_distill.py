"""Stage three on the tiny cache: one step per method, resume, stream join, crop replay,
and the checks that refuse a mismatched cache before training."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.cache.store import CacheError
from pipeline.data.preprocess import Preprocess, render_inputs
from pipeline.data.shards import load_split
from pipeline.train.batches import MemoryBatches
from pipeline.train.distill import EpochLog, TrainingDiverged, train_student
from pipeline.train.objective import method_loss, rdm_weight_tensor
from pipeline.train.stream import StreamBatches
from pipeline.train.targets import gather_targets
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
    return train_student(inputs.student, run=inputs.run, targets=inputs.targets, batches=inputs.batches,
                         val=inputs.val, **kwargs)


def _cached_labels(embedded_cache) -> np.ndarray:
    from pipeline.cache.reader import open_cache

    return open_cache(embedded_cache[0]).split("train").read_all((L.LABELS,))[L.LABELS]


def _epoch_pairs(source, choice: torch.Tensor, epoch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(choice), generator=torch.Generator().manual_seed(epoch))
    return list(source(epoch, order, choice))


# ----------------------------------------------------------------------------- methods


@pytest.mark.parametrize("method", ["ce", "kd", "dgkd", "cifd"])
def test_one_step_per_method(project, tmp_path: Path, method: str) -> None:
    inputs = _inputs(project, tmp_path, method)
    student, targets, run = inputs.student, inputs.targets, inputs.run
    choice = torch.randint(targets.num_views, (targets.num_rows,), generator=torch.Generator().manual_seed(0))
    rows, views, images = _epoch_pairs(inputs.batches, choice)[0]
    x = render_inputs(images, targets.views[rows, views], preprocess=run.preprocess,
                      channels_last=run.loop.channels_last)
    batch = gather_targets(targets, rows, views)
    student.train()
    out = student(x, generator=torch.Generator().manual_seed(1))
    loss = method_loss(method, out=out, batch=batch, weights=run.weights,
                       rdm_weights=rdm_weight_tensor(run.weights, targets.num_rdms, CPU),
                       emb_scale=targets.emb_scale, generator=torch.Generator().manual_seed(2))
    loss.backward()

    assert loss.ndim == 0 and torch.isfinite(loss)
    for name, param in student.named_parameters():
        assert param.grad is not None, f"{method}: no gradient reaches {name}"
        assert torch.isfinite(param.grad).all(), name
    assert any(float(p.grad.abs().sum()) > 0 for p in student.backbone.parameters())
    cached = [t for t in vars(targets).values() if isinstance(t, torch.Tensor)]
    cached += [t for t in vars(batch).values() if isinstance(t, torch.Tensor)]
    assert all(not t.requires_grad and t.grad is None for t in cached)  # gradients reach only the student
    if method in ("dgkd", "cifd"):
        assert batch.rdm_logits is not None and batch.rdm_logits.shape[:2] == (2, len(rows))  # 2 RDMs
    else:
        assert targets.rdm_logits is None
    if method == "cifd":
        assert student.ibm is not None and out.bits is not None and bool((out.bits > 0).all())
        assert out.projected is not None and out.projected.shape == (len(rows), targets.teacher_emb.shape[-1])
        student.eval()  # the IBM is removed at inference: the student is its bare backbone
        with torch.no_grad():
            assert torch.equal(student(x).logits, student.backbone(x))
    else:
        assert student.ibm is None and out.bits is None
        assert (out.projected is None) == (student.proj is None)


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
    ckpt = tmp_path / "split" / "students" / "cifd.ckpt"
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    shutil.copy(ckpt, tmp_path / "after_epoch_1.ckpt")

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
    shutil.copy(tmp_path / "after_epoch_1.ckpt", other.run.checkpoint)
    other.run.fingerprint = "f" * 64
    seen.clear()
    assert _train(other, on_epoch=lambda log: seen.append(log.epoch)) == expected
    assert seen == [1, 2]
    assert torch.load(other.run.checkpoint, weights_only=True)["fingerprint"] == "f" * 64


# ----------------------------------------------------------------------------- stream mode


def test_stream_join_with_two_workers(manifest, embedded_cache) -> None:
    labels = _cached_labels(embedded_cache)
    n = len(labels)
    source = StreamBatches(manifest, "train", labels=labels, batch_size=5, workers=2, device=CPU, rank=0, world=1,
                           seed=0, shuffle_buffer=1000)
    choice = torch.randint(3, (n,), generator=torch.Generator().manual_seed(0))
    batches = _epoch_pairs(source, choice)
    assert len(batches) == source.steps == math.ceil(n / 5)
    assert [len(b[0]) for b in batches] == [5] * (n // 5) + [n % 5]
    rows = torch.cat([b[0] for b in batches])
    views = torch.cat([b[1] for b in batches])
    images = torch.cat([b[2] for b in batches])
    assert sorted(rows.tolist()) == list(range(n))  # each row exactly once
    assert torch.equal(views, choice[rows])
    decoded = torch.from_numpy(load_split(manifest, "train").images)
    assert images.dtype == torch.uint8 and torch.equal(images, decoded[rows])


def test_memory_and_stream_sources_yield_the_same_pairs(manifest, embedded_cache) -> None:
    labels = _cached_labels(embedded_cache)
    images = torch.from_numpy(load_split(manifest, "train").images)
    choice = torch.randint(3, (len(labels),), generator=torch.Generator().manual_seed(3))
    memory = MemoryBatches(images, 8, 0, 1)
    stream = StreamBatches(manifest, "train", labels=labels, batch_size=8, workers=0, device=CPU, rank=0, world=1,
                           seed=0, shuffle_buffer=1000)
    assert memory.steps == stream.steps

    def pairs(source) -> set[tuple[int, int]]:
        out = set()
        for rows, views, imgs in _epoch_pairs(source, choice):
            assert torch.equal(imgs, images[rows])
            out |= set(zip(rows.tolist(), views.tolist(), strict=True))
        return out

    assert pairs(memory) == pairs(stream) == {(r, int(choice[r])) for r in range(len(labels))}


def test_stream_ranks_get_disjoint_shards_and_equal_steps(manifest, embedded_cache, monkeypatch) -> None:
    labels = _cached_labels(embedded_cache)
    choice = torch.zeros(len(labels), dtype=torch.int64)
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        source = StreamBatches(manifest, "train", labels=labels, batch_size=4, workers=0, device=CPU, rank=rank,
                               world=2, seed=0, shuffle_buffer=1000)
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
        next(StreamBatches(manifest, "train", labels=labels, batch_size=4, workers=0, device=CPU, rank=1,
                           world=2, seed=0, shuffle_buffer=1000)(0, torch.arange(len(labels)), choice))


def test_stream_join_check_names_row_and_shard(manifest, embedded_cache) -> None:
    labels = _cached_labels(embedded_cache).copy()
    labels[5] = (labels[5] + 1) % 3
    source = StreamBatches(manifest, "train", labels=labels, batch_size=4, workers=0, device=CPU, rank=0, world=1,
                           seed=0, shuffle_buffer=1000)
    with pytest.raises(CacheError, match=r"cache and shards disagree at row 5 \(train-000001\.tar\).*cifd embed"):
        _epoch_pairs(source, torch.zeros(len(labels), dtype=torch.int64))
    with pytest.raises(CacheError, match="27 rows but the cache holds 26"):
        StreamBatches(manifest, "train", labels=labels[:-1], batch_size=4, workers=0, device=CPU, rank=0, world=1,
                      seed=0, shuffle_buffer=1000)


class _Recording:
    """A batch source that records the (row, view) pairs it yields, per epoch."""

    def __init__(self, inner) -> None:
        self.inner, self.steps = inner, inner.steps
        self.pairs: dict[int, set[tuple[int, int]]] = {}

    def __call__(self, epoch, order, choice):
        for rows, views, images in self.inner(epoch, order, choice):
            self.pairs.setdefault(epoch, set()).update(zip(rows.tolist(), views.tolist(), strict=True))
            yield rows, views, images


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


def test_replayed_crops_equal_the_crops_embed_rendered(manifest, embedded_cache, teacher_file, monkeypatch) -> None:
    """The student loop's rendering of cached (row, view) pairs is pixel for pixel what
    ``embed`` fed the teacher, and the teacher on it gives the cached embeddings."""
    import pipeline.data.preprocess as preprocess_module
    from pipeline.cache.embed import teacher_outputs
    from pipeline.cache.reader import open_cache
    from pipeline.models import load_model

    teacher, spec = load_model(teacher_file)
    teacher.eval()
    preprocess = Preprocess.from_spec(spec, source=str(teacher_file))
    n = 8
    cached = open_cache(embedded_cache[0]).split("train").read(0, n, (L.VIEWS, L.EMBEDDINGS))
    views = torch.from_numpy(cached[L.VIEWS])  # (n, V, 5)
    v = views.shape[1]
    assert bool((views[:, 1:, 2] != manifest.image_shape[1]).any())  # real resampled crops, not only copies
    images = torch.from_numpy(load_split(manifest, "train").images[:n])

    rendered: list[torch.Tensor] = []

    def spy(*args, **kwargs):
        out = embed_render(*args, **kwargs)
        rendered.append(out.clone())
        return out

    embed_render = preprocess_module.render_views
    monkeypatch.setattr(preprocess_module, "render_views", spy)
    teacher_outputs(teacher, images, views, preprocess=preprocess, batch_size=5)
    monkeypatch.undo()
    teacher_saw = torch.cat(rendered)  # (n*V, C, S, S), row-major (row, view)

    # The student loop: (row, view) pairs in a shuffled order, other batch boundaries.
    rows = torch.arange(n).repeat_interleave(v)
    view_ids = torch.arange(v).repeat(n)
    perm = torch.randperm(n * v, generator=torch.Generator().manual_seed(0))
    student_sees = torch.cat([
        render_inputs(images[rows[p]], views[rows[p], view_ids[p]], preprocess=preprocess, channels_last=True)
        for p in perm.split(7)
    ])
    assert torch.equal(student_sees, teacher_saw[perm])
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


def test_fingerprint_changes_with_the_training_code(monkeypatch) -> None:
    """A finished checkpoint must not be resumed after the loss or IBM code changed."""
    import pipeline.train.checkpoint as checkpoint
    from schemas.config import DistillConfig

    cfg = DistillConfig().to_dict()
    before = checkpoint.config_fingerprint(cfg, "cifd", {"cache": "x"})
    assert checkpoint.config_fingerprint(cfg, "cifd", {"cache": "x"}) == before
    monkeypatch.setattr(checkpoint, "code_fingerprint", lambda: "edited")
    assert checkpoint.config_fingerprint(cfg, "cifd", {"cache": "x"}) != before


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
