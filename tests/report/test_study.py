"""The study table: experiments parsed from `dvc exp show --json`, mean ± std over seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from report.study import (
    StudyError,
    flatten,
    markdown_table,
    mean_std,
    parse_exp_show,
    summarize,
)
from schemas import metrics as M
from stages.cli import main


def _rev(name: str, seed: int, table: dict[str, dict[str, float]], *, error: Any = None) -> dict[str, Any]:
    """One experiment record in the layout DVC 3.67 prints (captured from a real run)."""
    return {
        "rev": f"{abs(hash(name)):040x}"[:40], "name": name, "error": error, "experiments": None,
        "data": {
            "rev": "x", "timestamp": "2026-11-22T05:18:52", "deps": {}, "outs": {}, "meta": {},
            "params": {"params.yaml": {"data": {"distill": {"seed": seed, "epochs": 15}}}},
            "metrics": {
                "metrics/evaluate.json": {"data": table},
                "metrics/missing.json": {"error": {"type": "FileNotFoundError", "msg": "gone"}},
            },
        },
    }


def _listing(*revs: dict[str, Any]) -> list[dict[str, Any]]:
    baseline = {"rev": "workspace", "name": None, "error": None, "experiments": None,
                "data": {"params": {}, "metrics": {}}}
    commit = {"rev": "f" * 40, "name": "main", "error": None, "data": {"params": {}, "metrics": {}},
              "experiments": [{"revs": [rev], "executor": None, "name": rev["name"]} for rev in revs]}
    return [baseline, commit]


def _row(top1: float, agreement: float, seconds: float | None = 10.0) -> dict[str, float]:
    row = {M.EVAL_TOP1: top1, M.EVAL_AGREEMENT: agreement, M.EVAL_KL: 0.1}
    if seconds is not None:
        row[M.EVAL_SECONDS] = seconds
    return row


TEACHER = {M.EVAL_TOP1: 0.9, M.EVAL_AGREEMENT: 1.0, M.EVAL_KL: 0.0}


def test_mean_std_is_the_sample_std() -> None:
    assert mean_std([0.5]) == (0.5, 0.0)
    mean, std = mean_std([1.0, 2.0, 3.0])
    assert mean == 2.0 and math.isclose(std, 1.0)
    with pytest.raises(StudyError):
        mean_std([])


def test_flatten_nested_params() -> None:
    assert flatten({"distill": {"seed": 1, "ibm": {"on": True}}, "x": [1]}) == {
        "distill.seed": 1, "distill.ibm.on": True, "x": [1]}


def test_parse_groups_seeds_and_skips_failed_or_unnamed() -> None:
    listing = _listing(
        _rev("main-s0", 0, {"teacher": TEACHER, "kd": _row(0.60, 0.62)}),
        _rev("main-s1", 1, {"teacher": TEACHER, "kd": _row(0.64, 0.66)}),
        _rev("rdm1-s0", 0, {"teacher": TEACHER, "cifd": _row(0.55, 0.57)}),
        _rev("failed-s0", 0, {"kd": _row(0.1, 0.1)}, error={"type": "ReproductionError"}),
        _rev("scratch", 0, {"kd": _row(0.2, 0.2)}),
    )
    experiments = parse_exp_show(listing)
    assert [(e.variant, e.seed) for e in experiments] == [("main", 0), ("main", 1), ("rdm1", 0)]
    assert experiments[0].params["distill.seed"] == 0
    assert "metrics/missing.json" not in experiments[0].metrics
    rows = {(r.variant, r.method): r for r in summarize(experiments)}
    assert set(rows) == {("main", "kd"), ("rdm1", "cifd")}  # the teacher row is not a method
    kd = rows[("main", "kd")]
    assert kd.seeds == (0, 1)
    assert math.isclose(kd.top1[0], 0.62) and math.isclose(kd.top1[1], math.sqrt(2 * 0.02 ** 2))
    assert kd.seconds == (10.0, 0.0)
    table = markdown_table(summarize(experiments))
    assert "| main | kd | 2 | 62.00 ± 2.83 | 64.00 ± 2.83 | 10 ± 0 | 1.00 |" in table


def test_a_running_experiment_is_not_counted() -> None:
    # While `dvc exp run` works, DVC lists it with the workspace's files: another run's metrics.
    listing = _listing(_rev("main-s0", 0, {"kd": _row(0.6, 0.6)}), _rev("main-s1", 1, {"kd": _row(0.6, 0.6)}))
    listing[1]["experiments"][1]["executor"] = {"state": "running", "name": "workspace"}
    assert [e.name for e in parse_exp_show(listing)] == ["main-s0"]


def test_missing_time_on_any_seed_gives_no_time() -> None:
    listing = _listing(_rev("main-s0", 0, {"kd": _row(0.6, 0.6)}), _rev("main-s1", 1, {"kd": _row(0.6, 0.6, None)}))
    (row,) = summarize(parse_exp_show(listing))
    assert row.seconds is None and "n/a" in markdown_table([row])


def test_an_experiment_without_evaluate_metrics_is_an_error() -> None:
    rev = _rev("main-s0", 0, {})
    rev["data"]["metrics"] = {}
    with pytest.raises(StudyError, match="no evaluate.json"):
        summarize(parse_exp_show(_listing(rev)))


def test_cli_report_writes_table_json_and_plot(tmp_path: Path) -> None:
    listing = _listing(*[_rev(f"main-s{s}", s, {"teacher": TEACHER, "ce": _row(0.5 + s / 100, 0.5),
                                                 "kd": _row(0.55, 0.55, 20.0 + s),
                                                 "cifd": _row(0.6 + s / 100, 0.6, 22.0 + s)}) for s in range(3)])
    path = tmp_path / "exps.json"
    path.write_text(json.dumps(listing))
    out = tmp_path / "study"
    result = CliRunner().invoke(main, ["report", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "study.json").read_text())
    assert summary["teacher_top1"] == {"main": 0.9}
    assert {r["method"] for r in summary["rows"]} == {"ce", "kd", "cifd"}
    times = {r["method"]: r["time_vs_kd"] for r in summary["rows"]}
    assert times["kd"] == 1.0 and math.isclose(times["cifd"], 23 / 21) and math.isclose(times["ce"], 10 / 21)
    assert "| main | cifd | 3 | 61.00 ± 1.00 |" in (out / "study.md").read_text()
    assert (out / "study_top1.png").stat().st_size > 1000

    # The same listing twice would double-count seeds: refused with a clear line.
    result = CliRunner().invoke(main, ["report", str(path), str(path), "--out", str(out)])
    assert result.exit_code == 2 and "appear in more than one listing" in result.output
    # Not a listing at all.
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = CliRunner().invoke(main, ["report", str(bad), "--out", str(out)])
    assert result.exit_code == 2 and "dvc exp show --json" in result.output
