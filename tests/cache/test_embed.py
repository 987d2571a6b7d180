"""Stage one (`pipeline.cache.embed.run_embed`): fill, replay, resume, refuse, fail loudly."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import torch
import yaml
import zarr
from click.testing import CliRunner

import pipeline.cache.embed as embed_module
from pipeline.cache.embed import TeacherOutputError, run_embed
from pipeline.cache.lock import StoreLockedError, writer_lock
from pipeline.cache.reader import CacheExpectation, open_cache
from pipeline.cache.store import CacheError
from view_reference import torchvision_get_params
from pipeline.data.shards import (
    CorruptSampleError,
    content_hash,
    file_sha256,
    load_manifest,
    load_split,
)
from pipeline.data.views import normalize, render_views
from pipeline.models import (
    ModelFileError,
    build_model,
    load_model,
    save_model,
    state_dict_sha256,
)
from schemas import layout as L
from schemas.config import EmbedConfig
from stages.cli import main

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part"),
]


def arrays(store: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every array of every split, read raw (no completeness check)."""
    root = zarr.open_group(store, mode="r", use_consolidated=False)
    return {split: {name: root[split][name][:] for name in (*L.ROW_ARRAYS, L.DONE)}
            for split in L.SPLITS}


def assert_bit_equal(a: Path, b: Path) -> None:
    left, right = arrays(a), arrays(b)
    for split in L.SPLITS:
        for name in left[split]:
            x, y = left[split][name], right[split][name]
            assert x.dtype == y.dtype and x.shape == y.shape, f"{split}/{name}"
            assert x.tobytes() == y.tobytes(), f"{split}/{name} differs"


def num_shards(manifest) -> int:
    return sum(len(manifest.split(s)["shards"]) for s in L.SPLITS)


def done_flags(store: Path) -> np.ndarray:
    root = zarr.open_group(store, mode="r", use_consolidated=False)
    return np.concatenate([np.asarray(root[s][L.DONE][:]) for s in L.SPLITS])


@pytest.fixture(scope="module")
def forkserver():
    """Child processes forked from one server that has imported the embed code once.

    Spawning a fresh interpreter per process re-imports torch and timm (~10 s each on a busy
    2-core box); a preloaded forkserver pays that once for the dask workers and the child
    that gets killed. Only process start-up differs from the default 'spawn': tasks are
    still pickled to separate processes that share nothing with this one.
    """
    import distributed.utils

    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        ctx = distributed.utils.get_mp_context()  # distributed sets its own preload list first
        ctx.set_forkserver_preload(["distributed", "pipeline.cache.embed"])
        yield ctx


@pytest.fixture(scope="module")
def teacher(teacher_file):
    model, spec = load_model(teacher_file)
    return model.eval(), spec


# Filling the store -----------------------------------------------------------------------


def test_embed_fills_every_row(embedded_cache, manifest, teacher, embed_settings) -> None:
    store, report = embedded_cache
    model, spec = teacher
    total = sum(manifest.split(s)["num_samples"] for s in L.SPLITS)
    assert report.resumed_shards == 0 and report.written_shards == num_shards(manifest)
    assert report.written_rows == total and report.teacher_forwards == total * embed_settings.views
    assert report.classifier_reproduces_logits
    cache = open_cache(store, CacheExpectation(teacher_sha256=state_dict_sha256(model),
                                               manifest_sha256=manifest.sha256,
                                               num_classes=model.num_classes, embed_dim=model.embed_dim))
    assert cache.attrs[L.ATTR_COMPLETE] is True
    prov = cache.provenance
    assert prov["preprocess"] == spec["preprocess"]
    assert prov["views"]["num_views"] == embed_settings.views and prov["views"]["seed"] == embed_settings.seed
    assert prov["dataset"]["classes"] == manifest.classes
    for split in L.SPLITS:
        part = cache.split(split)
        data = part.read_all()
        block = load_split(manifest, split)
        n = manifest.split(split)["num_samples"]
        assert (part.num_rows, part.num_views, part.embed_dim, part.num_classes) == (
            n, embed_settings.views, model.embed_dim, model.num_classes)
        assert np.array_equal(data[L.INDEX], np.arange(n))
        assert np.array_equal(data[L.LABELS], block.labels)
        assert np.isfinite(data[L.EMBEDDINGS]).all() and np.isfinite(data[L.LOGITS]).all()
        assert np.abs(data[L.EMBEDDINGS]).sum(axis=-1).min() > 0  # no row left at the fill value


def test_view0_logits_are_the_teachers_clean_logits(embedded_cache, manifest, teacher) -> None:
    store, _ = embedded_cache
    model, spec = teacher
    pre = spec["preprocess"]
    assert pre["image_size"] == manifest.image_shape[1]  # so view 0 is the untouched image
    cache = open_cache(store)
    for split in L.SPLITS:
        block = load_split(manifest, split)
        x = normalize(torch.from_numpy(block.stacked()).float() / 255, mean=tuple(pre["mean"]), std=tuple(pre["std"]))
        with torch.no_grad():
            emb = model.embed(x)
            logits = model.classify(emb)
        cached = cache.split(split).read_all((L.EMBEDDINGS, L.LOGITS))
        c_logits = torch.from_numpy(cached[L.LOGITS][:, 0])
        assert torch.equal(c_logits.argmax(-1), logits.argmax(-1))
        torch.testing.assert_close(c_logits, logits, atol=1e-5, rtol=1e-5)
        c_emb = torch.from_numpy(cached[L.EMBEDDINGS][:, 0].astype(np.float32))
        torch.testing.assert_close(c_emb, emb, atol=2e-3, rtol=2e-3)  # stored as float16


def test_cached_views_are_the_seeded_random_resized_crops(embedded_cache, manifest, embed_settings, teacher) -> None:
    store, _ = embedded_cache
    cache = open_cache(store)
    _, height, width = manifest.image_shape
    pre = teacher[1]["preprocess"]
    assert pre["image_size"] == height == width and pre["crop_pct"] == 1.0  # so the clean view is the whole image
    policy = embed_settings.policy
    assert policy.kind == "rrc" and policy.flip
    # The seeded stream of uniforms (one generator, splits in order; per split: 10 tries × 4
    # uniforms per view in float64, then the flips), turned into boxes by torchvision's
    # get_params written out (tests/view_reference.py).
    generator = torch.Generator().manual_seed(embed_settings.seed)
    for split in L.SPLITS:
        n, extra = manifest.split(split)["num_samples"], embed_settings.views - 1
        u = torch.rand((n, extra, 10, 4), generator=generator, dtype=torch.float64).numpy()
        flips = torch.rand(n, extra, generator=generator).numpy() < 0.5
        expected = np.zeros((n, 1 + extra, 5), dtype=np.float32)
        expected[:, 0] = (0, 0, height, width, 0)
        for i in range(n):
            for k in range(extra):
                expected[i, k + 1, :4] = torchvision_get_params(u[i, k], height, width, policy.scale, policy.ratio)
        expected[:, 1:, 4] = flips
        cached = cache.split(split).read_all((L.VIEWS,))[L.VIEWS]
        assert cached.dtype == np.float32
        np.testing.assert_array_equal(cached, expected)
        # And the recipe's promises, checked on the cached boxes themselves.
        top, left, h, w, flip = np.moveaxis(cached[:, 1:], -1, 0)
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
        assert set(np.unique(flip)) == {0.0, 1.0}
        assert (cached[:, 1:, 2] < height).any()  # real crops, not only clean views


def test_replaying_cached_views_reproduces_cached_outputs(embedded_cache, manifest, teacher) -> None:
    """The student's path: decode the shard, replay the cached crop, run the network."""
    store, _ = embedded_cache
    model, spec = teacher
    pre = spec["preprocess"]
    cache = open_cache(store)
    for split in L.SPLITS:
        part = cache.split(split)
        block = load_split(manifest, split)
        cached = part.read_all()
        images = torch.from_numpy(block.stacked())
        for v in range(part.num_views):
            x = render_views(images, torch.from_numpy(cached[L.VIEWS][:, v]), out_size=pre["image_size"],
                             mean=tuple(pre["mean"]), std=tuple(pre["std"]))
            with torch.no_grad():
                emb = model.embed(x)
                logits = model.classify(emb)
            torch.testing.assert_close(torch.from_numpy(cached[L.EMBEDDINGS][:, v].astype(np.float32)), emb,
                                       atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(torch.from_numpy(cached[L.LOGITS][:, v]), logits, atol=1e-5, rtol=1e-5)
        # the views really differ, so the comparison above is not vacuous
        assert np.abs(cached[L.EMBEDDINGS][:, 1].astype(np.float32)
                      - cached[L.EMBEDDINGS][:, 0].astype(np.float32)).max() > 1e-2


@pytest.mark.slow
def test_dask_local_cluster_gives_the_same_cache(embedded_cache, manifest, shards_dir, teacher_file, embed_settings,
                                                  tiny, tmp_path, forkserver) -> None:
    reference, _ = embedded_cache
    store = tmp_path / "dask.zarr"
    settings = dataclasses.replace(embed_settings, scheduler="local", workers=2, threads_per_worker=1)
    # A worker's error reaches the driver with its message; the store stays incomplete.
    shards = tmp_path / "shards"
    shutil.copytree(shards_dir, shards)
    bad = manifest.split("val")["shards"][0]
    _rewrite_member(tiny, shards / bad["file"], f"{L.sample_key(bad['start'])}.jpg", b"garbage")
    with pytest.raises(CorruptSampleError, match=rf"{bad['file']} sample {L.sample_key(bad['start'])}"):
        run_embed(settings=settings, manifest=load_manifest(shards), teacher_path=teacher_file, store_path=store)
    assert zarr.open_group(store, mode="r").attrs[L.ATTR_COMPLETE] is False

    # Same manifest (only the bytes were bad, and every row is hash-checked): finished shards resume.
    report = run_embed(settings=settings, manifest=manifest, teacher_path=teacher_file, store_path=store)
    assert report.resumed_shards + report.written_shards == num_shards(manifest)
    assert 1 <= report.written_shards < num_shards(manifest)
    open_cache(store, CacheExpectation(manifest_sha256=manifest.sha256))
    # Same device, threads and per-shard batches: the worker layout does not change a bit.
    assert_bit_equal(store, reference)


# Resuming and refusing -------------------------------------------------------------------

def killable_embed(args: dict) -> None:
    """Child process: ``run_embed`` that half-writes its ``hang_at``-th shard, then waits."""
    original, calls = embed_module.write_rows, [0]

    def write_rows(root, split, start, stop, rows, **kwargs):
        calls[0] += 1
        if calls[0] == args["hang_at"]:  # half-write this shard, then wait to be killed
            root[split][L.EMBEDDINGS][start:stop] = rows[L.EMBEDDINGS] + 1
            Path(args["marker"]).write_text(str(start))
            time.sleep(600)
        original(root, split, start, stop, rows, **kwargs)

    embed_module.write_rows = write_rows
    torch.set_num_threads(1)
    run_embed(settings=EmbedConfig.from_mapping(args["settings"], section="embed"),
              manifest=load_manifest(args["shards"]), teacher_path=Path(args["teacher"]),
              store_path=Path(args["store"]))


@pytest.mark.slow
def test_kill_and_resume_matches_an_uninterrupted_run(embedded_cache, manifest, shards_dir, teacher_file,
                                                       embed_settings, tmp_path, forkserver) -> None:
    reference, _ = embedded_cache
    store, marker = tmp_path / "killed.zarr", tmp_path / "marker"
    hang_at = 4  # shards 1-3 finish, the 4th is half written when the kill comes
    args = {"hang_at": hang_at, "marker": str(marker), "settings": embed_settings.to_dict(),
            "shards": str(shards_dir), "teacher": str(teacher_file), "store": str(store)}
    child = forkserver.Process(target=killable_embed, args=(args,))
    child.start()
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and child.is_alive():
            if marker.exists() and done_flags(store).sum() >= 1:
                break
            time.sleep(0.05)
        assert child.is_alive(), f"child exited early with {child.exitcode}"
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=30)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode == -signal.SIGKILL
    done = done_flags(store)
    assert done.sum() == hang_at - 1 < len(done), done
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(store)

    report = run_embed(settings=embed_settings, manifest=manifest, teacher_path=teacher_file, store_path=store)
    assert report.resumed_shards == hang_at - 1 > 0
    assert report.written_shards == num_shards(manifest) - (hang_at - 1)
    assert report.written_rows == sum(manifest.split(s)["num_samples"] for s in L.SPLITS) - 3 * 4
    assert_bit_equal(store, reference)
    assert open_cache(store).fingerprint == open_cache(reference).fingerprint


def test_a_failing_shard_leaves_finished_shards_done_and_the_store_incomplete(
        embedded_cache, manifest, teacher_file, embed_settings, tmp_path, monkeypatch) -> None:
    reference, _ = embedded_cache
    store = tmp_path / "failed.zarr"
    original, calls = embed_module.embed_shard, []

    def flaky(task):
        calls.append(task.start)
        if len(calls) == 3:
            raise RuntimeError("worker died on purpose")
        return original(task)

    monkeypatch.setattr(embed_module, "embed_shard", flaky)
    with pytest.raises(RuntimeError, match="on purpose"):
        run_embed(settings=embed_settings, manifest=manifest, teacher_path=teacher_file, store_path=store)
    done = done_flags(store)
    assert done.tolist() == [1, 1] + [0] * (len(done) - 2)
    assert zarr.open_group(store, mode="r").attrs[L.ATTR_COMPLETE] is False
    with pytest.raises(CacheError, match=r"incomplete .*'train': '2/7'.*rerun `cifd embed`"):
        open_cache(store)

    monkeypatch.setattr(embed_module, "embed_shard", original)
    report = run_embed(settings=embed_settings, manifest=manifest, teacher_path=teacher_file, store_path=store)
    assert (report.resumed_shards, report.written_shards) == (2, num_shards(manifest) - 2)
    assert_bit_equal(store, reference)


def test_rerun_of_a_complete_store_does_nothing(embedded_cache, manifest, teacher_file, embed_settings,
                                                tmp_path) -> None:
    reference, _ = embedded_cache
    store = tmp_path / "copy.zarr"
    shutil.copytree(reference, store)
    report = run_embed(settings=embed_settings, manifest=manifest, teacher_path=teacher_file, store_path=store)
    assert (report.resumed_shards, report.written_shards, report.teacher_forwards) == (num_shards(manifest), 0, 0)
    assert report.rebuilt_because == ()
    assert_bit_equal(store, reference)
    open_cache(store)


@pytest.mark.parametrize(("change", "named"), [
    ({"views": 2}, "views.num_views: 2 → 3"), ({"seed": 1}, "views.seed: 1 → 0"),
    ({"policy": {"kind": "pad_crop", "pad": 2}}, "views.policy.kind: pad_crop → rrc"),
    ({"logits_dtype": "float16"}, "dtypes.logits: float16 → float32"),
])
def test_changed_content_settings_recreate_the_store(embedded_cache, manifest, teacher_file, embed_settings,
                                                     tmp_path, change, named, monkeypatch) -> None:
    """A half-made store from other settings is started over, never mixed in, and the
    report names the inputs that differ."""
    reference, _ = embedded_cache
    store = tmp_path / "changed.zarr"
    other = EmbedConfig.from_mapping({**embed_settings.to_dict(), **change}, section="embed")
    original, calls = embed_module.embed_shard, []

    def stop_after_two(task):
        calls.append(task.start)
        if len(calls) > 2:
            raise RuntimeError("stop")
        return original(task)

    monkeypatch.setattr(embed_module, "embed_shard", stop_after_two)
    with pytest.raises(RuntimeError, match="stop"):
        run_embed(settings=other, manifest=manifest, teacher_path=teacher_file, store_path=store)
    assert done_flags(store).sum() == 2
    monkeypatch.setattr(embed_module, "embed_shard", original)
    report = run_embed(settings=embed_settings, manifest=manifest, teacher_path=teacher_file, store_path=store)
    assert report.resumed_shards == 0 and report.written_shards == num_shards(manifest)
    assert named in report.rebuilt_because, report.rebuilt_because
    assert_bit_equal(store, reference)


def _rewrite_member(tiny, tar: Path, member: str, data: bytes) -> None:
    members = tiny.read_tar(tar)
    assert member in members
    members[member] = data
    tiny.write_tar(tar, members)


def test_corrupt_image_inside_a_shard_names_the_shard_and_the_key(manifest, shards_dir, teacher_file,
                                                                   embed_settings, tiny, tmp_path) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(shards_dir, shards)
    shard = manifest.split("train")["shards"][1]
    row = shard["start"] + 1
    key = f"{row:0{L.KEY_DIGITS}d}"
    garbage = b"\xff\xd8\xff\xe0 not a jpeg any more"
    _rewrite_member(tiny, shards / shard["file"], f"{key}.jpg", garbage)

    with pytest.raises(CorruptSampleError) as info:
        run_embed(settings=embed_settings, manifest=load_manifest(shards), teacher_path=teacher_file,
                  store_path=tmp_path / "a.zarr")
    message = str(info.value)
    assert shard["file"] in message and f"sample {key}" in message and "content hash" in message
    assert done_flags(tmp_path / "a.zarr").tolist()[:1] == [1]  # the shard before it finished

    # With a manifest that agrees with the new bytes, decoding itself fails, naming both too.
    data = json.loads((shards / L.MANIFEST_NAME).read_text())
    record = data["splits"]["train"]["rows"]["sample_sha256"]
    hashes = np.load(shards / record["file"])
    hashes[row] = np.frombuffer(bytes.fromhex(content_hash(garbage)), dtype=np.uint8)
    np.save(shards / record["file"], hashes)
    record["sha256"] = file_sha256(shards / record["file"])
    (shards / L.MANIFEST_NAME).write_text(json.dumps(data, sort_keys=True, indent=1) + "\n")
    with pytest.raises(CorruptSampleError) as info:
        run_embed(settings=embed_settings, manifest=load_manifest(shards), teacher_path=teacher_file,
                  store_path=tmp_path / "b.zarr")
    message = str(info.value)
    assert shard["file"] in message and f"sample {key}" in message and "cannot decode" in message


def test_a_teacher_without_preprocess_is_refused_clearly(manifest, embed_settings, tmp_path) -> None:
    name, kwargs = "pipeline.models.cifar_resnet:resnet8", {"width": 4}
    bare = tmp_path / "bare.pt"
    save_model(bare, build_model(name, num_classes=3, in_chans=3, model_kwargs=kwargs).eval(),
               spec={"name": name, "num_classes": 3, "in_chans": 3, "model_kwargs": kwargs})
    with pytest.raises(ModelFileError, match=r"bare\.pt: its spec has preprocess = None.*cifd teacher"):
        run_embed(settings=embed_settings, manifest=manifest, teacher_path=bare, store_path=tmp_path / "c.zarr")
    assert not (tmp_path / "c.zarr").exists()


# One writer, nothing lost, nothing silently wrong -------------------------------------------


def test_a_second_embed_is_refused_at_once_naming_the_holder(embed_settings, manifest, teacher_file, shards_dir,
                                                             tmp_path) -> None:
    store = tmp_path / "locked.zarr"
    with writer_lock(store, command="cifd embed (the first run)"):
        with pytest.raises(StoreLockedError, match=rf"{store} is being written by pid {os.getpid()} on "):
            run_embed(settings=embed_settings, manifest=manifest, teacher_path=teacher_file, store_path=store)
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump({
            "paths": {"shards": str(shards_dir), "teacher": str(teacher_file), "cache": str(store),
                      "metrics": str(tmp_path / "metrics")},
            "embed": embed_settings.to_dict()}))
        result = CliRunner().invoke(main, ["embed", "--params", str(params)])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert f"pid {os.getpid()}" in result.output and "the first run" in result.output
    assert not store.exists()


def test_an_unreadable_store_is_reported_and_kept(embedded_cache, manifest, teacher_file, embed_settings,
                                                  tmp_path) -> None:
    reference, _ = embedded_cache
    store = tmp_path / "broken.zarr"
    shutil.copytree(reference, store)
    (store / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gr')  # a truncated write
    files = sorted(p.relative_to(store) for p in store.rglob("*"))
    with pytest.raises(CacheError, match=r"existing teacher cache at .* cannot be read .*left as it is: restore it"):
        run_embed(settings=embed_settings, manifest=manifest, teacher_path=teacher_file, store_path=store)
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == files


def test_a_store_of_an_old_schema_is_rebuilt_saying_why(embedded_cache, manifest, teacher_file, embed_settings,
                                                        tmp_path) -> None:
    reference, _ = embedded_cache
    store = tmp_path / "old.zarr"
    shutil.copytree(reference, store)
    zarr.open_group(store, mode="r+").attrs[L.ATTR_SCHEMA] = 1
    report = run_embed(settings=embed_settings, manifest=manifest, teacher_path=teacher_file, store_path=store)
    assert report.rebuilt_because == (f"schema_version: 1 → {L.CACHE_SCHEMA_VERSION}",)
    assert report.written_shards == num_shards(manifest)
    assert_bit_equal(store, reference)
    assert not list(tmp_path.glob(".old.zarr.*"))  # no working copies left beside it


def _broken_teacher(teacher_file: Path, path: Path, edit) -> Path:
    model, spec = load_model(teacher_file)
    with torch.no_grad():
        edit(model.backbone.layer3[0].bn2)
    save_model(path, model.eval(), spec=spec)
    return path


def test_embed_stops_on_a_nan_teacher_output_naming_shard_and_row(manifest, teacher_file, embed_settings,
                                                                  tmp_path) -> None:
    teacher = _broken_teacher(teacher_file, tmp_path / "nan.safetensors",
                              lambda bn: bn.running_var.__setitem__(0, -1.0))  # sqrt(-1): NaN in channel 0
    store = tmp_path / "nan.zarr"
    first = manifest.split("train")["shards"][0]["file"]
    with pytest.raises(TeacherOutputError, match=rf"embed train shard {first} \(rows 0:4\): the teacher's "
                                                 r"embeddings are NaN or inf at row 0 view 0 .*nothing of this shard"):
        run_embed(settings=embed_settings, manifest=manifest, teacher_path=teacher, store_path=store)
    assert not done_flags(store).any()
    assert zarr.open_group(store, mode="r").attrs[L.ATTR_COMPLETE] is False


def test_embed_stops_on_a_float16_overflow_of_the_embeddings(manifest, teacher_file, embed_settings,
                                                            tmp_path) -> None:
    def scale_up(bn) -> None:
        bn.weight.mul_(1e6)
        bn.bias.add_(1e6)

    teacher = _broken_teacher(teacher_file, tmp_path / "huge.safetensors", scale_up)
    with pytest.raises(TeacherOutputError, match=r"shard train-000000\.tar \(rows 0:4\): the teacher's embeddings "
                                                 r"value .* at row 0 view 0 overflows float16 \(largest 65504\)"):
        run_embed(settings=embed_settings, manifest=manifest, teacher_path=teacher,
                  store_path=tmp_path / "huge.zarr")
