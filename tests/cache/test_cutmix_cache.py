"""A cache with CutMix views (``embed.mixup.cutmix``): schema 5 with ten mix fields, its blend
view drawn as in a mixup-only cache, every cached CutMix view the teacher's output on the
pasted image rebuilt here with numpy slicing, stage three replaying those pixels in memory
and stream modes alike, and a cache whose mix array disagrees with its provenance refused."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import zarr

from pipeline.cache.reader import open_cache
from pipeline.data.preprocess import Preprocess
from pipeline.data.shards import load_split
from pipeline.data.views import render_pixels
from pipeline.models import load_model
from schemas import layout as L


@pytest.fixture(scope="module")
def cutmix_cache(mixed_caches):
    """Views 0-1 plain, view 2 a blend (mixup), view 3 CutMix."""
    return mixed_caches(1)


@pytest.fixture(scope="module")
def blend_cache(mixed_caches):
    """The same settings without CutMix: views 2 and 3 both blends."""
    return mixed_caches(0)


def test_a_cutmix_cache_is_schema_5_and_its_blend_view_is_the_mixup_caches(cutmix_cache, blend_cache) -> None:
    assert zarr.open_group(cutmix_cache, mode="r").attrs[L.ATTR_SCHEMA] == 5
    cache = open_cache(cutmix_cache)
    assert cache.mixup["views"] == 2 and cache.mixup["cutmix"] == 1
    fields = (L.MIX_PARTNER, L.MIX, L.LOGITS, L.VIEWS)
    cut = cache.split("train").read_all(fields)
    assert cut[L.MIX].shape[1:] == (4, 10)
    assert zarr.open_group(blend_cache, mode="r").attrs[L.ATTR_SCHEMA] == 4
    blend = open_cache(blend_cache).split("train").read_all(fields)
    assert blend[L.MIX].shape[1:] == (4, 6)
    for name in (L.VIEWS, L.MIX_PARTNER, L.LOGITS):  # views 0-2 as in the mixup-only cache
        assert np.array_equal(cut[name][:, :3], blend[name][:, :3]), name
    assert np.array_equal(cut[L.MIX][:, :3, :6], blend[L.MIX][:, :3]) and (cut[L.MIX][:, :3, 6:] == 0).all()
    pasted = cut[L.MIX][:, 3, 0] < 1
    assert pasted.any() and (cut[L.MIX][pasted, 3, 8] * cut[L.MIX][pasted, 3, 9] > 0).all()
    val = cache.split("val").read_all((L.MIX,))[L.MIX]
    assert val.shape[1:] == (4, 10) and (val[..., 0] == 1).all() and (val[..., 6:] == 0).all()


def test_every_cached_cutmix_view_is_the_teacher_on_the_pasted_image(cutmix_cache, manifest, teacher_file) -> None:
    """Rebuilt one (row, view) at a time: the own view's pixels with the stored box (fractions
    of the side) copied from the partner view's pixels by numpy slicing, normalised by hand."""
    model, spec = load_model(teacher_file)
    pre = Preprocess.from_spec(spec, source="teacher")
    s = pre.image_size
    cache = open_cache(cutmix_cache).split("train").read_all((L.VIEWS, L.LOGITS, L.MIX_PARTNER, L.MIX))
    images = torch.from_numpy(load_split(manifest, "train").stacked())
    mean, std = np.asarray(pre.mean)[:, None, None], np.asarray(pre.std)[:, None, None]
    checked = 0
    for row in range(len(images)):
        mix, p = cache[L.MIX][row, 3], int(cache[L.MIX_PARTNER][row, 3])
        own = render_pixels(images[row:row + 1], torch.from_numpy(cache[L.VIEWS][row, 3])[None], out_size=s,
                            interpolation=pre.interpolation, channels=3)[0].numpy()
        other = render_pixels(images[p:p + 1], torch.from_numpy(mix[1:6])[None], out_size=s,
                              interpolation=pre.interpolation, channels=3)[0].numpy()
        top, left, height, width = (int(round(float(f) * s)) for f in mix[6:])
        if mix[0] < 1:
            assert height * width > 0 and mix[0] == np.float32(1 - height * width / s ** 2)
            own[:, top:top + height, left:left + width] = other[:, top:top + height, left:left + width]
            checked += 1
        x = torch.from_numpy(((own - mean) / std).astype(np.float32))[None]
        with torch.inference_mode():
            logits = model.eval()(x)[0].numpy()
        np.testing.assert_allclose(cache[L.LOGITS][row, 3], logits, rtol=0, atol=1e-4)
    assert checked > len(images) // 2


def test_stage_three_replays_the_pasted_pixels_in_memory_and_stream_modes(cutmix_cache, manifest,
                                                                         teacher_file) -> None:
    """Every row of one epoch on its CutMix view: the memory batch and the stream batch
    (one worker) give the same input bits and (label, partner label, λ), and the teacher
    on that input gives the cached logits."""
    from pipeline.train.batches import MemoryBatches
    from pipeline.train.stream import StreamBatches
    from pipeline.train.targets import load_targets, target_fields

    model, spec = load_model(teacher_file)
    pre = Preprocess.from_spec(spec, source="teacher")
    cache = open_cache(cutmix_cache)
    targets = load_targets(cache, None, method="kd", device=torch.device("cpu"))
    images = torch.from_numpy(load_split(manifest, "train").stacked())
    n = targets.num_rows
    choice = torch.full((n,), 3)
    memory = MemoryBatches(images, targets, preprocess=pre, batch_size=6, rank=0, world=1)
    stream = StreamBatches(manifest, "train", teacher=cache.split("train"), rdm=None,
                           fields=target_fields("kd", cache.logits_format, mixed=True), preprocess=pre, batch_size=6,
                           workers=1, device=torch.device("cpu"), rank=0, world=1, seed=0, shuffle_buffer=4)
    raw = cache.split("train").read_all((L.MIX, L.LOGITS))

    def by_row(source) -> dict[int, tuple]:
        out = {}
        for rows, _, x, batch in source(0, torch.arange(n), choice):
            partner_labels, lam = batch.mix_labels
            for i, r in enumerate(rows.tolist()):
                out[r] = (x[i], int(batch.labels[i]), int(partner_labels[i]), float(lam[i]))
        return out

    held, streamed = by_row(memory), by_row(stream)
    assert sorted(held) == sorted(streamed) == list(range(n))
    for r in range(n):
        assert torch.equal(held[r][0], streamed[r][0]) and held[r][1:] == streamed[r][1:], r
        assert held[r][3] == float(raw[L.MIX][r, 3, 0])
        with torch.inference_mode():
            np.testing.assert_allclose(model.eval()(held[r][0][None])[0].numpy(), raw[L.LOGITS][r, 3], rtol=0,
                                       atol=1e-4)


def test_cache_verify_replays_cutmix_views_and_cache_info_names_them(cutmix_cache, manifest, teacher_file) -> None:
    from click.testing import CliRunner

    from pipeline.cache.inspect import verify_cache
    from stages.cli import main

    report = verify_cache(cutmix_cache, teacher=teacher_file, shards=manifest.root, samples=1000, seed=0,
                          tolerance=1e-3, full=True)
    assert report.ok, report.problems
    result = CliRunner().invoke(main, ["cache", "info", str(cutmix_cache)])
    assert result.exit_code == 0, result.output
    assert "cutmix     the last 1 of those paste a box of the partner (CutMix) instead of blending" in result.output


def test_a_cache_whose_mix_array_disagrees_with_its_provenance_is_refused(blend_cache, tmp_path) -> None:
    """A mixup-only cache whose provenance was rewritten to claim CutMix views (schema and
    fingerprint rewritten to match, so only the array's width can tell): its six-field
    views would have been rendered as blends, so it is refused before anything reads them."""
    import shutil

    from pipeline.cache.store import CacheError, fingerprint

    bad = tmp_path / "bad.zarr"
    shutil.copytree(blend_cache, bad)
    root = zarr.open_group(bad, mode="r+", use_consolidated=False)
    prov = dict(root.attrs[L.ATTR_PROVENANCE])
    prov["views"] = {**prov["views"], "mixup": {**prov["views"]["mixup"], "cutmix": 1}}
    root.attrs.update({L.ATTR_PROVENANCE: prov, L.ATTR_FINGERPRINT: fingerprint(prov), L.ATTR_SCHEMA: 5})
    zarr.consolidate_metadata(str(bad))
    with pytest.raises(CacheError, match=r"split train's mix fields is \(6,\), expected \(10,\)"):
        open_cache(bad)


def test_mix_params_no_draw_makes_are_refused_when_read(cutmix_cache, tmp_path) -> None:
    """A λ above 1 written into a copy (a fresh crc32c, so only the range check can tell): the
    read that would train on it fails with one line naming split, array and row."""
    import shutil

    from pipeline.cache.store import CacheCorruptError

    bad = tmp_path / "bad.zarr"
    shutil.copytree(cutmix_cache, bad)
    mix = zarr.open_group(bad, mode="r+", use_consolidated=False)["train"][L.MIX]
    row = np.asarray(mix[5:6])
    row[0, -1, 0] = 1.5
    mix[5:6] = row
    split = open_cache(bad).split("train")
    split.read(0, 5, [L.MIX])  # the rows before it still read
    with pytest.raises(CacheCorruptError, match=r"split train array mix: rows 5 \(1 row\) hold mix params out of range"):
        split.read(0, split.num_rows, [L.MIX])
