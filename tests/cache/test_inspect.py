"""``cifd cache info`` / ``cifd cache verify``: describe a cache, and catch a tampered one."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
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


def test_verify_passes_on_a_good_cache_and_covers_both_splits(embedded_cache, teacher_file, shards_dir) -> None:
    store, _ = embedded_cache
    report = verify_cache(store, teacher=teacher_file, shards=shards_dir, samples=40, seed=0, tolerance=1e-2)
    assert report.ok and report.problems == []
    assert set(report.splits) == {"train", "val"}
    assert report.splits["train"].samples == 40
    assert report.splits["val"].samples == 9 * 3  # capped at every (row, view) pair
    for check in report.splits.values():
        assert check.top1_agreement == 1.0
        assert check.logits_rel_err < 1e-4 and check.embedding_rel_err < 5e-3
        assert check.embedding_min_cosine > 0.999
    assert 0 < report.shards_checked <= report.shards_total == 7 + 3


def test_verify_fails_on_tampered_logits(tampered, teacher_file, shards_dir) -> None:
    report = verify_cache(tampered, teacher=teacher_file, shards=shards_dir, samples=81, seed=0, tolerance=1e-2)
    assert not report.ok
    assert report.splits["train"].logits_rel_err > 0.1
    assert report.splits["train"].embedding_rel_err < 5e-3  # only the logits were touched
    assert any("shard 1 (rows 4:8)" in p and "content sha256 mismatch" in p for p in report.problems)


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


@pytest.fixture
def params_file(embedded_cache, teacher_file, shards_dir, tmp_path) -> Path:
    """A user's params: where their cache, teacher and shards are."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"paths": {"cache": str(embedded_cache[0]), "teacher": str(teacher_file),
                                              "shards": str(shards_dir)}}))
    return path


def store_copy(embedded_cache, tmp_path: Path) -> Path:
    path = tmp_path / "copy.zarr"
    shutil.copytree(embedded_cache[0], path)
    return path


def flip_byte(file: Path, offset: int = 40) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x01
    file.write_bytes(bytes(data))


def verify_json(result) -> dict:
    return json.loads(result.stdout.split("verify: ok")[0])


def test_cli_cache_verify_exit_codes(params_file, tampered, tmp_path) -> None:
    runner = CliRunner()
    good = runner.invoke(main, ["cache", "verify", "--params", str(params_file), "--samples", "30"])
    assert good.exit_code == 0, good.output
    assert verify_json(good)["ok"] is True
    assert "verify: ok" in good.output
    bad = runner.invoke(main, ["cache", "verify", str(tampered), "--params", str(params_file), "--samples", "81"])
    assert bad.exit_code == 1, bad.output
    assert "verify: FAILED" in bad.output and "content sha256 mismatch" in bad.output
    missing = runner.invoke(main, ["cache", "info", str(tmp_path / "nothing.zarr")])
    assert missing.exit_code == 2 and "no teacher cache" in missing.output


def test_cli_verify_draws_a_fresh_sample_each_run_and_repeats_a_seed(params_file) -> None:
    runner = CliRunner()
    args = ["cache", "verify", "--params", str(params_file), "--samples", "5"]
    runs = [runner.invoke(main, args) for _ in range(2)]
    seeds = []
    for run in runs:
        assert run.exit_code == 0, run.output
        printed = int(re.search(r"verify: seed (\d+) \(repeat this draw with --seed \1\)", run.stderr).group(1))
        assert verify_json(run)["seed"] == printed
        seeds.append(printed)
    assert seeds[0] != seeds[1]
    again = runner.invoke(main, [*args, "--seed", str(seeds[0])])
    assert verify_json(again) == verify_json(runs[0])


def test_cli_verify_takes_the_teacher_from_the_users_params(embedded_cache, params_file, shards_dir, teacher_file,
                                                            tmp_path, tiny) -> None:
    from pipeline.models import build_model, load_model, save_model

    store, _ = embedded_cache
    attrs = zarr.open_group(store, mode="r").attrs.asdict()
    assert str(teacher_file) not in json.dumps(attrs)  # the cache names no file to load
    _, spec = load_model(teacher_file)
    other = tmp_path / "other.safetensors"
    save_model(other, build_model(spec["name"], num_classes=3, in_chans=3, model_kwargs=spec["model_kwargs"]).eval(),
               spec=spec)
    theirs = tmp_path / "theirs.yaml"
    theirs.write_text(yaml.safe_dump({"paths": {"teacher": str(other), "shards": str(shards_dir)}}))
    refused = CliRunner().invoke(main, ["cache", "verify", str(store), "--params", str(theirs), "--samples", "4"])
    assert refused.exit_code == 2 and "another teacher" in refused.output
    flag = CliRunner().invoke(main, ["cache", "verify", str(store), "--params", str(theirs), "--samples", "4",
                                     "--teacher", str(teacher_file)])
    assert flag.exit_code == 0, flag.output


def test_verify_fails_on_nan_naming_the_row(embedded_cache, teacher_file, shards_dir, tmp_path) -> None:
    path = store_copy(embedded_cache, tmp_path)
    root = zarr.open_group(path, mode="r+")
    root["train"][L.LOGITS][5, 1, 0] = np.nan
    report = verify_cache(path, teacher=teacher_file, shards=shards_dir, samples=1000, seed=0, tolerance=1e-2)
    assert not report.ok
    assert any("split train array logits: rows 5 (1 row) hold NaN or inf" in p for p in report.problems)


def test_verify_covers_val(embedded_cache, teacher_file, shards_dir, tmp_path) -> None:
    path = store_copy(embedded_cache, tmp_path)
    (path / "val" / L.LOGITS / "c" / "1" / "0" / "0").unlink()  # val rows 4-7
    report = verify_cache(path, teacher=teacher_file, shards=shards_dir, samples=1000, seed=0, tolerance=1e-2)
    assert not report.ok
    assert any("split val array logits: rows 4-7 (4 rows) are missing" in p for p in report.problems)


def test_full_verify_finds_a_corrupt_shard_outside_the_sample(embedded_cache, teacher_file, shards_dir,
                                                              tmp_path) -> None:
    path = store_copy(embedded_cache, tmp_path)
    flip_byte(path / "train" / L.EMBEDDINGS / "c" / "2" / "0" / "0")  # train rows 8-11
    kwargs = {"teacher": teacher_file, "shards": shards_dir, "samples": 1, "tolerance": 1e-2}
    missed = next(seed for seed in range(50) if verify_cache(path, seed=seed, **kwargs).ok)
    full = verify_cache(path, seed=missed, full=True, **kwargs)
    assert not full.ok and full.shards_checked == full.shards_total - 1
    assert any("split train array embeddings: rows 8-9 (2 rows) cannot be read" in p for p in full.problems), \
        full.problems


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
