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
def mixed_cache(tmp_path_factory: pytest.TempPathFactory, embed_settings, manifest, teacher_file):
    settings = dataclasses.replace(embed_settings, views=4, mixup=MixupConfig(views=2, alpha=0.5))
    path = tmp_path_factory.mktemp("mixed") / "teacher.zarr"
    before = torch.get_num_threads()
    try:
        run_embed(settings=settings, manifest=manifest, teacher_path=teacher_file, store_path=path)
    finally:
        torch.set_num_threads(before)
    return path


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
