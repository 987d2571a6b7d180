"""PNG plots for people (the CSVs next to them are the DVC plots)."""

from __future__ import annotations

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
    ax1.legend(fontsize=8)
    ax2.plot(bits, [r[M.RDM_DISTORTION] for r in rows], "o-", color="C3")
    ax2.set_xlabel("rate (bits / sample)")
    ax2.set_ylabel("distortion (normalised MSE)")
    fig.suptitle("RDM rate–distortion–accuracy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def plot_curves(curves: Mapping[str, Sequence[Mapping[str, float]]], *, teacher_top1: float, path: Path) -> None:
    """Student val top-1 against epochs, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method, rows in curves.items():
        ax.plot([r["epoch"] for r in rows], [r["val_top1"] for r in rows], "o-", ms=3, label=method)
    ax.axhline(teacher_top1, color="gray", ls=":", label=f"teacher {teacher_top1:.3f}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("student val top-1")
    ax.legend(fontsize=8)
    ax.set_title("Distillation methods")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
