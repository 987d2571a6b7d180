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
    text_table,
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
    assert "| main | kd | 2 | 62.00 ± 2.83 | 64.00 ± 2.83 | 0.1000 ± 0.0000 | 10 ± 0 | 1.00 |" in table
    one = next(line for line in table.splitlines() if line.startswith("| rdm1 | cifd | 1 |"))
    assert "±" not in one  # one seed has no spread: "± 0.00" would claim one


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
    assert any(line.split()[:3] == ["main", "cifd", "3"] and "61.00 ± 1.00" in line  # the terminal table
               for line in result.output.splitlines())
    assert (out / "study_top1.png").stat().st_size > 1000
    assert not (out / "study_budget.png").exists()  # one teacher budget: nothing to plot against

    # The same listing twice would double-count seeds: refused with a clear line.
    result = CliRunner().invoke(main, ["report", str(path), str(path), "--out", str(out)])
    assert result.exit_code == 2 and "appear in more than one listing" in result.output
    # Not a listing at all.
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = CliRunner().invoke(main, ["report", str(bad), "--out", str(out)])
    assert result.exit_code == 2 and "dvc exp show --json" in result.output


def test_diverged_seeds_are_marked_not_averaged() -> None:
    nan = {M.EVAL_TOP1: 0.1, M.EVAL_AGREEMENT: 0.1008, M.EVAL_KL: math.nan, M.EVAL_SECONDS: 30.0}
    listing = _listing(
        _rev("noibm-s0", 0, {"teacher": TEACHER, "cifd": nan}),
        _rev("timm-s0", 0, {"teacher": TEACHER, "cifd": {**_row(0.5, 0.52), M.EVAL_KL: 0.3}}),
        _rev("timm-s1", 1, {"teacher": TEACHER, "cifd": nan}),
        _rev("timm-s2", 2, {"teacher": TEACHER, "cifd": {**_row(0.7, 0.72), M.EVAL_KL: 0.5}}),
    )
    rows = {r.variant: r for r in summarize(parse_exp_show(listing))}
    assert rows["noibm"].failed and rows["noibm"].diverged == 1 and math.isnan(rows["noibm"].top1[0])
    timm = rows["timm"]
    assert not timm.failed and timm.diverged == 1 and timm.seeds == (0, 1, 2)
    # the two finished seeds only: 0.5 and 0.7, not (0.5 + 0.1 + 0.7) / 3
    assert math.isclose(timm.top1[0], 0.6) and math.isclose(timm.top1[1], math.sqrt(0.02))
    assert math.isclose(timm.kl[0], 0.4)
    table = markdown_table(rows.values())
    assert "| noibm | cifd | 1 | diverged | diverged | diverged | 30 | n/a |" in table
    assert "| timm | cifd | 3 | 60.00 ± 14.14 (1 diverged) | 62.00 ± 14.14 | 0.4000 ± 0.1414 |" in table


def test_text_table_fits_120_columns_and_keeps_the_figures() -> None:
    long = "a-variant-with-a-very-long-name-from-a-sweep-" * 3
    def table(seed: int) -> dict[str, dict[str, float]]:
        return {"teacher": TEACHER} | {m: _row(0.6 + seed / 100, 0.61, 1234.5) for m in ("ce", "kd", "dgkd", "cifd")}

    listing = _listing(*[_rev(f"{name}-s{seed}", seed, table(seed)) for name in ("main", long) for seed in range(3)])
    text = text_table(summarize(parse_exp_show(listing)))
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120
    assert lines[0].split() == ["variant", "method", "seeds", "top-1", "%", "agree", "%", "KL(T‖S)", "wall", "s", "×KD"]
    kd = next(line for line in lines if line.startswith("main") and " kd " in line)
    assert "61.00 ± 1.00" in kd and "61.00 ± 0.00" in kd and "0.1000 ± 0.0000" in kd and "1234 ± 0" in kd
    assert any(line.startswith("a-variant-with") and "…" in line.split()[0] for line in lines)


def test_report_reads_a_listing_from_stdin(tmp_path: Path) -> None:
    listing = _listing(_rev("main-s0", 0, {"teacher": TEACHER, "kd": _row(0.6, 0.6)}))
    result = CliRunner().invoke(main, ["report", "-", "--out", str(tmp_path / "out")], input=json.dumps(listing))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "study.md").is_file() and "60.00" in result.output


def test_report_of_the_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("paths: {metrics: out/metrics}\ndistill: {seed: 3}\n")
    runner = CliRunner()
    missing = runner.invoke(main, ["report"])
    assert missing.exit_code == 2 and "run `dvc repro`" in missing.output
    table = {"teacher": TEACHER, "kd": _row(0.6734, 0.7, 12.0), "cifd": {**_row(0.71, 0.75, 18.0), M.EVAL_KL: 0.25}}
    (tmp_path / "out/metrics").mkdir(parents=True)
    (tmp_path / "out/metrics" / M.EVALUATE).write_text(json.dumps(table))
    result = runner.invoke(main, ["report"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["method", "seeds", "top-1"]
    assert lines[1].split() == ["kd", "1", "67.34", "70.00", "0.1000", "12", "1.00"]
    assert lines[2].split() == ["cifd", "1", "71.00", "75.00", "0.2500", "18", "1.50"]
    assert "teacher top-1 90.00 %" in lines[3] and "distill.seed 3" in lines[3]


def test_teacher_budgets_give_a_budget_plot(tmp_path: Path) -> None:
    """Variants that differ in the teacher forwards behind their targets (distill.views,
    distill.rows_fraction) are drawn against them; the figure per row is the seeds' mean."""
    def row(top1: float, forwards: int) -> dict[str, float]:
        return _row(top1, top1) | {M.EVAL_TEACHER_FORWARDS: forwards}

    listing = _listing(*[_rev(f"{name}-s{s}", s, {"teacher": TEACHER, "kd": row(0.5 + k / 10 + s / 100, f),
                                                   "cifd": row(0.52 + k / 10, f)})
                         for k, (name, f) in enumerate([("v1", 1000), ("v4", 4000), ("v8", 8000)]) for s in range(2)])
    rows = {(r.variant, r.method): r for r in summarize(parse_exp_show(listing))}
    assert rows[("v4", "kd")].teacher_forwards == 4000 and math.isclose(rows[("v4", "kd")].top1[0], 0.605)
    path = tmp_path / "exps.json"
    path.write_text(json.dumps(listing))
    result = CliRunner().invoke(main, ["report", str(path), "--out", str(tmp_path / "study")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "study" / "study_budget.png").stat().st_size > 1000 and "study_budget.png" in result.output
    saved = {(r["variant"], r["method"]): r for r in json.loads((tmp_path / "study" / "study.json").read_text())["rows"]}
    assert saved[("v8", "cifd")]["teacher_forwards"] == 8000
    from report.plots import budget_figure

    axis = budget_figure(list(rows.values())).axes[0]
    axis.figure.canvas.draw()
    assert [t.get_text() for t in axis.get_xticklabels()] == ["1,000", "4,000", "8,000"]  # the budgets, written out
    assert not any(t.get_text() for t in axis.get_xticklabels(minor=True))


def _three_seeds() -> list[dict[str, Any]]:
    """Two variants × two methods × seeds 0–2 (top-1 in fractions), seed 2 of b/kd diverged."""
    top1 = {("a", "kd"): [0.70, 0.71, 0.72], ("a", "cifd"): [0.69, 0.69, 0.70],
            ("b", "kd"): [0.72, 0.74, math.nan], ("b", "cifd"): [0.70, 0.72, 0.73]}
    revs = []
    for variant in ("a", "b"):
        for seed in range(3):
            table = {m: _row(top1[(variant, m)][seed], 0.8) for m in ("kd", "cifd")} | {"teacher": TEACHER}
            revs.append(_rev(f"{variant}-s{seed}", seed, table))
    return _listing(*revs)


def test_paired_differences_by_hand() -> None:
    """Differences seed by seed against a variant and against a method; a diverged seed drops
    out of its pair only; the 95 % interval is mean ± t(0.975, n−1)·sd/√n with the tabulated t."""
    from report.study import paired

    experiments = parse_exp_show(_three_seeds())
    by_variant = {(p.variant, p.method): p for p in paired(experiments, variant="a")}
    assert set(by_variant) == {("b", "kd"), ("b", "cifd")}
    cifd = by_variant[("b", "cifd")]
    assert cifd.reference == "a/cifd" and cifd.seeds == (0, 1, 2)
    assert cifd.differences == pytest.approx((0.01, 0.03, 0.03))
    mean, sd = 0.07 / 3, math.sqrt(((0.01 - 0.07 / 3) ** 2 + 2 * (0.03 - 0.07 / 3) ** 2) / 2)
    assert (cifd.mean, cifd.std) == pytest.approx((mean, sd))
    half = 4.302653 * sd / math.sqrt(3)  # t(0.975, 2), from a printed table
    assert cifd.interval == pytest.approx((mean - half, mean + half), abs=1e-6)
    kd = by_variant[("b", "kd")]
    assert kd.seeds == (0, 1) and kd.differences == pytest.approx((0.02, 0.03))
    assert kd.interval == pytest.approx((0.025 - 12.7062 * (0.01 / math.sqrt(2)) / math.sqrt(2),
                                         0.025 + 12.7062 * (0.01 / math.sqrt(2)) / math.sqrt(2)), abs=1e-5)
    by_method = {(p.variant, p.method): p for p in paired(experiments, method="kd")}
    assert set(by_method) == {("a", "cifd"), ("b", "cifd")}
    assert by_method[("a", "cifd")].differences == pytest.approx((-0.01, -0.02, -0.02))
    assert by_method[("b", "cifd")].seeds == (0, 1)


def test_paired_refuses_an_unknown_reference() -> None:
    from report.study import paired

    experiments = parse_exp_show(_three_seeds())
    with pytest.raises(StudyError, match=r"no variant 'v9'.*\['a', 'b'\]"):
        paired(experiments, variant="v9")
    with pytest.raises(StudyError, match="not both"):
        paired(experiments, variant="a", method="kd")


def test_report_cli_writes_the_paired_tables(tmp_path: Path) -> None:
    listing = tmp_path / "exps.json"
    listing.write_text(json.dumps(_three_seeds()))
    out = tmp_path / "study"
    result = CliRunner().invoke(main, ["report", str(listing), "--out", str(out), "--against-variant", "a",
                                       "--against-method", "kd"])
    assert result.exit_code == 0, result.output
    md = (out / "study.md").read_text()
    assert "against the same variant 'a'" in md and "against the same method 'kd'" in md
    assert "| b | cifd | a/cifd | 3 | +2.33 ± 1.15 | [-0.54, +5.20] | s0 +1.00, s1 +3.00, s2 +3.00 |" in md
    assert (out / "study_paired_variant.png").stat().st_size > 1000
    assert (out / "study_paired_method.png").stat().st_size > 1000
    study = json.loads((out / "study.json").read_text())
    assert {p["variant"] for p in study["paired"]["method"]} == {"a", "b"}
    bad = CliRunner().invoke(main, ["report", str(listing), "--out", str(out), "--against-method", "dgkd"])
    assert bad.exit_code == 2 and "no method 'dgkd'" in bad.output and "Traceback" not in bad.output
    only = CliRunner().invoke(main, ["report", str(listing), "--out", str(tmp_path / "only"), "--variants", "b,a",
                                     "--against-variant", "a"])
    assert only.exit_code == 0, only.output
    md = (tmp_path / "only" / "study.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in md[2:6]] == ["| b", "| b", "| a", "| a"]  # the order asked for
    unknown = CliRunner().invoke(main, ["report", str(listing), "--out", str(out), "--variants", "a,zz"])
    assert unknown.exit_code == 2 and "--variants zz: not in the listing" in unknown.output
    alone = CliRunner().invoke(main, ["report", "--against-method", "kd"])
    assert alone.exit_code == 2 and "listings" in alone.output
