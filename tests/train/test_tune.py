"""``cifd tune`` on the tiny project: the carved validation split, the study's pruning and
resume (a synthetic trial function, then the real stage on the tiny cache, killed and rerun).

The tiny project (``conftest.py`` here) has 27 train rows; a 0.2 holdout keeps 5 of them.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

from pipeline.tune.holdout import carve_holdout, holdout_rows
from pipeline.tune.search import enqueue, finished, open_study, run_study
from schemas.base import ConfigError
from schemas.config import DistillConfig, ParamSpec, TuneConfig, load_stage

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[2]


def test_holdout_rows_partition_the_rows_reproducibly() -> None:
    train, val = holdout_rows(27, 0.2, seed=3)
    assert len(val) == 5 and len(train) == 22
    assert sorted(train.tolist() + val.tolist()) == list(range(27))
    assert torch.equal(val, holdout_rows(27, 0.2, seed=3)[1])
    assert not torch.equal(val, holdout_rows(27, 0.2, seed=4)[1])
    with pytest.raises(ValueError, match="at least one row on each side"):
        holdout_rows(3, 0.1, seed=0)


def test_carved_split_trains_on_the_rest_and_scores_the_clean_view(project, tmp_path: Path) -> None:
    from stages.distill import build_inputs

    paths, cfg = load_stage(project.params(tmp_path), "distill", DistillConfig)
    inputs = build_inputs(paths, cfg, "kd", device=CPU)
    full = inputs.targets
    hold = carve_holdout(inputs.batches, fraction=0.2, seed=0, batch_size=8)
    assert hold.info.num_rows == 22 and len(hold.val.labels) == 5
    assert torch.equal(hold.val.labels, full.labels[hold.val_rows])
    assert torch.equal(hold.val.teacher_logits, full.teacher_logits[hold.val_rows, 0])
    assert torch.equal(hold.val.views, full.views[hold.val_rows, 0])
    assert torch.equal(hold.val.images, inputs.batches.images[hold.val_rows])
    order = torch.randperm(22, generator=torch.Generator().manual_seed(0))
    choice = torch.randint(full.num_views, (22,), generator=torch.Generator().manual_seed(1))
    seen = []
    for rows, views, _x, batch in hold.batches(0, order, choice):
        global_rows = hold.train_rows[rows]
        assert torch.equal(batch.labels, full.labels[global_rows])
        assert torch.equal(batch.teacher_logits, full.teacher_logits[global_rows, views])
        seen += global_rows.tolist()
    assert sorted(seen) == hold.train_rows.tolist()  # every training row once, no held-out row


def _space() -> tuple[tuple[str, ParamSpec], ...]:
    return TuneConfig.from_mapping({"space": {"kd": {"optim.lr": {"low": 1e-9, "high": 0.1, "log": True}}}},
                                   section="tune").specs("kd")


def test_median_pruner_stops_a_worse_trial_and_a_rerun_resumes(tmp_path: Path) -> None:
    """Trial scores are the lr itself at every epoch: the enqueued 0.05 completes, the
    enqueued 1e-6 is below the median at epoch 1 and is pruned there; a rerun with a larger
    total runs only the missing trial, and a trial a kill left running is marked failed."""
    space = _space()
    epochs_run: list[tuple[float, int]] = []

    def trial_fn(settings, report):
        lr = settings["optim.lr"]
        for epoch in (1, 2, 3):
            epochs_run.append((lr, epoch))
            report(epoch, lr)
        return lr

    def study():
        return open_study(tmp_path / "kd.db", name="kd", identity={"space": "x"}, seed=0, pruner="median",
                          startup_trials=1)

    first = study()
    enqueue(first, space, [{"optim.lr": 0.05}, {"optim.lr": 1e-6}])
    assert run_study(first, lock=tmp_path / "kd.lock", space=space, trial_fn=trial_fn, trials=2, n_jobs=1) == 2
    states = [t.state for t in first.get_trials()]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    assert (1e-6, 2) not in epochs_run and (0.05, 3) in epochs_run  # stopped after its first epoch

    first.ask()  # a trial left RUNNING, as a kill leaves it
    again = study()
    assert [t.state.name for t in again.get_trials()] == ["COMPLETE", "PRUNED", "FAIL"]
    assert run_study(again, lock=tmp_path / "kd.lock", space=space, trial_fn=trial_fn, trials=2, n_jobs=1) == 0
    assert run_study(again, lock=tmp_path / "kd.lock", space=space, trial_fn=trial_fn, trials=3, n_jobs=1) == 1
    assert finished(again) == 3
    with pytest.raises(Exception, match="other space"):
        open_study(tmp_path / "kd.db", name="kd", identity={"space": "y"}, seed=0, pruner="median",
                   startup_trials=1)


TUNE = {"trials": 2, "epochs": 2, "pruner": "median", "startup_trials": 1, "n_jobs": 1,
        "space": {"kd": {"optim.lr": {"low": 1e-9, "high": 0.1, "log": True}}},
        "enqueue": [{"optim.lr": 0.03}, {"optim.lr": 1e-9}]}
TUNE_FRACTION = 0.2


def _states(db: Path) -> list[str]:
    """Trial states in number order; none while the study's tables are still being created."""
    with sqlite3.connect(db) as con:
        try:
            return [row[0] for row in con.execute("SELECT state FROM trials ORDER BY number")]
        except sqlite3.OperationalError:  # "no such table": optuna has not created its schema yet
            return []


def test_enqueued_trials_run_once_each_with_two_jobs(tmp_path: Path) -> None:
    """Two threads on one SQLite study both took the first enqueued trial and the second
    crashed the study ("Cannot tell a COMPLETE trial"), seen on CIFAR with n_jobs 2: the
    enqueued trials now run one at a time, then the rest two at a time."""
    space = _space()
    seen: list[float] = []

    def trial_fn(settings, report):
        seen.append(settings["optim.lr"])
        time.sleep(0.2)  # both threads are inside a trial at once
        report(1, settings["optim.lr"])
        return settings["optim.lr"]

    study = open_study(tmp_path / "kd.db", name="kd", identity={"space": "x"}, seed=0, pruner="none",
                       startup_trials=1)
    enqueue(study, space, [{"optim.lr": 0.05}, {"optim.lr": 0.01}])
    assert run_study(study, lock=tmp_path / "kd.lock", space=space, trial_fn=trial_fn, trials=6, n_jobs=2) == 6
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"] * 6
    assert seen[:2] == [0.05, 0.01] and seen.count(0.05) == 1 and seen.count(0.01) == 1 and len(seen) == 6


def test_tune_stage_prunes_a_trial_writes_its_outputs_and_resumes_after_a_kill(project, tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from stages import tune as stage

    where = tmp_path / "study"
    # 12 epochs per trial, and trial 2 nearly repeats trial 0's lr (an exact repeat would be
    # skipped as a duplicate), so it is not pruned: it lasts long enough that the kill lands
    # inside the study even when a loaded machine delays the polling.
    queue = [*TUNE["enqueue"], {"optim.lr": 0.0300001}]
    params = project.params(tmp_path, tune={**TUNE, "trials": 3, "epochs": 12, "enqueue": queue},
                            paths={**project.base["paths"], "tune": str(where)})
    # A real kill: `cifd tune` in a subprocess, SIGKILLed once its first trial is stored.
    proc = subprocess.Popen([sys.executable, "-c", "from stages.cli import main; main()", "tune", "--params",
                             str(params), "--method", "kd"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (where / "kd.db").is_file() and "COMPLETE" in _states(where / "kd.db"):
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = _states(where / "kd.db")
    assert before[0] == "COMPLETE" and before.count("COMPLETE") + before.count("PRUNED") < 3

    summary = stage.run(params, "kd")
    states = [t["state"] for t in summary["trials"]]
    assert states[0] == "COMPLETE" and states[1] in ("PRUNED", "FAIL")  # the lr=1e-9 trial, or the killed one
    # The progress bar counts the epochs of the trials still to run, and ends full (a pruned
    # trial's unrun epochs are counted when it stops); every finished trial gets a line.
    todo = (3 - before.count("COMPLETE") - before.count("PRUNED")) * 12
    out, err = capsys.readouterr()
    assert f"{todo}/{todo}" in err and f"{todo + 1}/{todo}" not in err
    assert out.count("tune kd: trial ") == summary["ran_now"]
    assert states.count("COMPLETE") + states.count("PRUNED") == 3
    assert "PRUNED" in states  # lr = 1e-9 learns nothing: below the median within a few epochs
    # The enqueued lr = 1e-9 trial is pruned (or was the one killed); a sampled lr that also
    # learns nothing in an epoch may be pruned too, depending on when the kill landed.
    pruned = [t for t in summary["trials"] if t["state"] == "PRUNED"]
    assert all(len(t["epochs"]) < 12 for t in pruned)  # stopped before the last epoch
    enqueued = summary["trials"][1]  # queued second: lr = 1e-9 (a trial the kill ended records no settings)
    assert enqueued["state"] in ("PRUNED", "FAIL") and enqueued["settings"] in ({"optim.lr": 1e-9}, None)
    assert summary["best"]["number"] not in {t["number"] for t in pruned}
    saved = json.loads((where / "kd.json").read_text())
    assert saved["counts"] == summary["counts"] and (where / "kd.png").stat().st_size > 0
    best = (where / "kd.best.yaml").read_text()
    assert "--set-param ++distill.per_method.kd.optim.lr=" in best
    import yaml

    override = yaml.safe_load(best)["distill"]["per_method"]
    lr = summary["best"]["settings"]["optim.lr"]
    assert override == {"kd": {"optim": {"lr": lr}}}
    applied = DistillConfig.from_mapping({**project.base["distill"], "per_method": override}, section="distill")
    assert applied.for_method("kd").optim.lr == lr and applied.for_method("cifd").optim.lr == applied.optim.lr


def test_per_method_settings_merge_over_the_section_for_that_method_only() -> None:
    cfg = DistillConfig.from_mapping({"temperature": 2.0, "optim": {"name": "sgd", "lr": 0.01},
                                      "per_method": {"kd": {"temperature": 4.0, "optim": {"lr": 0.02}}}},
                                     section="distill")
    kd, cifd = cfg.for_method("kd"), cfg.for_method("cifd")
    assert (kd.temperature, kd.optim.lr, kd.optim.name, dict(kd.per_method)) == (4.0, 0.02, "sgd", {})
    assert (cifd.temperature, cifd.optim.lr, cifd.optim.name) == (2.0, 0.01, "sgd")
    assert kd.for_method("kd") == kd  # idempotent
    for per_method, message in [
        ({"kdd": {}}, r"params 'distill\.per_method' = 'kdd': expected keys among \['ce', 'kd', 'dgkd', 'cifd'\]"),
        ({"kd": {"student": "resnet18"}}, r"expected a mapping of distill settings other than methods, per_method, "
                                          r"student, student_kwargs"),
        ({"kd": {"temprature": 1.0}}, r"params 'distill\.per_method\.kd' has unknown key 'temprature' "
                                      r"\(did you mean 'temperature'\?\)"),
        ({"cifd": {"temperature": -1.0}}, r"'distill\.per_method\.cifd\.temperature' = -1\.0: expected > 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            DistillConfig.from_mapping({"per_method": per_method}, section="distill")


def test_tune_refuses_a_changed_space_and_unknown_keys(project, tmp_path: Path) -> None:
    from stages import tune as stage

    with pytest.raises(ConfigError, match="expected a distill key"):
        TuneConfig.from_mapping({"space": {"kd": {"optim.lrr": {"low": 0.1, "high": 1.0}}}}, section="tune")
    with pytest.raises(ConfigError, match="low < high"):
        TuneConfig.from_mapping({"space": {"kd": {"temperature": {"low": 2.0, "high": 1.0}}}}, section="tune")
    where = tmp_path / "study"
    paths = {**project.base["paths"], "tune": str(where)}
    stage.run(project.params(tmp_path / "a", tune={**TUNE, "trials": 1, "epochs": 1}, paths=paths), "kd")
    changed = {**TUNE, "trials": 1, "epochs": 1, "space": {"kd": {"optim.lr": {"low": 1e-4, "high": 0.1}}}}
    with pytest.raises(ConfigError, match="other space"):
        stage.run(project.params(tmp_path / "b", tune=changed, paths=paths), "kd")


def test_the_kl_tiebreak_ranks_equal_top1_by_kl_and_never_reorders_top1() -> None:
    """``top1_kl`` = top1 + 1e-6 · exp(-KL), computed by hand; a holdout of 288 rows (the digits
    carved split) moves top-1 in steps of 1/288, far above the bonus's range (0, 1e-6]."""
    import math

    from pipeline.tune.search import objective_value

    assert objective_value(0.5, 0.2, "top1") == 0.5
    assert objective_value(0.5, 0.2, "top1_kl") == pytest.approx(0.5 + 1e-6 * math.exp(-0.2), abs=1e-15)
    assert objective_value(1.0, 0.01, "top1_kl") > objective_value(1.0, 0.02, "top1_kl") > 1.0
    assert objective_value(1.0, 1e6, "top1_kl") > objective_value(287 / 288, 0.0, "top1_kl")
    assert objective_value(0.75, math.nan, "top1_kl") == 0.75
    with pytest.raises(ValueError, match="objective 'nll'"):
        objective_value(0.5, 0.1, "nll")


def test_tune_trials_are_scored_by_the_objective(project, tmp_path: Path) -> None:
    """With ``top1_kl``, a trial's value is its last epoch's holdout top-1 plus the KL bonus: the
    top-1 recomputed by scoring the trial's own history, and the bonus strictly positive."""
    from stages import tune as stage

    where = tmp_path / "study"
    params = project.params(tmp_path, tune={**TUNE, "trials": 1, "epochs": 2, "enqueue": [{"optim.lr": 0.03}],
                                            "objective": "top1_kl", "holdout_fraction": TUNE_FRACTION},
                            paths={**project.base["paths"], "tune": str(where)})
    summary = stage.run(params, "kd")
    (trial,) = summary["trials"]
    value = trial["value"]
    assert trial["epochs"]["2"] == value  # the pruner saw the same score
    n = len(holdout_rows(27, TUNE_FRACTION, 0)[1])  # the session shards' 27 train rows
    top1 = round(value * n) / n  # the top-1 is a multiple of 1/n; the bonus is far below 1/(2n)
    assert 0 < value - top1 <= 1e-6


def test_the_progress_bar_follows_epochs_drawn_by_the_search(project, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """``epochs`` in the space: each trial trains its own number of epochs, and the bar's total
    follows (two trials of 3 epochs against the section's 2: 6 epochs, not 4)."""
    from stages import tune as stage

    space = {"kd": {"optim.lr": {"low": 0.01, "high": 0.1}, "epochs": {"choices": [1, 3]}}}
    params = project.params(tmp_path, tune={**TUNE, "epochs": 2, "pruner": "none", "space": space,
                                            "enqueue": [{"optim.lr": 0.03, "epochs": 3},
                                                        {"optim.lr": 0.02, "epochs": 3}]},
                            paths={**project.base["paths"], "tune": str(tmp_path / "study")})
    summary = stage.run(params, "kd")
    assert [len(t["epochs"]) for t in summary["trials"]] == [3, 3]
    out, err = capsys.readouterr()
    assert "6/6" in err.rstrip().split("\r")[-1]  # the bar's last state
    assert not any(f"{n}/4" in err for n in (5, 6))  # never past a total that ignored the drawn epochs
    assert out.count("tune kd: trial ") == 2
