"""End to end: ``dvc repro`` in a temporary git + DVC repo on a tiny digits configuration.

Checks the whole DAG runs (on a cache with a mixup and a CutMix view per image), a second ``dvc repro`` does nothing, that editing one params
section marks its own stage changed and nothing upstream of it (``dvc status``, one section
at a time, params restored in between), and that a changed ``embed.views`` reaches ``embed``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from dvc_project import make_producer, tiny_params
from dvc_project import run as _run


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Two of the three cached views are mixed (embed.mixup): a blend, then a CutMix view; the
    # whole DAG runs on that cache.
    return make_producer(tmp_path_factory.mktemp("e2e"), tiny_params(
        {"embed": {"views": 3, "mixup": {"views": 2, "alpha": 1.0, "cutmix": 1}}}))


METHODS = ("ce", "kd", "dgkd", "cifd")
DISTILL = {f"distill@{m}" for m in METHODS}
# Each params section, the stages it belongs to, and the stages downstream of them in dvc.yaml.
OWN = {"prepare": {"prepare"}, "teacher": {"teacher"}, "embed": {"embed"}, "rdm": {"rdm"}, "distill": DISTILL,
       "evaluate": {"evaluate"}}
DOWNSTREAM = {
    "prepare": {"teacher", "embed", "rdm", "evaluate"} | DISTILL,
    "teacher": {"embed", "rdm", "evaluate"} | DISTILL,
    "embed": {"rdm", "evaluate"} | DISTILL,
    # Every distill@<method> depends on the RDM cache today, ce and kd too (issue 10).
    "rdm": {"evaluate"} | DISTILL,
    "distill": {"evaluate"},
    "evaluate": set(),
}
# One edit per section (a value the stage would accept).
EDITS = {"prepare": ("seed", 1), "teacher": ("seed", 1), "embed": ("views", 4), "rdm": ("seed", 1),
         "distill": ("seed", 1), "evaluate": ("batch_size", 32)}


def _status(repo: Path) -> dict:
    out = _run([sys.executable, "-m", "dvc", "status", "--json"], repo).stdout
    return json.loads(out or "{}")


@pytest.mark.slow
def test_dvc_repro_end_to_end(repo: Path) -> None:
    _run([sys.executable, "-m", "dvc", "repro"], repo)
    for out in ("data/shards/manifest.json", "models/teacher.safetensors", "cache/teacher.zarr/zarr.json",
                "cache/rdm.zarr/zarr.json", "models/students/cifd.safetensors", "metrics/evaluate.json"):
        assert (repo / out).exists(), out
    table = json.loads((repo / "metrics/evaluate.json").read_text())
    assert set(table) == {"teacher", "ce", "kd", "dgkd", "cifd"}
    embed = json.loads((repo / "metrics/embed.json").read_text())
    assert embed["views"] == 3 and embed["teacher_forwards"] == (160 + 60) * 3
    from pipeline.cache.reader import open_cache

    mixup = open_cache(repo / "cache/teacher.zarr").mixup
    assert mixup["views"] == 2 and mixup["cutmix"] == 1  # the students learnt from both kinds of mixed views

    # A second repro has nothing to do.
    assert _status(repo) == {}
    second = _run([sys.executable, "-m", "dvc", "repro"], repo).stdout
    assert "Running stage" not in second

    # Each params section reruns only its own stage(s) and what comes after them.
    original = (repo / "params.yaml").read_text()
    assert set(yaml.safe_load(original)) - {"paths", "tune"} == set(EDITS)  # every stage section is covered
    tuned = yaml.safe_load(original)  # `tune` feeds `cifd tune`, not a stage: editing it reruns nothing
    tuned["tune"]["trials"] += 1
    (repo / "params.yaml").write_text(yaml.safe_dump(tuned, sort_keys=False))
    assert _status(repo) == {}
    for section, (key, value) in EDITS.items():
        params = yaml.safe_load(original)
        assert params[section].get(key) != value
        params[section][key] = value
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        changed = set(_status(repo))
        assert OWN[section] <= changed, (section, changed)
        assert changed <= OWN[section] | DOWNSTREAM[section], (section, changed)
        (repo / "params.yaml").write_text(original)
    assert _status(repo) == {}  # restored

    # New RDMs rerun only the students that read them: ce and kd depend on their own
    # uses/distill-<method>.json, whose content does not change with the RDMs.
    params = yaml.safe_load(original)
    params["rdm"]["epochs"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = _run([sys.executable, "-m", "dvc", "repro"], repo).stdout
    for method in ("ce", "kd"):
        assert f"Stage 'distill@{method}' didn't change, skipping" in rerun, rerun[-2000:]
    for stage in ("rdm", "distill@dgkd", "distill@cifd"):
        assert f"Running stage '{stage}'" in rerun
    uses = json.loads((repo / "cache/rdm.zarr/uses/distill-kd.json").read_text())
    assert uses == {"consumer": "distill-kd", "reads_rdm_cache": False}
    assert _status(repo) == {}
    (repo / "params.yaml").write_text(original)
    _run([sys.executable, "-m", "dvc", "repro"], repo)  # back to the first RDMs (from the run cache)

    # A changed embed.views reaches the embed stage.
    params = yaml.safe_load(original)
    params["embed"]["views"] = 4
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run([sys.executable, "-m", "dvc", "repro", "-s", "embed"], repo)
    embed = json.loads((repo / "metrics/embed.json").read_text())
    assert embed["views"] == 4
