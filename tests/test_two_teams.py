"""Two teams, one cache (issue 13): team A runs the digits pipeline and ``dvc push``es to a
local DVC remote; team B, in a repository of its own with ``cifd`` installed as a package,
runs ``cifd init --from A`` and ``dvc repro`` and gets students whose metrics equal A's for
the same params. After A re-embeds with more views and pushes, ``dvc update`` + ``dvc repro``
in B rerun B's stages on the new cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from dvc_project import dvc, make_producer, run, tiny_params

from schemas import layout as L
from schemas import metrics as M

# As small as it gets (~20 processes, each importing torch): one method, the one that reads
# the RDMs; tests/test_dvc_e2e.py runs every method.
METHODS = ["cifd"]
SMALL = {"prepare": {"limit_train": 80, "limit_val": 40}, "teacher": {"epochs": 1}, "rdm": {"epochs": 1},
         "distill": {"methods": METHODS}, "evaluate": {"methods": METHODS}}
SCORES = (M.EVAL_TOP1, M.EVAL_AGREEMENT, M.EVAL_KL)


def _scores(project: Path) -> dict[str, dict[str, float]]:
    table = json.loads((project / "metrics" / M.EVALUATE).read_text())
    return {method: {key: row[key] for key in SCORES} for method, row in table.items()}


def _attrs(store: Path) -> dict:
    """Root attributes of a Zarr store (its metadata file: no torch import)."""
    return json.loads((store / "zarr.json").read_text())["attributes"]


def _views(project: Path) -> int:
    """V of the teacher cache."""
    meta = json.loads((project / "cache/teacher.zarr/train/embeddings/zarr.json").read_text())
    return int(meta["shape"][1])


def _publish(project: Path, message: str, *stages: str) -> None:
    run(dvc("repro", *stages), project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", message], project)
    run(dvc("push", "-q"), project)


@pytest.mark.slow
def test_a_second_team_distills_from_the_first_teams_cache(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    params = tiny_params(SMALL)
    a = make_producer(tmp_path / "team-a", params)
    run(dvc("remote", "add", "-d", "shared", str(remote)), a)
    _publish(a, "team A: digits cache")

    b = tmp_path / "team-b"
    init = run(["cifd", "init", "--from", str(a), str(b)], tmp_path)
    assert "imported the teacher cache" in init.stdout
    for name in ("cache/teacher.zarr.dvc", "models/teacher.safetensors.dvc", "data/shards.dvc"):
        assert (b / name).is_file(), name
    assert not (b / "pipeline").exists()  # B runs the installed cifd, not copied sources
    consumer = yaml.safe_load((b / "params.yaml").read_text())
    assert set(consumer) == {"paths", "teacher", "rdm", "distill", "evaluate"}
    assert consumer["distill"] == params["distill"] and consumer["rdm"] == params["rdm"]
    assert _views(b) == 2

    first = run(dvc("repro"), b).stdout
    for stage in ("rdm", *(f"distill@{m}" for m in METHODS), "evaluate"):
        assert f"Running stage '{stage}'" in first, first[-3000:]
    assert _scores(b) == _scores(a)
    def rdm_figures(root: Path) -> dict:  # every RDM figure, not the stage's wall seconds
        return {k: v for k, v in json.loads((root / "metrics/rdm.json").read_text()).items() if k != "seconds"}

    assert rdm_figures(b) == rdm_figures(a)
    again = run(dvc("repro"), b).stdout  # nothing to do but rewrite the same cifd-version.json
    assert "Running stage 'rdm'" not in again and "Running stage 'evaluate'" not in again

    # A adds views and publishes; B takes the new revision and its stages rerun on it.
    params["embed"]["views"] = 3
    (a / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _publish(a, "team A: three views", "embed")  # its own students are not needed here
    run(dvc("update", "-R", "."), b)
    second = run(dvc("repro"), b).stdout
    for stage in ("rdm", *(f"distill@{m}" for m in METHODS), "evaluate"):
        assert f"Running stage '{stage}'" in second, second[-3000:]
    assert _views(b) == 3
    new = _attrs(a / "cache/teacher.zarr")[L.ATTR_FINGERPRINT]
    assert _attrs(b / "cache/teacher.zarr")[L.ATTR_FINGERPRINT] == new
    assert _attrs(b / "cache/rdm.zarr")[L.ATTR_TEACHER_CACHE] == new  # B's RDMs come from the new cache
