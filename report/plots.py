"""PNG plots for people (the CSVs next to them are the DVC plots)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from schemas import metrics as M


def plot_rate_accuracy(rows: Sequence[Mapping[str, Any]], *, teacher_top1: float, path: Path) -> None:
    """Rate (bits) against val top-1 and distortion, one point per RDM, labelled by R."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r[M.RDM_RATE_BITS])
    bits = [r[M.RDM_RATE_BITS] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax1.plot(bits, [r[M.RDM_VAL_TOP1] for r in rows], "o-", label="RDM val top-1")
    ax1.plot(bits, [r[M.RDM_AGREEMENT] for r in rows], "s--", label="agreement with teacher")
    ax1.axhline(teacher_top1, color="gray", ls=":", label=f"teacher top-1 {teacher_top1:.3f}")
    for r in rows:
        ax1.annotate(f"R={r[M.RDM_RATE_WEIGHT]:g}", (r[M.RDM_RATE_BITS], r[M.RDM_VAL_TOP1]),
                     textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax1.set_xlabel("rate (bits / sample)")
    ax1.set_ylabel("validation")
    ax1.set_ylim(0.0, 1.02)  # accuracy from 0: a gap of a few points is not drawn as a cliff
    ax1.legend(fontsize=8)
    ax2.plot(bits, [r[M.RDM_DISTORTION] for r in rows], "o-", color="C3")
    ax2.set_xlabel("rate (bits / sample)")
    ax2.set_ylabel("distortion (normalised MSE)")
    fig.suptitle("RDM rate–distortion–accuracy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def plot_curves(curves: Mapping[str, Sequence[Mapping[str, float]]], *, teacher_top1: float, path: Path) -> None:
    """:func:`curves_figure`, saved as a PNG at ``path``."""
    _save(curves_figure(curves, teacher_top1=teacher_top1), path)


def curves_figure(curves: Mapping[str, Sequence[Mapping[str, float]]], *, teacher_top1: float) -> Any:
    """Student val top-1 against epochs, one line per method, the accuracy axis from 0 and
    whole epochs on the x axis. Epochs with a NaN / inf figure (a diverged run) are not drawn:
    a red cross on the x axis marks the first of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method, rows in curves.items():
        good = [r for r in rows if _finite(r["val_top1"])]
        (line,) = ax.plot([r["epoch"] for r in good], [r["val_top1"] for r in good], "o-", ms=3, label=method)
        bad = [r["epoch"] for r in rows if not _finite(r["val_top1"])]
        if bad:
            ax.plot([bad[0]], [0.0], "x", color="red", ms=9, mew=2, clip_on=False)
            ax.annotate(f"{method} diverged", (bad[0], 0.0), textcoords="offset points", xytext=(4, 6),
                        color=line.get_color(), fontsize=8)
    ax.axhline(teacher_top1, color="gray", ls=":", label=f"teacher {teacher_top1:.3f}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("epoch")
    ax.set_ylabel("student val top-1")
    ax.legend(fontsize=8)
    ax.set_title("Distillation methods")
    fig.tight_layout()
    return fig


def plot_study(rows: Sequence[Any], *, teacher_top1: Mapping[str, float], path: Path) -> None:
    """:func:`study_figure`, saved as a PNG at ``path``."""
    _save(study_figure(rows, teacher_top1=teacher_top1), path)


def study_figure(rows: Sequence[Any], *, teacher_top1: Mapping[str, float]) -> Any:
    """Top-1 mean ± std (error bars over seeds) per method, one group of bars per variant,
    the axis from 0. A row whose every seed diverged gets no bar but a red cross and the word
    "diverged"; a row where some seeds diverged is drawn from the others and labelled "k/n
    diverged" (``report.study.Summary``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r.variant for r in rows))
    order = ("ce", "kd", "dgkd", "cifd")
    methods = sorted(dict.fromkeys(r.method for r in rows), key=lambda m: (order.index(m) if m in order else 9, m))
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(variants) + 2), 3.6))
    for j, method in enumerate(methods):
        color = f"C{j}"
        xs, means, stds = [], [], []
        for i, variant in enumerate(variants):
            for r in rows:
                if r.variant != variant or r.method != method:
                    continue
                x = i + (j - (len(methods) - 1) / 2) * width
                if r.failed:
                    ax.plot([x], [0.0], "x", color="red", ms=9, mew=2, clip_on=False)
                    ax.text(x, 2.0, f"{method} diverged", rotation=90, ha="center", va="bottom", fontsize=7,
                            color="red")
                    continue
                xs.append(x)
                means.append(100 * r.top1[0])
                stds.append(100 * r.top1[1])
                if r.diverged:
                    ax.text(x, 100 * r.top1[0] + 100 * r.top1[1] + 1.0, f"{r.diverged}/{len(r.seeds)} diverged",
                            rotation=90, ha="center", va="bottom", fontsize=7, color="red")
        ax.bar(xs, means, width=width, yerr=stds, capsize=3, label=method, color=color)
    for i, variant in enumerate(variants):
        if variant in teacher_top1:
            ax.hlines(100 * teacher_top1[variant], i - 0.45, i + 0.45, colors="k", linestyles="dashed")
    ax.set_xticks(range(len(variants)), variants)
    ax.set_ylim(0.0, 100.0)
    ax.set_ylabel("top-1 (%), mean ± std over seeds")
    ax.set_title("students per variant (dashed: teacher; ×: diverged)")
    ax.legend(fontsize=8, ncols=min(4, len(methods)))
    fig.tight_layout()
    return fig


def plot_budget(rows: Sequence[Any], *, path: Path) -> bool:
    """:func:`budget_figure`, saved as a PNG at ``path`` when the rows span at least two
    teacher budgets (False: nothing to draw, no file)."""
    if len({r.teacher_forwards for r in rows if r.teacher_forwards is not None}) < 2:
        return False
    _save(budget_figure(rows), path)
    return True


def budget_figure(rows: Sequence[Any]) -> Any:
    """Top-1 mean ± std against the teacher forwards behind each student's targets (log
    axis), each point labelled with its variant: what a teacher call buys ("few teacher
    calls"). One line per method and series, a variant's series being its name up to the
    first "_" (``ckd_v4`` is the point ``v4`` of series ``ckd``; ``v4`` has none), so KD with
    and without an extra term are two lines. Rows without a recorded budget, and rows whose
    every seed diverged, are not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    drawn = [r for r in rows if r.teacher_forwards is not None and not r.failed]
    order = ("ce", "kd", "dgkd", "cifd")

    def series(row: Any) -> str:
        return row.variant.split("_", 1)[0] if "_" in row.variant else ""

    lines = sorted(dict.fromkeys((series(r), r.method) for r in drawn),
                   key=lambda k: (k[0], order.index(k[1]) if k[1] in order else 9, k[1]))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for j, (name, method) in enumerate(lines):
        mine = sorted((r for r in drawn if r.method == method and series(r) == name), key=lambda r: r.teacher_forwards)
        ax.errorbar([r.teacher_forwards for r in mine], [100 * r.top1[0] for r in mine],
                    yerr=[100 * r.top1[1] for r in mine], fmt="o-", ms=4, capsize=3, color=f"C{j}",
                    label=f"{method} ({name})" if name else method)
        for r in mine:
            ax.annotate(r.variant.split("_", 1)[-1], (r.teacher_forwards, 100 * r.top1[0]),
                        textcoords="offset points", xytext=(4, -10 - 7 * j), fontsize=7, color=f"C{j}")
    ax.set_xscale("log")  # ticks at the budgets drawn, written out (log minor labels collide)
    ax.xaxis.set_major_locator(FixedLocator(sorted({r.teacher_forwards for r in drawn})))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel("teacher forwards behind the targets (rows × views)")
    ax.set_ylabel("top-1 (%), mean ± std over seeds")
    ax.set_title("what a teacher call buys")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
