"""The teacher budget of a student: ``distill.views`` (which cached views it draws from) and
``distill.rows_fraction`` (a seeded subset of the train rows), the teacher forwards they
make the metrics report, and the one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.data.shards import load_manifest
from pipeline.train.distill import train_student
from pipeline.train.targets import gather_targets
from schemas.base import ConfigError
from schemas.config import DistillConfig, load_stage

CPU = torch.device("cpu")


class Recording:
    """A batch source that records every (rows, views) pair the loop is handed."""

    def __init__(self, source) -> None:
        self.source, self.steps, self.rows = source, source.steps, source.rows
        self.epochs: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    def __call__(self, epoch, order, choice):
        self.epochs.append([])
        for rows, views, x, batch in self.source(epoch, order, choice):
            self.epochs[-1].append((rows.clone(), views.clone()))
            if self.source.targets is not None:  # the batch is the cache's targets of those very (row, view) pairs
                expected = gather_targets(self.source.targets, rows, views)
                assert torch.equal(batch.teacher_logits, expected.teacher_logits)
            yield rows, views, x, batch


def _inputs(project, where: Path, method: str = "kd", **distill):
    from stages.distill import build_inputs

    paths, cfg = load_stage(project.params(where, distill=distill), "distill", DistillConfig)
    return build_inputs(paths, cfg, method, device=CPU)


def _num_train(project) -> int:
    return int(load_manifest(project.base["paths"]["shards"]).split("train")["num_samples"])


def test_views_and_rows_fraction_are_what_the_student_trains_on(project, tmp_path: Path) -> None:
    n = _num_train(project)
    keep = round(n * 0.5)
    inputs = _inputs(project, tmp_path / "a", views=[2], rows_fraction=0.5, rows_seed=3, epochs=2)
    source = Recording(inputs.batches)
    train_student(inputs.student, run=inputs.run, info=inputs.info, batches=source, val=inputs.val)
    subset = inputs.batches.rows
    assert subset is not None and len(subset) == keep and len(set(subset.tolist())) == keep
    assert bool((subset[1:] > subset[:-1]).all()) and 0 <= int(subset.min()) and int(subset.max()) < n
    assert len(source.epochs) == 2
    orders = []
    for pairs in source.epochs:
        rows = torch.cat([r for r, _ in pairs])
        views = torch.cat([v for _, v in pairs])
        assert sorted(rows.tolist()) == subset.tolist()  # every kept row once per epoch, no other row
        assert set(views.tolist()) == {2}  # only the listed view
        orders.append(rows)
    assert not torch.equal(orders[0], orders[1])  # reshuffled each epoch
    # The same seed keeps the same rows for every method (a fair budget); another seed others.
    assert torch.equal(_inputs(project, tmp_path / "b", "cifd", rows_fraction=0.5, rows_seed=3).batches.rows, subset)
    assert not torch.equal(_inputs(project, tmp_path / "c", rows_fraction=0.5, rows_seed=4).batches.rows, subset)


def test_a_view_list_draws_uniformly_among_its_views(project, tmp_path: Path) -> None:
    inputs = _inputs(project, tmp_path, views=[0, 2], epochs=30)
    source = Recording(inputs.batches)
    train_student(inputs.student, run=inputs.run, info=inputs.info, batches=source, val=inputs.val)
    views = torch.cat([v for pairs in source.epochs for _, v in pairs])
    rows = torch.cat([r for pairs in source.epochs for r, _ in pairs])
    assert set(views.tolist()) == {0, 2}
    assert sorted(rows[:len(rows) // 30].tolist()) == list(range(_num_train(project)))  # every row: no subset
    share = float((views == 2).double().mean())  # binomial: 30 epochs × 27 rows = 810 draws, sd 0.018
    assert abs(share - 0.5) < 0.07


def test_the_metrics_report_the_teacher_forwards_behind_the_targets(project, tmp_path: Path) -> None:
    from stages import distill as distill_stage

    n = _num_train(project)
    params = project.params(tmp_path, distill={"views": [1, 2], "rows_fraction": 0.4, "methods": ["kd"]})
    distill_stage.run(params, "kd")
    record = json.loads((tmp_path / "metrics" / "distill" / "kd.json").read_text())
    assert record["teacher_forwards"] == round(n * 0.4) * 2
    ce = project.params(tmp_path / "ce", distill={"views": [1, 2], "methods": ["ce"]})
    distill_stage.run(ce, "ce")  # labels only: no teacher forward behind its targets
    assert json.loads((tmp_path / "ce" / "metrics" / "distill" / "ce.json").read_text())["teacher_forwards"] == 0
    plain = project.params(tmp_path / "plain", distill={"methods": ["kd"]})
    distill_stage.run(plain, "kd")
    assert json.loads((tmp_path / "plain" / "metrics" / "distill" / "kd.json").read_text())["teacher_forwards"] \
        == n * _inputs(project, tmp_path / "v").info.num_views


@pytest.mark.parametrize(("distill", "needle"), [
    ({"views": [0, 0]}, "distill.views"),
    ({"views": [-1]}, "distill.views"),
    ({"views": []}, "distill.views"),
    ({"rows_fraction": 0.0}, "distill.rows_fraction"),
    ({"rows_fraction": 1.5}, "distill.rows_fraction"),
    ({"rows_fraction": 0.5, "data": "stream"}, "distill.data: memory"),
])
def test_bad_budget_settings_are_one_line(project, tmp_path: Path, distill: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")) as err:
        load_stage(project.params(tmp_path, distill=distill), "distill", DistillConfig)
    assert "\n" not in str(err.value)


def test_a_view_the_cache_does_not_hold_is_refused_before_training(project, tmp_path: Path) -> None:
    num_views = _inputs(project, tmp_path / "v").info.num_views
    with pytest.raises(ConfigError, match=rf"distill\.views = \[{num_views}\].*holds {num_views} views") as err:
        _inputs(project, tmp_path, views=[num_views])
    assert "\n" not in str(err.value)


def test_tune_refuses_a_row_subset_in_one_line(project, tmp_path: Path) -> None:
    from stages import tune as tune_stage

    params = project.params(tmp_path, distill={"rows_fraction": 0.5},
                            tune={"trials": 1, "space": {"kd": {"optim.lr": {"low": 0.001, "high": 0.01}}}})
    with pytest.raises(ConfigError, match=r"distill\.rows_fraction is 0\.5") as err:
        tune_stage.run(params, "kd")
    assert "\n" not in str(err.value)
