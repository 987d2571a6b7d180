"""The plots people read: accuracy from 0, whole epochs, diverged runs marked (no bar)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import pytest

from report.plots import curves_figure, plot_curves, plot_study, study_figure
from report.study import Summary

matplotlib.use("Agg")


def _row(variant: str, method: str, top1: float, *, diverged: int = 0, seeds: tuple[int, ...] = (0,)) -> Summary:
    return Summary(variant=variant, method=method, seeds=seeds, top1=(top1, 0.01), agreement=(top1, 0.01),
                   seconds=(10.0, 0.0), kl=(0.1, 0.0), diverged=diverged)


def test_study_plot_marks_diverged_rows_and_starts_at_zero(tmp_path: Path) -> None:
    nan = math.nan
    rows = [_row("main", "kd", 0.67), _row("main", "cifd", 0.70),
            Summary(variant="noibm", method="cifd", seeds=(0,), top1=(nan, nan), agreement=(nan, nan),
                    seconds=(745.0, 0.0), kl=(nan, nan), diverged=1),
            _row("timm", "cifd", 0.55, diverged=1, seeds=(0, 1, 2))]
    fig = study_figure(rows, teacher_top1={"main": 0.88})
    ax = fig.axes[0]
    assert ax.get_ylim() == (0.0, 100.0)
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == [55.0, 67.0, 70.0]  # no bar for the diverged row (not a 10 % bar)
    texts = [t.get_text() for t in ax.texts]
    assert "cifd diverged" in texts and "1/3 diverged" in texts
    crosses = [line for line in ax.lines if line.get_marker() == "x"]
    assert len(crosses) == 1 and list(crosses[0].get_ydata()) == [0.0]
    plot_study(rows, teacher_top1={}, path=tmp_path / "study.png")
    assert (tmp_path / "study.png").stat().st_size > 1000


def test_curves_plot_has_whole_epochs_from_zero_and_marks_nan(tmp_path: Path) -> None:
    curves = {"kd": [{"epoch": e, "val_top1": 0.5 + e / 20} for e in range(1, 4)],
              "cifd": [{"epoch": 1, "val_top1": 0.4}, {"epoch": 2, "val_top1": math.nan},
                       {"epoch": 3, "val_top1": math.nan}]}
    fig = curves_figure(curves, teacher_top1=0.9)
    ax = fig.axes[0]
    fig.canvas.draw()
    assert ax.get_ylim()[0] == 0.0
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    cifd = next(line for line in ax.lines if line.get_label() == "cifd")
    assert list(cifd.get_xdata()) == [1]  # the NaN epochs are not drawn
    assert [t.get_text() for t in ax.texts] == ["cifd diverged"]
    crosses = [line for line in ax.lines if line.get_marker() == "x"]
    assert len(crosses) == 1 and list(crosses[0].get_xdata()) == [2]
    plot_curves(curves, teacher_top1=0.9, path=tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("epochs", [2, 15])
def test_integer_ticks_for_short_and_long_runs(epochs: int) -> None:
    fig = curves_figure({"kd": [{"epoch": e, "val_top1": 0.5} for e in range(1, epochs + 1)]}, teacher_top1=0.9)
    fig.canvas.draw()
    ax = fig.axes[0]
    assert all(float(t).is_integer() for t in ax.get_xticks())


def test_forest_plot_draws_each_interval_and_marks_one_seed_hollow() -> None:
    from report.forest import paired_figure
    from report.study import Paired

    pairs = [Paired(variant="v8", method="kd", reference="v1clean/kd", seeds=(0, 1, 2),
                    differences=(0.01, 0.02, 0.03), mean=0.02, std=0.01, interval=(-0.005, 0.045)),
             Paired(variant="v4", method="cifd", reference="v1clean/cifd", seeds=(0,),
                    differences=(-0.014,), mean=-0.014, std=0.0, interval=None)]
    fig = paired_figure(pairs, title="t")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["v4 cifd − v1clean/cifd (n=1)", "v8 kd − v1clean/kd (n=3)"]  # first pair on top
    bars = [c for c in ax.collections if c.get_segments()]
    assert len(bars) == 1
    (segment,) = bars[0].get_segments()
    assert [round(x, 6) for x in segment[:, 0]] == [-0.5, 4.5] and list(segment[:, 1]) == [1.0, 1.0]
    hollow = [line for line in ax.lines if line.get_marker() == "o" and line.get_markerfacecolor() == "white"]
    assert len(hollow) == 1 and list(hollow[0].get_xdata()) == [pytest.approx(-1.4)]
    assert any(list(line.get_xdata()) == [0.0, 0.0] for line in ax.lines)  # the zero line
