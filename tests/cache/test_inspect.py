"""``cifd cache info`` / ``cifd cache verify``: describe a cache, and catch a tampered one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from pipeline.cache.inspect import cache_info, verify_cache
from pipeline.cache.store import CacheError
from schemas import layout as L
from stages.cli import main

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part"),
]


@pytest.fixture(scope="module")
def tampered(embedded_cache, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session cache whose train logits of one shard are scaled by 3."""
    source, _ = embedded_cache
    path = tmp_path_factory.mktemp("tampered") / "teacher.zarr"
    shutil.copytree(source, path)
    root = zarr.open_group(path, mode="r+", use_consolidated=False)
    logits = root["train"][L.LOGITS]
    a, b = root["train"].attrs["shard_bounds"][1]
    logits[a:b] = logits[a:b] * 3.0
    return path


def test_cache_info_numbers(embedded_cache, manifest, embed_settings, teacher_file) -> None:
    store, _ = embedded_cache
    info = cache_info(store)
    assert info["teacher"] == "pipeline.models.cifar_resnet:resnet8"
    assert info["dataset_manifest_sha256"] == manifest.sha256
    assert info["classes"] == manifest.classes
    assert info["dtypes"] == {L.EMBEDDINGS: "float16", L.LOGITS: "float32", L.VIEWS: "float32"}
    assert info["views"]["num_views"] == embed_settings.views
    assert info["classifier_check"]["reproduces_logits"] is True
    for split in L.SPLITS:
        s = info["splits"][split]
        entry = manifest.split(split)
        assert (s["N"], s["V"], s["D"], s["C"]) == (entry["num_samples"], embed_settings.views, 16, 3)
        assert s["shards"] == len(entry["shards"])
        # raw bytes per (sample, view): D*2 + C*4 + 5*4 + (labels + index) 16 / V
        assert s["bytes_per_sample_view_raw"] == pytest.approx(16 * 2 + 3 * 4 + 5 * 4 + 16 / embed_settings.views,
                                                               abs=0.1)
        assert s["bytes_per_sample_view_stored"] > 0
    assert info["compression_ratio"] > 0
    assert len(info["fingerprint"]) == 64


def test_verify_passes_on_a_good_cache(embedded_cache, teacher_file, shards_dir) -> None:
    store, _ = embedded_cache
    report = verify_cache(store, teacher=teacher_file, shards=shards_dir, samples=40, seed=0, tolerance=1e-2)
    assert report.ok
    assert report.samples == 40
    assert report.top1_agreement == 1.0
    assert report.logits_rel_err < 1e-4 and report.embedding_rel_err < 5e-3
    assert report.embedding_min_cosine > 0.999
    val = verify_cache(store, teacher=teacher_file, shards=shards_dir, samples=1000, seed=1, tolerance=1e-2,
                       split="val")
    assert val.ok and val.samples == 9 * 3  # capped at every (row, view) pair


def test_verify_fails_on_tampered_logits(tampered, teacher_file, shards_dir) -> None:
    report = verify_cache(tampered, teacher=teacher_file, shards=shards_dir, samples=81, seed=0, tolerance=1e-2)
    assert not report.ok
    assert report.logits_rel_err > 0.1
    assert report.embedding_rel_err < 5e-3  # only the logits were touched


def test_verify_refuses_another_teacher(embedded_cache, shards_dir, tmp_path, tiny) -> None:
    from pipeline.models import build_model, save_model

    store, _ = embedded_cache
    other = tmp_path / "other.pt"
    name, kwargs = "pipeline.models.cifar_resnet:resnet8", {"width": 4}
    save_model(other, build_model(name, num_classes=3, in_chans=3, model_kwargs=kwargs).eval(), spec={
        "name": name, "num_classes": 3, "in_chans": 3, "model_kwargs": kwargs, "preprocess": dict(tiny.preprocess)})
    with pytest.raises(CacheError, match="teacher state-dict sha256 .* another teacher"):
        verify_cache(store, teacher=other, shards=shards_dir, samples=8, seed=0, tolerance=1e-2)


def test_cli_cache_info(embedded_cache) -> None:
    store, _ = embedded_cache
    runner = CliRunner()
    result = runner.invoke(main, ["cache", "info", str(store)])
    assert result.exit_code == 0, result.output
    assert "train      N=27 V=3 D=16 C=3 shards=7" in result.output
    assert "compression ratio" in result.output
    result = runner.invoke(main, ["cache", "info", "--json", str(store)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["splits"]["val"]["N"] == 9


def test_cli_cache_verify_exit_codes(embedded_cache, tampered, tmp_path) -> None:
    store, _ = embedded_cache
    runner = CliRunner()
    good = runner.invoke(main, ["cache", "verify", str(store), "--samples", "30"])
    assert good.exit_code == 0, good.output
    assert json.loads(good.stdout.split("verify:")[0])["ok"] is True
    assert "verify: ok" in good.output
    bad = runner.invoke(main, ["cache", "verify", str(tampered), "--samples", "81"])
    assert bad.exit_code == 1, bad.output
    assert "verify: FAILED" in bad.output
    missing = runner.invoke(main, ["cache", "info", str(tmp_path / "nothing.zarr")])
    assert missing.exit_code == 2 and "no teacher cache" in missing.output


def test_cli_cache_refuses_an_incomplete_store(embedded_cache, tmp_path) -> None:
    source, _ = embedded_cache
    path = tmp_path / "partial.zarr"
    shutil.copytree(source, path)
    root = zarr.open_group(path, mode="r+")
    root.attrs[L.ATTR_COMPLETE] = False
    root["train"][L.DONE][2] = 0
    result = CliRunner().invoke(main, ["cache", "info", str(path)])
    assert result.exit_code == 2
    assert "incomplete" in result.output and "'train': '6/7'" in result.output and "rerun `cifd embed`" in result.output
    assert np.asarray(zarr.open_group(path, mode="r")["val"][L.DONE][:]).all()
