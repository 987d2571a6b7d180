"""A cache with mixed views (``embed.mixup``): schema 4 with the partner and mix arrays, the
val split unmixed, the unmixed views identical to a cache without mixup, and every cached
mixed view the teacher's output on the mixed image rebuilt here from the shards."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import zarr

from pipeline.cache.embed import run_embed
from pipeline.cache.reader import open_cache
from pipeline.data.preprocess import Preprocess, render_inputs
from pipeline.data.shards import load_split
from pipeline.models import load_model
from schemas import layout as L
from schemas.config import MixupConfig


@pytest.fixture(scope="module")
def mixed_cache(mixed_caches):
    """Views 0-1 plain, views 2-3 blends."""
    return mixed_caches(0)


def test_a_mixed_cache_is_schema_4_and_holds_partners_in_the_same_shard(mixed_cache, manifest) -> None:
    cache = open_cache(mixed_cache)
    assert zarr.open_group(mixed_cache, mode="r").attrs[L.ATTR_SCHEMA] == 4
    assert cache.mixup["views"] == 2 and cache.mixup["alpha"] == 0.5
    train = cache.split("train").read_all((L.MIX_PARTNER, L.MIX))
    partner, mix = train[L.MIX_PARTNER], train[L.MIX]
    rows = np.arange(len(partner))[:, None]
    assert (partner[:, :2] == rows).all() and (mix[:, :2, 0] == 1).all() and (mix[:, 2:, 0] < 1).all()
    for shard in manifest.split("train")["shards"]:
        a, b = shard["start"], shard["stop"]
        assert ((partner[a:b, 2:] >= a) & (partner[a:b, 2:] < b)).all()
    val = cache.split("val").read_all((L.MIX_PARTNER, L.MIX))
    assert (val[L.MIX_PARTNER] == np.arange(len(val[L.MIX]))[:, None]).all() and (val[L.MIX][..., 0] == 1).all()


def test_the_unmixed_views_are_those_of_a_cache_without_mixup(mixed_cache, embed_settings, manifest, teacher_file,
                                                               tmp_path) -> None:
    plain = tmp_path / "plain.zarr"
    run_embed(settings=dataclasses.replace(embed_settings, views=4), manifest=manifest, teacher_path=teacher_file,
              store_path=plain)
    a = open_cache(plain).split("train").read_all((L.VIEWS, L.LOGITS))
    b = open_cache(mixed_cache).split("train").read_all((L.VIEWS, L.LOGITS))
    assert np.array_equal(a[L.VIEWS], b[L.VIEWS])  # the mixed views' own boxes too
    assert np.array_equal(a[L.LOGITS][:, :2], b[L.LOGITS][:, :2])
    assert not np.allclose(a[L.LOGITS][:, 2:], b[L.LOGITS][:, 2:])  # the mixed images are other inputs


def test_every_cached_mixed_view_is_the_teacher_on_the_mixed_image(mixed_cache, manifest, teacher_file) -> None:
    """Rebuilt one (row, view) at a time from the decoded shards: λ · own view + (1 − λ) ·
    the partner's view, through the teacher."""
    model, spec = load_model(teacher_file)
    pre = Preprocess.from_spec(spec, source="teacher")
    cache = open_cache(mixed_cache).split("train").read_all((L.VIEWS, L.LOGITS, L.MIX_PARTNER, L.MIX))
    images = torch.from_numpy(load_split(manifest, "train").stacked())
    for row in range(len(images)):
        for view in (2, 3):
            p = int(cache[L.MIX_PARTNER][row, view])
            x = render_inputs(images[row:row + 1], torch.from_numpy(cache[L.VIEWS][row, view])[None], preprocess=pre,
                              mix=(images[p:p + 1], torch.from_numpy(cache[L.MIX][row, view])[None]))
            with torch.inference_mode():
                logits = model.eval()(x)[0].numpy()
            np.testing.assert_allclose(cache[L.LOGITS][row, view], logits, rtol=0, atol=1e-4)


def test_mixed_views_must_leave_the_clean_view(embed_settings) -> None:
    from schemas.base import ConfigError
    from schemas.config import EmbedConfig

    with pytest.raises(ConfigError, match=r"embed.mixup.views' = 3: expected < embed.views \(3\)"):
        EmbedConfig.from_mapping({**embed_settings.to_dict(), "mixup": {"views": 3}}, section="embed")


def test_stage_three_replays_the_mixed_pixels_embed_fed_the_teacher(mixed_cache, manifest, teacher_file) -> None:
    """Memory mode, every (row, view) of one epoch: the student's input is the mixed image
    (the teacher on it gives the cached logits), and its CE target is (partner label, λ)."""
    from pipeline.train.batches import MemoryBatches
    from pipeline.train.targets import load_targets

    model, spec = load_model(teacher_file)
    pre = Preprocess.from_spec(spec, source="teacher")
    cache = open_cache(mixed_cache)
    targets = load_targets(cache, None, method="kd", device=torch.device("cpu"))
    images = torch.from_numpy(load_split(manifest, "train").stacked())
    source = MemoryBatches(images, targets, preprocess=pre, batch_size=5, rank=0, world=1)
    n = targets.num_rows
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    choice = torch.tensor([2, 3, 0, 1] * n)[:n]  # mixed and plain views alike
    raw = cache.split("train").read_all((L.MIX_PARTNER, L.MIX, L.LABELS, L.LOGITS, L.VIEWS))
    seen = 0
    for rows, views, x, batch in source(0, order, choice):
        with torch.inference_mode():
            logits = model.eval()(x)
        assert batch.mix_labels is not None
        partner_labels, lam = batch.mix_labels
        for i, (r, v) in enumerate(zip(rows.tolist(), views.tolist(), strict=True)):
            p = int(raw[L.MIX_PARTNER][r, v])
            expected = render_inputs(images[r:r + 1], torch.from_numpy(raw[L.VIEWS][r, v])[None], preprocess=pre,
                                     mix=(images[p:p + 1], torch.from_numpy(raw[L.MIX][r, v])[None]))[0]
            assert torch.equal(x[i], expected)
            np.testing.assert_allclose(logits[i].numpy(), raw[L.LOGITS][r, v], rtol=0, atol=1e-4)
            assert int(partner_labels[i]) == int(raw[L.LABELS][p]) and float(lam[i]) == float(raw[L.MIX][r, v, 0])
            seen += 1
    assert seen == n


def test_a_mixed_views_ce_target_is_lambda_of_each_label() -> None:
    """CE on a mixed view = λ · CE(label) + (1 − λ) · CE(partner's label), by hand."""
    import torch.nn.functional as F

    from pipeline.train.objective import LossWeights, method_loss
    from pipeline.train.student import StudentOutput
    from pipeline.train.targets import Batch

    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    labels, partners, lam = torch.tensor([0, 2]), torch.tensor([1, 2]), torch.tensor([0.25, 1.0])
    batch = Batch(labels=labels, teacher_logits=torch.zeros(2, 3), teacher_emb=None, rdm_logits=None, rdm_emb=None,
                  mix_labels=(partners, lam))
    weights = LossWeights(temperature=1.0, kd_alpha=0.5, ce_weight=1.0, kl_weight=1.0, rdm_weights=None,
                          feature_weight=0.0, rate_weight=0.0, kd_dropout=0.0, distortion="mse", ckd_weight=0.0)
    loss = method_loss("ce", out=StudentOutput(logits, None, None), batch=batch, weights=weights,
                       rdm_weights=torch.zeros(0), emb_scale=1.0, generator=torch.Generator())
    logp = F.log_softmax(logits, -1)
    by_hand = -(0.25 * logp[0, 0] + 0.75 * logp[0, 1] + 1.0 * logp[1, 2]) / 2
    assert float(loss) == pytest.approx(float(by_hand), abs=1e-6)


def test_cache_verify_replays_mixed_views_and_catches_a_wrong_partner(mixed_cache, manifest, teacher_file,
                                                                       tmp_path) -> None:
    """Every pair sampled (all 27 × 4 train pairs): the mixed ones re-run on the mixed image.
    A cache whose recorded partners were swapped (edited, then its digests rewritten, so only
    the replay can tell) is caught."""
    import shutil

    from pipeline.cache.inspect import verify_cache
    from pipeline.cache.store import shard_digest

    report = verify_cache(mixed_cache, teacher=teacher_file, shards=manifest.root, samples=1000, seed=0,
                          tolerance=1e-3, full=True)
    assert report.ok, report.problems
    bad = tmp_path / "bad.zarr"
    shutil.copytree(mixed_cache, bad)
    root = zarr.open_group(bad, mode="r+", use_consolidated=False)
    group = root["train"]
    names = open_cache(mixed_cache).split("train").row_arrays
    a, b = group.attrs["shard_bounds"][0]
    partner = np.asarray(group[L.MIX_PARTNER][a:b])
    partner[:, 2:] = partner[::-1, 2:]  # other rows of the same shard
    group[L.MIX_PARTNER][a:b] = partner
    rows = {n: np.asarray(group[n][a:b]) for n in names}
    group[L.SHARD_SHA256][0] = np.frombuffer(shard_digest(rows, names), dtype=np.uint8)
    zarr.consolidate_metadata(str(bad))
    report = verify_cache(bad, teacher=teacher_file, shards=manifest.root, samples=1000, seed=0, tolerance=1e-3,
                          full=True)
    assert not report.ok and not any("checksum" in p or "digest" in p for p in report.problems), report.problems
    assert any("train" in p and ("logits" in p or "embedding" in p) for p in report.problems), report.problems


@pytest.mark.parametrize("workers", [0, 1])
def test_the_stream_replays_the_same_mixed_inputs_and_targets_as_memory_mode(mixed_cache, manifest, teacher_file,
                                                                             workers: int) -> None:
    from pipeline.train.batches import MemoryBatches
    from pipeline.train.stream import StreamBatches
    from pipeline.train.targets import load_targets, target_fields

    _, spec = load_model(teacher_file)
    pre = Preprocess.from_spec(spec, source="teacher")
    cache = open_cache(mixed_cache)
    targets = load_targets(cache, None, method="kd", device=torch.device("cpu"))
    images = torch.from_numpy(load_split(manifest, "train").stacked())
    n = targets.num_rows
    choice = torch.tensor([3, 2, 1, 0] * n)[:n]
    memory = MemoryBatches(images, targets, preprocess=pre, batch_size=6, rank=0, world=1)
    stream = StreamBatches(manifest, "train", teacher=cache.split("train"), rdm=None,
                           fields=target_fields("kd", cache.logits_format, mixed=True), preprocess=pre, batch_size=6,
                           workers=workers, device=torch.device("cpu"), rank=0, world=1, seed=0, shuffle_buffer=4)

    def by_row(source) -> dict[int, tuple]:
        out = {}
        for rows, _, x, batch in source(0, torch.arange(n), choice):
            partner_labels, lam = batch.mix_labels
            for i, r in enumerate(rows.tolist()):
                out[r] = (x[i], int(batch.labels[i]), int(partner_labels[i]), float(lam[i]), batch.teacher_logits[i])
        return out

    held, streamed = by_row(memory), by_row(stream)
    assert sorted(held) == sorted(streamed) == list(range(n))
    for r in range(n):
        a, b = held[r], streamed[r]
        assert torch.equal(a[0], b[0]) and a[1:4] == b[1:4] and torch.equal(a[4], b[4]), r


def test_images_of_many_sizes_mix_in_the_stream_worker_as_in_memory(tmp_path, tiny, teacher_file, embed_settings) -> None:
    """Images of many sizes: the stream's worker renders the mix itself; memory mode renders
    one by one on the host; both give the pixels embed fed the teacher."""
    from pipeline.data.prepare import prepare_dataset
    from pipeline.data.shards import load_manifest
    from pipeline.train.batches import MemoryBatches
    from pipeline.train.stream import StreamBatches
    from pipeline.train.targets import load_targets, target_fields
    from schemas.config import PrepareConfig

    rng = np.random.default_rng(0)
    members = {f"train/{c}/{i:04d}.png": tiny.encode_image(
        rng.integers(0, 256, (int(rng.integers(10, 30)), int(rng.integers(10, 30)), 3), dtype=np.uint8), "png")
        for c in ("cat", "dog", "frog") for i in range(6)}
    tar = tiny.write_tar(tmp_path / "src.tar", members)
    prepare_dataset(PrepareConfig(source="imagefolder", train=str(tar), val_fraction=0.25, samples_per_shard=4),
                    tmp_path / "shards")
    manifest = load_manifest(tmp_path / "shards")
    settings = dataclasses.replace(embed_settings, views=3, mixup=MixupConfig(views=1, alpha=1.0))
    run_embed(settings=settings, manifest=manifest, teacher_path=teacher_file, store_path=tmp_path / "c.zarr")
    model, spec = load_model(teacher_file)
    pre = Preprocess.from_spec(spec, source="teacher")
    cache = open_cache(tmp_path / "c.zarr")
    targets = load_targets(cache, None, method="kd", device=torch.device("cpu"))
    images = [torch.from_numpy(im) for im in load_split(manifest, "train").images]
    n = len(images)
    choice = torch.full((n,), 2)
    memory = MemoryBatches(images, targets, preprocess=pre, batch_size=5, rank=0, world=1)
    stream = StreamBatches(manifest, "train", teacher=cache.split("train"), rdm=None,
                           fields=target_fields("kd", cache.logits_format, mixed=True), preprocess=pre, batch_size=5,
                           workers=1, device=torch.device("cpu"), rank=0, world=1, seed=0, shuffle_buffer=3)
    held = {r: x for rows, _, xs, _ in memory(0, torch.arange(n), choice) for r, x in zip(rows.tolist(), xs)}
    streamed = {r: x for rows, _, xs, _ in stream(0, torch.arange(n), choice) for r, x in zip(rows.tolist(), xs)}
    assert sorted(held) == sorted(streamed) == list(range(n))
    logits = open_cache(tmp_path / "c.zarr").split("train").read_all((L.LOGITS,))[L.LOGITS]
    for r in range(n):
        assert torch.equal(held[r], streamed[r])
        with torch.inference_mode():
            np.testing.assert_allclose(model.eval()(held[r][None])[0].numpy(), logits[r, 2], rtol=0, atol=1e-4)


def test_cache_info_names_the_mixed_views(mixed_cache, embedded_cache) -> None:
    from click.testing import CliRunner

    from stages.cli import main

    result = CliRunner().invoke(main, ["cache", "info", str(mixed_cache)])
    assert result.exit_code == 0, result.output
    assert "mixup      the last 2 views of every train image mixed, lambda ~ Beta(0.5, 0.5)" in result.output
    plain = CliRunner().invoke(main, ["cache", "info", str(embedded_cache[0])])
    assert plain.exit_code == 0 and "mixup" not in plain.output
