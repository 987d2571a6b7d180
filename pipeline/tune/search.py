"""The Optuna study behind ``cifd tune``: TPE over a declared space, a pruner fed the
per-epoch validation top-1, SQLite storage that a rerun resumes.

Pure library: the caller gives the space (``(key, ParamSpec)`` pairs) and a trial function
``(settings, report) -> score`` that trains one student with ``settings`` (dotted ``distill``
keys → values) and calls ``report(epoch, top1)`` after every epoch; ``report`` raises
:class:`optuna.TrialPruned` when the pruner stops the trial.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from filelock import FileLock, Timeout
from optuna.trial import TrialState

from schemas.config import ParamSpec

log = logging.getLogger(__name__)

__all__ = ["StudyBusy", "StudyMismatch", "TrialFn", "enqueue", "finished", "open_study", "run_study", "suggest"]

TrialFn = Callable[[dict[str, Any], Callable[[int, float], None]], float]
DONE = (TrialState.COMPLETE, TrialState.PRUNED)


class StudyMismatch(ValueError):
    """The SQLite file holds a study run with other settings (space, config or data)."""


class StudyBusy(RuntimeError):
    """Another process holds the study's lock."""


def suggest(trial: optuna.Trial, space: Sequence[tuple[str, ParamSpec]]) -> dict[str, Any]:
    """Draw one value (a list of ``size`` values for list settings) per key of ``space``."""
    settings: dict[str, Any] = {}
    for key, spec in space:
        names = [key] if spec.size is None else [f"{key}[{i}]" for i in range(spec.size)]
        values = []
        for name in names:
            if spec.choices is not None:
                values.append(trial.suggest_categorical(name, list(spec.choices)))
            elif spec.integer:
                values.append(trial.suggest_int(name, int(spec.low), int(spec.high), log=spec.log))
            else:
                values.append(trial.suggest_float(name, float(spec.low), float(spec.high), log=spec.log))
        settings[key] = values[0] if spec.size is None else values
    return settings


def enqueue(study: optuna.Study, space: Sequence[tuple[str, ParamSpec]],
            settings: Sequence[Mapping[str, Any]]) -> None:
    """Queue ``settings`` (space key → value, a list for sized keys) as the next trials."""
    known = dict(space)
    for entry in settings:
        params: dict[str, Any] = {}
        for key, value in entry.items():
            if key not in known:
                raise ValueError(f"enqueued setting {key!r} is not in the search space ({', '.join(known)})")
            size = known[key].size
            if size is None:
                params[key] = value
            else:
                if not isinstance(value, (list, tuple)) or len(value) != size:
                    raise ValueError(f"enqueued setting {key!r} = {value!r}: expected a list of {size} values")
                params.update({f"{key}[{i}]": v for i, v in enumerate(value)})
        study.enqueue_trial(params, skip_if_exists=True)


def make_pruner(kind: str, *, startup_trials: int, prune_after: int = 1) -> optuna.pruners.BasePruner:
    """``median``, ``halving`` (successive halving, factor 3) or ``none``; no trial is stopped
    before epoch ``prune_after``."""
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=prune_after)
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=prune_after, reduction_factor=3)
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"pruner {kind!r}: expected median, halving or none")


def finished(study: optuna.Study) -> int:
    """Trials that count towards the study's total: complete or pruned."""
    return len(study.get_trials(deepcopy=False, states=DONE))


def open_study(path: Path, *, name: str, identity: Mapping[str, Any], seed: int, pruner: str,
               startup_trials: int, prune_after: int = 1) -> optuna.Study:
    """Create or resume the study ``name`` in the SQLite file ``path``. ``identity`` (JSON-able:
    the space, the fixed settings, the data's fingerprint) is stored with a new study and must
    match on resume. Trials a killed run left ``RUNNING`` are marked ``FAIL`` (they never count)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{path.resolve()}")
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials)
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, direction="maximize",
                                pruner=make_pruner(pruner, startup_trials=startup_trials, prune_after=prune_after),
                                load_if_exists=True)
    want = json.loads(json.dumps(identity, sort_keys=True))
    have = study.user_attrs.get("identity")
    if have is None:
        study.set_user_attr("identity", want)
    elif have != want:
        changed = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        raise StudyMismatch(f"study {name!r} in {path} was run with other {', '.join(changed)}; "
                            f"delete {path} to start afresh, or restore the settings to resume it")
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        log.info("trial %d was left running by a killed run: marked failed", trial.number)
    return study


def run_study(study: optuna.Study, *, lock: Path, space: Sequence[tuple[str, ParamSpec]], trial_fn: TrialFn,
              trials: int, n_jobs: int, on_trial: Callable[[optuna.trial.FrozenTrial], None] | None = None) -> int:
    """Run trials until ``trials`` are finished (complete or pruned), ``n_jobs`` at a time, the
    study's ``lock`` file held throughout (a second process on the same study is
    :class:`StudyBusy`). Returns how many trials this call ran."""
    try:
        with FileLock(str(lock), timeout=0):
            todo = trials - finished(study)
            if todo <= 0:
                return 0
            ran = 0
            count = threading.Lock()

            def objective(trial: optuna.Trial) -> float:
                settings = suggest(trial, space)
                trial.set_user_attr("settings", settings)

                def report(epoch: int, value: float) -> None:
                    trial.report(value, epoch)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"pruned after epoch {epoch} at {value:.4f}")

                value = trial_fn(settings, report)
                if not math.isfinite(value):
                    raise optuna.TrialPruned(f"score {value}")
                return value

            def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
                nonlocal ran
                with count:
                    ran += 1
                    if on_trial is not None:
                        on_trial(trial)
                    if finished(study) >= trials:
                        study.stop()

            # Enqueued trials one at a time: two threads on one SQLite study can both take the
            # same waiting trial (no row lock), and the second then cannot report it.
            waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
            if waiting and n_jobs > 1:
                study.optimize(objective, n_trials=min(waiting, todo), n_jobs=1, callbacks=[callback],
                               catch=(), gc_after_trial=False)
                todo = trials - finished(study)
            if todo > 0:
                study.optimize(objective, n_trials=todo, n_jobs=n_jobs, callbacks=[callback],
                               catch=(), gc_after_trial=False)
            return ran
    except Timeout as exc:
        raise StudyBusy(f"another `cifd tune` holds {lock}; wait for it, or stop it (a killed run leaves "
                        "no lock: the file lock dies with its process)") from exc


KL_TIEBREAK = 1e-6  # below one image's share of top-1 for any holdout under a million rows


def objective_value(top1: float, kl: float, kind: str) -> float:
    """A trial's score (higher is better). ``top1``: the holdout top-1. ``top1_kl``: the top-1,
    ties broken by the KL(teacher ‖ student) on the holdout: ``top1 + 1e-6 · exp(-KL)``. The
    tie-break term lies in (0, 1e-6], less than one image of a holdout of under 10⁶ rows, so it
    never reorders different top-1s; among students with the same top-1 (an easy holdout that
    many settings saturate) the one closer to the teacher wins. A NaN KL scores as no bonus."""
    if kind == "top1":
        return top1
    if kind != "top1_kl":
        raise ValueError(f"objective {kind!r}: expected 'top1' or 'top1_kl'")
    return top1 + (0.0 if math.isnan(kl) else KL_TIEBREAK * math.exp(-kl))
