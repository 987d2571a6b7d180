"""The stages on a damaged cache: `cifd rdm`, stage three's read and `cifd cache verify`
refuse a missing chunk naming split, array and rows; `cifd rdm` writes its model file and
store as a pair and leaves the old pair when it fails."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
import zarr
from click.testing import CliRunner

from pipeline.cache.rdm_store import open_rdm_cache
from pipeline.cache.reader import open_cache
from pipeline.cache.store import CacheCorruptError
from pipeline.models.files import read_tensor_file
from pipeline.train.targets import load_targets
from schemas import layout as L
from stages.cli import main

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part"),
]

RDM = {"rate_weights": [4.0, 1.0], "hidden": 8, "epochs": 1, "batch_size": 32, "device": "cpu", "threads": 1,
       "seed": 0}
MISSING = r"teacher cache .* split train array logits: rows 4-7 \(4 rows\) are missing"


@pytest.fixture
def project(embedded_cache, shards_dir, teacher_file, tmp_path: Path):
    """A copy of the session cache and params pointing at it; ``damage()`` deletes the
    Zarr shard file of train/logits rows 4-7."""
    cache = tmp_path / "cache" / "teacher.zarr"
    shutil.copytree(embedded_cache[0], cache)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "paths": {"shards": str(shards_dir), "teacher": str(teacher_file), "cache": str(cache),
                  "rdm_models": str(tmp_path / "models" / "rdm.safetensors"),
                  "rdm_cache": str(tmp_path / "cache" / "rdm.zarr"), "metrics": str(tmp_path / "metrics"),
                  "plots": str(tmp_path / "plots")},
        "rdm": RDM}))

    def damage() -> None:
        (cache / "train" / L.LOGITS / "c" / "1" / "0" / "0").unlink()

    return cache, params, damage, tmp_path


def _files(*paths: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for path in paths
            for p in ([path] if path.is_file() else sorted(path.rglob("*"))) if p.is_file()}


def test_rdm_writes_a_pair_and_a_refused_rerun_leaves_it(project) -> None:
    cache, params, damage, root = project
    runner = CliRunner()
    first = runner.invoke(main, ["rdm", "--params", str(params)])
    assert first.exit_code == 0, first.output
    model, store = root / "models" / "rdm.safetensors", root / "cache" / "rdm.zarr"
    tensors, document = read_tensor_file(model)  # a safe tensor file, not a pickle
    assert document["config"]["rate_weights"] == RDM["rate_weights"] and all(
        isinstance(t, torch.Tensor) for t in tensors.values())
    open_rdm_cache(store, open_cache(cache), model_file=model)  # the store names this model file's sha256
    pair = _files(model, store)

    damage()
    second = runner.invoke(main, ["rdm", "--params", str(params)])
    assert second.exit_code == 2
    line = second.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and "rows 4-7 (4 rows) are missing" in line and "split train" in line
    assert _files(model, store) == pair
    assert sorted(p.name for p in (root / "cache").iterdir()) == ["rdm.zarr", "rdm.zarr.lock", "teacher.zarr"]


def test_stage_three_refuses_a_missing_chunk(project) -> None:
    cache, _, damage, _ = project
    damage()
    with pytest.raises(CacheCorruptError, match=MISSING):
        load_targets(open_cache(cache), None, method="kd", device=torch.device("cpu"))


def test_verify_refuses_a_missing_chunk(project) -> None:
    cache, params, damage, _ = project
    damage()
    result = CliRunner().invoke(main, ["cache", "verify", "--params", str(params), "--samples", "200"])
    assert result.exit_code == 1
    assert "verify: FAILED" in result.output and "split train array logits: rows 4-7 (4 rows) are missing" in \
        result.output


def test_an_edited_provenance_stops_every_reader(project) -> None:
    cache, params, _, _ = project
    root = zarr.open_group(cache, mode="r+")
    provenance = dict(root.attrs[L.ATTR_PROVENANCE])
    provenance["teacher"] = {**provenance["teacher"], "model": "attacker.module:build"}
    root.attrs[L.ATTR_PROVENANCE] = provenance
    for args in (["cache", "info", str(cache)], ["cache", "verify", "--params", str(params), "--samples", "4"],
                 ["rdm", "--params", str(params)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert "attributes were edited after it was written" in result.output.strip().splitlines()[-1]
