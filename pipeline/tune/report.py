"""What ``cifd tune`` leaves behind: every trial as JSON, a plot (best validation top-1
against trials; parameter importances), and the best settings as a params override file
for ``dvc exp run`` (a YAML ``distill`` section, plus the ``--set-param`` flags)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

__all__ = ["best_params_yaml", "importances", "set_param_flags", "study_summary", "write_plot"]


def importances(study: optuna.Study) -> dict[str, float]:
    """fANOVA importance of each parameter over the complete trials ({} with fewer than two
    complete trials or no variation)."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < 2 or len({t.value for t in done}) < 2:
        return {}
    try:
        values = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError):  # a space with one value per parameter so far
        return {}
    return {k: round(float(v), 4) for k, v in values.items()}


def _nested(settings: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in settings.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def best_params_yaml(method: str, settings: Mapping[str, Any], *, score: float, trial: int) -> str:
    """A params override file: the best settings as ``distill.per_method.<method>`` (they apply
    to that method's stage only), with how to apply them."""
    flags = " ".join(set_param_flags(method, settings))
    head = (f"# cifd tune --method {method}: best trial {trial}, carved-validation top-1 {score:.4f}.\n"
            f"# Apply with: dvc exp run {flags}\n"
            "# (or merge this distill section into params.yaml)\n")
    return head + yaml.safe_dump({"distill": {"per_method": {method: _nested(settings)}}}, sort_keys=True)


def set_param_flags(method: str, settings: Mapping[str, Any]) -> list[str]:
    """``--set-param ++distill.per_method.METHOD.KEY=VALUE`` for each setting (``++``: add or
    override, as the key may be absent from params.yaml; lists in YAML flow style)."""
    def show(value: Any) -> str:
        return json.dumps(value) if isinstance(value, (list, tuple)) else f"{value:.6g}" \
            if isinstance(value, float) else str(value)

    return [f"--set-param ++distill.per_method.{method}.{k}={show(v)}" for k, v in sorted(settings.items())]


def study_summary(study: optuna.Study, *, method: str, identity: Mapping[str, Any]) -> dict[str, Any]:
    """Every trial (number, state, settings, score, per-epoch scores, seconds), the best one
    and the importances, JSON-able."""
    trials = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        trials.append({"number": t.number, "state": t.state.name, "settings": t.user_attrs.get("settings"),
                       "value": t.value, "epochs": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                       "seconds": None if seconds is None else round(seconds, 1)})
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    best = max(complete, key=lambda t: t.value) if complete else None
    return {"method": method, "identity": dict(identity), "trials": trials,
            "counts": {s.name: sum(t["state"] == s.name for t in trials) for s in TrialState},
            "best": None if best is None else {"number": best.number, "value": best.value,
                                               "settings": best.user_attrs.get("settings")},
            "importances": importances(study)}


def write_plot(summary: Mapping[str, Any], path: Path) -> None:
    """Best carved-validation top-1 so far against the trial number (each complete trial a
    dot, pruned ones a cross at their last epoch's score), and the importances as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    best, xs, ys = -math.inf, [], []
    for t in summary["trials"]:
        if t["state"] == "COMPLETE":
            ax.plot(t["number"], t["value"], "o", color="tab:blue", ms=4)
            best = max(best, t["value"])
        elif t["state"] == "PRUNED" and t["epochs"]:
            ax.plot(t["number"], list(t["epochs"].values())[-1], "x", color="tab:grey", ms=4)
        if best > -math.inf:
            xs.append(t["number"])
            ys.append(best)
    ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("carved-validation top-1")
    ax.set_title(f"cifd tune --method {summary['method']}")
    ax.legend(loc="lower right")
    imp = summary["importances"]
    if imp:
        names = list(imp)[::-1]
        bx.barh(names, [imp[n] for n in names], color="tab:green")
        bx.set_xlabel("importance (fANOVA)")
    else:
        bx.text(0.5, 0.5, "importances need two complete trials\nwith different scores", ha="center",
                va="center", transform=bx.transAxes)
        bx.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
