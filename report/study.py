"""Aggregate DVC experiments into a results table: mean ± std over seeds.

A study is a set of ``dvc exp run`` experiments on one pipeline. Each experiment is named
``<variant>-s<seed>`` (``main-s0``, ``rdm1-s2``, ``takd-s1``); experiments that share a
variant are the seeds of one row group. The input is what ``dvc exp show --json`` prints,
so the table is computed from the experiments DVC recorded, not from loose files.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from schemas import metrics as M

_NAME = re.compile(r"^(?P<variant>.+)-s(?P<seed>\d+)$")


class StudyError(ValueError):
    """The experiment listing cannot be turned into a table (what is wrong, and the fix)."""


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One finished experiment: its name, flat params and its metrics files."""

    name: str
    variant: str
    seed: int
    params: Mapping[str, Any]
    metrics: Mapping[str, Mapping[str, Any]]  # metrics file path -> its JSON

    def evaluate(self) -> Mapping[str, Mapping[str, float]]:
        """The ``evaluate.json`` table (method -> figures), wherever paths.metrics put it."""
        for path, data in self.metrics.items():
            if path.endswith("/" + M.EVALUATE) or path == M.EVALUATE:
                return data
        raise StudyError(f"experiment '{self.name}' has no {M.EVALUATE} metrics; did its evaluate stage run?")


@dataclasses.dataclass(frozen=True)
class Summary:
    """One (variant, method) row: the mean and sample std over its seeds."""

    variant: str
    method: str
    seeds: tuple[int, ...]
    top1: tuple[float, float]
    agreement: tuple[float, float]
    seconds: tuple[float, float] | None  # distill wall time, when recorded


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"distill": {"seed": 1}}`` -> ``{"distill.seed": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _file_data(section: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{"params.yaml": {"data": {...}}}`` -> ``{"params.yaml": {...}}``, skipping errored files."""
    return {path: entry["data"] for path, entry in (section or {}).items() if isinstance(entry, Mapping)
            and isinstance(entry.get("data"), Mapping)}


def _walk(rows: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """Every finished experiment record in ``dvc exp show --json`` output (DVC 3 layout).

    A running, queued or failed experiment has an ``executor`` whose data are the
    workspace's current files, i.e. another experiment's metrics: it is skipped.
    """
    for row in rows:
        for group in row.get("experiments") or ():
            executor = group.get("executor")
            if executor and executor.get("state") != "success":
                continue
            for rev in group.get("revs") or ():
                yield rev
                yield from _walk([rev])


def parse_exp_show(listing: Iterable[Mapping[str, Any]]) -> list[Experiment]:
    """The named experiments ``<variant>-s<seed>`` of a ``dvc exp show --json`` listing.

    Experiments that failed or carry another naming scheme are skipped; an experiment name
    seen twice (the same listing passed twice) is an error rather than a double count.
    """
    found: dict[str, Experiment] = {}
    for rev in _walk(listing):
        name = rev.get("name") or ""
        match = _NAME.match(name)
        data = rev.get("data") or {}
        if match is None or rev.get("error") or not data:
            continue
        params: dict[str, Any] = {}
        for values in _file_data(data.get("params")).values():
            params.update(flatten(values))
        experiment = Experiment(name=name, variant=match["variant"], seed=int(match["seed"]), params=params,
                                metrics=_file_data(data.get("metrics")))
        if name in found:
            raise StudyError(f"experiment '{name}' appears twice; pass each `dvc exp show --json` listing once")
        found[name] = experiment
    return sorted(found.values(), key=lambda e: (e.variant, e.seed))


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    xs = [float(v) for v in values]
    if not xs:
        raise StudyError("no values to average")
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def summarize(experiments: Iterable[Experiment]) -> list[Summary]:
    """One row per (variant, method) over the variant's seeds, teacher row excluded."""
    by_key: dict[tuple[str, str], list[tuple[int, Mapping[str, float]]]] = {}
    for experiment in experiments:
        for method, row in experiment.evaluate().items():
            if method == "teacher":
                continue
            by_key.setdefault((experiment.variant, method), []).append((experiment.seed, row))
    out = []
    for (variant, method), rows in by_key.items():
        seeds = tuple(seed for seed, _ in rows)
        if len(set(seeds)) != len(seeds):
            raise StudyError(f"variant '{variant}' has seed(s) {sorted(seeds)} twice for method '{method}'")
        times = [row[M.EVAL_SECONDS] for _, row in rows if M.EVAL_SECONDS in row]
        out.append(Summary(
            variant=variant, method=method, seeds=seeds,
            top1=mean_std(row[M.EVAL_TOP1] for _, row in rows),
            agreement=mean_std(row[M.EVAL_AGREEMENT] for _, row in rows),
            seconds=mean_std(times) if len(times) == len(rows) else None,
        ))
    return out


def teacher_top1(experiments: Iterable[Experiment]) -> dict[str, float]:
    """The teacher's top-1 per variant (identical over seeds of one cache)."""
    return {e.variant: float(e.evaluate()["teacher"][M.EVAL_TOP1]) for e in experiments
            if "teacher" in e.evaluate()}


def cost_vs_kd(rows: Iterable[Summary]) -> dict[tuple[str, str], float]:
    """Mean distill wall time of each row over the same variant's KD row (same cache, same
    student), for the rows where both times were recorded."""
    rows = list(rows)
    kd = {r.variant: r.seconds[0] for r in rows if r.method == "kd" and r.seconds}
    return {(r.variant, r.method): r.seconds[0] / kd[r.variant] for r in rows
            if r.seconds and kd.get(r.variant)}


def markdown_table(rows: Iterable[Summary], *, percent: bool = True) -> str:
    """A Markdown table: variant, method, seeds, top-1 and agreement as mean ± std, wall
    time and its ratio to KD's."""
    rows = list(rows)
    ratios = cost_vs_kd(rows)
    scale = 100.0 if percent else 1.0
    unit = " (%)" if percent else ""
    lines = [f"| variant | method | seeds | top-1{unit} | agreement{unit} | distill wall time (s) | time / KD |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        time = f"{row.seconds[0]:.0f} ± {row.seconds[1]:.0f}" if row.seconds else "n/a"
        ratio = ratios.get((row.variant, row.method))
        lines.append(f"| {row.variant} | {row.method} | {len(row.seeds)} | "
                     f"{row.top1[0] * scale:.2f} ± {row.top1[1] * scale:.2f} | "
                     f"{row.agreement[0] * scale:.2f} ± {row.agreement[1] * scale:.2f} | {time} | "
                     f"{'n/a' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(lines) + "\n"
