"""``cifd tune --method M``: an Optuna study of stage three's settings for one method, its
trials scored on a validation split carved from train (never the reported val split).

Also :func:`train_trial`, one student on the carved split with some ``distill`` settings
overridden: the studies behind the defaults (``studies/digits_cifd.py``) call it too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.runtime import resolve_device
from pipeline.train.distill import EpochLog, TrainingDiverged, train_student
from pipeline.tune.holdout import carve_holdout
from pipeline.tune.report import best_params_yaml, set_param_flags, study_summary, write_plot
from pipeline.tune.search import StudyBusy, StudyMismatch, enqueue, finished, objective_value, open_study, run_study
from schemas.base import ConfigError
from schemas.config import METHODS, DistillConfig, Paths, TuneConfig, load_stage
from stages._io import write_json
from stages.distill import build_inputs


def with_overrides(cfg: DistillConfig, overrides: Mapping[str, Any]) -> DistillConfig:
    """``cfg`` with dotted ``distill`` keys replaced (``optim.lr``, ``feature_weight``, ...),
    checked like a params file (a bad key or value is a ``ConfigError``)."""
    data = cfg.to_dict()
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"distill override {key!r}: 'distill.{part}' is not a section; "
                                  "expected a key such as 'optim.lr' or 'feature_weight'")
            node = node[part]
        node[leaf] = value
    return DistillConfig.from_mapping(data, section="distill")


def train_trial(paths: Paths, cfg: DistillConfig, method: str, *, fraction: float, split_seed: int,
                on_epoch: Callable[[EpochLog], None] | None = None, device: torch.device | None = None,
                build_lock: threading.Lock | None = None) -> tuple[list[EpochLog], float]:
    """Train one ``method`` student with ``cfg`` on train minus a held-out ``fraction`` (drawn
    with ``split_seed``), scored each epoch on the held-out rows; no checkpoint, nothing written.
    ``build_lock``: held while the student is built (its init draws from the global RNG, so
    trials in threads take turns). Returns the per-epoch history and the wall seconds."""
    began = time.perf_counter()
    if cfg.data != "memory":
        cfg = dataclasses.replace(cfg, data="memory")  # the carve needs the rows in memory
    with build_lock if build_lock is not None else contextlib.nullcontext():
        inputs = build_inputs(paths, cfg, method, device=device)
    hold = carve_holdout(inputs.batches, fraction=fraction, seed=split_seed, batch_size=cfg.batch_size)
    run = dataclasses.replace(inputs.run, checkpoint=None)
    history = train_student(inputs.student, run=run, info=hold.info, batches=hold.batches, val=hold.val,
                            on_epoch=on_epoch)
    return history, time.perf_counter() - began


def default_jobs(cfg: DistillConfig, device: torch.device) -> int:
    """Trials side by side: one per ``distill.threads`` CPU cores on CPU, 2 sharing a GPU."""
    if device.type == "cuda":
        return 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // cfg.threads)


def run(params: Path, method: str) -> dict[str, Any]:
    """Run (or resume) the study of ``method``; write its JSON, plot and best-params file."""
    paths, base = load_stage(params, "distill", DistillConfig)
    tune = load_stage(params, "tune", TuneConfig)[1]
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: expected one of {list(METHODS)}")
    base = base.for_method(method)  # trials start from the method's own settings (distill.per_method)
    space = tune.specs(method)
    if tune.epochs is not None:
        base = dataclasses.replace(base, epochs=tune.epochs)
    if base.rows_fraction < 1.0:  # the holdout is carved from every train row
        raise ConfigError(f"cifd tune carves its holdout from every train row, but distill.rows_fraction is "
                          f"{base.rows_fraction:g}; tune with rows_fraction: 1 (the held-out rows are a fraction "
                          "of their own: tune.holdout_fraction)")
    base = dataclasses.replace(base, data="memory")
    device = resolve_device(base.device)
    torch.set_num_threads(base.threads)
    # The cache's identity, checked once here (every trial reopens and rechecks it).
    probe = build_inputs(paths, base, method, device=torch.device("cpu"))
    if probe.targets is not None and probe.targets.mix is not None:
        raise ConfigError(f"cifd tune cannot carve a holdout from the cache {paths.cache}: it has mixed views "
                          "(embed.mixup), and a training row's mixed view can hold a held-out image; tune on a "
                          "cache made with embed.mixup.views: 0")
    identity = {"method": method, "space": {k: s.to_dict() for k, s in space},
                "distill": {k: v for k, v in base.to_dict().items() if k not in ("device", "threads")},
                "holdout": [tune.holdout_fraction, tune.holdout_seed], "data_and_code": probe.run.fingerprint,
                "objective": tune.objective,
                "enqueue": [dict(e) for e in tune.enqueue]}
    del probe
    where = Path(paths.tune)
    try:
        study = open_study(where / f"{method}.db", name=method, identity=identity, seed=tune.seed,
                           pruner=tune.pruner, startup_trials=tune.startup_trials, prune_after=tune.prune_after)
    except StudyMismatch as exc:
        raise ConfigError(str(exc)) from exc
    if not study.get_trials(deepcopy=False):
        try:
            enqueue(study, space, tune.enqueue)
        except ValueError as exc:
            raise ConfigError(f"params 'tune.enqueue': {exc}") from exc
    build = threading.Lock()  # build_inputs seeds the global RNG for the student's init

    def score(log: EpochLog) -> float:
        return objective_value(log.val_top1, log.val_kl, tune.objective)

    # One bar over the epochs still to train (trials to run × epochs); a pruned or diverged
    # trial's unrun epochs are counted at its end, so the bar ends full. Made by the first
    # trial, so a refused run (a busy study) prints only its error.
    todo_epochs = max(0, tune.trials - finished(study)) * base.epochs
    bars: list[tqdm] = []
    tick = threading.Lock()  # trials in threads update one bar (tqdm's update is not atomic)

    def progress() -> tqdm:
        with build:
            if not bars:
                bars.append(tqdm(total=todo_epochs, desc=f"tune {method}", unit="epoch", dynamic_ncols=True))
        return bars[0]

    def trial_fn(settings: dict[str, Any], report: Callable[[int, float], None]) -> float:
        cfg = with_overrides(base, settings)
        bar, seen = progress(), 0
        if cfg.epochs != base.epochs:  # epochs is in the space
            with tick:
                bar.total += cfg.epochs - base.epochs
                bar.refresh()

        def on_epoch(h: EpochLog) -> None:
            nonlocal seen
            seen += 1
            with tick:
                bar.update(1)
                bar.set_postfix(epoch=h.epoch, score=f"{score(h):.4f}")
            report(h.epoch, score(h))

        try:
            history, _ = train_trial(paths, cfg, method, fraction=tune.holdout_fraction,
                                     split_seed=tune.holdout_seed, device=device, build_lock=build, on_epoch=on_epoch)
        except TrainingDiverged:
            return 0.0  # a setting that diverges scores as badly as a guess
        finally:
            with tick:
                bar.update(max(0, cfg.epochs - seen))
        return score(history[-1])

    def on_trial(t: Any) -> None:
        bar = progress()
        with tick:
            bar.write(f"tune {method}: trial {t.number} {t.state.name} "
                      f"{'' if t.value is None else f'{t.value:.4f} '}{t.user_attrs.get('settings')}")
        sys.stdout.flush()  # tqdm.write does not flush: a log file would get the lines at exit

    jobs = tune.n_jobs or default_jobs(base, device)
    try:
        ran = run_study(study, lock=where / f"{method}.lock", space=space, trial_fn=trial_fn, trials=tune.trials,
                        n_jobs=jobs, on_trial=on_trial)
    except StudyBusy as exc:
        raise ConfigError(str(exc)) from exc
    finally:
        for bar in bars:
            bar.close()
    summary = study_summary(study, method=method, identity=identity)
    summary["ran_now"], summary["n_jobs"] = ran, jobs
    write_json(where / f"{method}.json", summary)
    write_plot(summary, where / f"{method}.png")
    best = summary["best"]
    if best is not None:
        text = best_params_yaml(method, best["settings"], score=best["value"], trial=best["number"])
        (where / f"{method}.best.yaml").write_text(text)
        print(f"tune {method}: best trial {best['number']} carved-val top-1 {best['value']:.4f} "
              f"({summary['counts']['COMPLETE']} complete, {summary['counts']['PRUNED']} pruned); "
              f"{where / f'{method}.best.yaml'}:\n  dvc exp run " + " ".join(set_param_flags(method, best["settings"])))
    return summary
