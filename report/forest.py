"""The paired differences of a study as a forest plot: one line per (variant, method), its
mean top-1 difference against the reference and the 95 % interval, 0 marked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from report.study import Paired


def paired_figure(pairs: Sequence[Paired], *, title: str) -> Any:
    """Mean differences in top-1 points as dots, the 95 % t-interval as a horizontal bar (two
    seeds or more); a one-seed pair is a hollow dot with no bar, since one seed gives no
    interval. Rows top to bottom in the order given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.32 * max(1, len(pairs))))
    methods = list(dict.fromkeys(p.method for p in pairs))
    for y, p in enumerate(reversed(pairs)):
        color = f"C{methods.index(p.method)}"
        mean = 100.0 * p.mean
        if p.interval is None:
            ax.plot([mean], [y], "o", mfc="white", color=color, ms=6)
        else:
            low, high = 100.0 * p.interval[0], 100.0 * p.interval[1]
            ax.errorbar([mean], [y], xerr=[[mean - low], [high - mean]], fmt="o", color=color, ms=6, capsize=3)
    ax.axvline(0.0, color="gray", ls=":")
    ax.set_yticks(range(len(pairs)))
    ax.set_yticklabels([f"{p.variant} {p.method} − {p.reference} (n={len(p.seeds)})" for p in reversed(pairs)],
                       fontsize=8)
    ax.set_xlabel("top-1 difference (points), 95 % t-interval; hollow: one seed")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_paired(pairs: Sequence[Paired], *, title: str, path: Path) -> None:
    """:func:`paired_figure`, saved as a PNG at ``path`` (as every study plot is saved)."""
    from report.plots import _save

    _save(paired_figure(pairs, title=title), path)
