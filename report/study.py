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
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
    """One (variant, method) row: the mean and sample std over its seeds that finished.

    A seed whose top-1, agreement or KL is NaN / inf diverged (a NaN student predicts one
    class: its top-1 is chance, not a result); it is counted in ``diverged`` and left out of
    the means. When every seed diverged, the figures are NaN.
    """

    variant: str
    method: str
    seeds: tuple[int, ...]
    top1: tuple[float, float]
    agreement: tuple[float, float]
    seconds: tuple[float, float] | None  # distill wall time, when recorded
    kl: tuple[float, float] = (math.nan, math.nan)  # KL(teacher ‖ student)
    diverged: int = 0  # seeds left out because a figure is NaN / inf
    teacher_forwards: float | None = None  # behind the targets learned from (mean over seeds), when recorded

    @property
    def failed(self) -> bool:
        """Every seed diverged: nothing to show but the mark."""
        return self.diverged == len(self.seeds)


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


def diverged(row: Mapping[str, float]) -> bool:
    """A run whose top-1, agreement or KL is missing, NaN or inf."""
    return not all(isinstance(row.get(k), (int, float)) and math.isfinite(row[k])
                   for k in (M.EVAL_TOP1, M.EVAL_AGREEMENT, M.EVAL_KL))


def summary(variant: str, method: str, rows: list[tuple[int, Mapping[str, float]]]) -> Summary:
    """One row from the (seed, evaluate figures) of its runs."""
    seeds = tuple(seed for seed, _ in rows)
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"variant '{variant}' has seed(s) {sorted(seeds)} twice for method '{method}'")
    good = [row for _, row in rows if not diverged(row)]
    nan = (math.nan, math.nan)
    times = [row[M.EVAL_SECONDS] for _, row in rows if M.EVAL_SECONDS in row]
    forwards = [row[M.EVAL_TEACHER_FORWARDS] for _, row in rows if M.EVAL_TEACHER_FORWARDS in row]
    return Summary(
        variant=variant, method=method, seeds=seeds,
        top1=mean_std(row[M.EVAL_TOP1] for row in good) if good else nan,
        agreement=mean_std(row[M.EVAL_AGREEMENT] for row in good) if good else nan,
        seconds=mean_std(times) if len(times) == len(rows) else None,
        kl=mean_std(row[M.EVAL_KL] for row in good) if good else nan,
        diverged=len(rows) - len(good),
        teacher_forwards=sum(forwards) / len(forwards) if len(forwards) == len(rows) else None,
    )


def summarize(experiments: Iterable[Experiment]) -> list[Summary]:
    """One row per (variant, method) over the variant's seeds, teacher row excluded."""
    by_key: dict[tuple[str, str], list[tuple[int, Mapping[str, float]]]] = {}
    for experiment in experiments:
        for method, row in experiment.evaluate().items():
            if method == "teacher":
                continue
            by_key.setdefault((experiment.variant, method), []).append((experiment.seed, row))
    return [summary(variant, method, rows) for (variant, method), rows in by_key.items()]


@dataclasses.dataclass(frozen=True)
class Paired:
    """Top-1 of one (variant, method) minus its reference's, seed by seed: the seeds both ran
    and neither diverged. Seeds pair runs that share a seed's draws (init, batch order), so
    the spread of the differences is what decides whether the two differ, not each row's own
    spread. ``interval``: the 95 % Student-t interval of the mean difference (two seeds or more)."""

    variant: str
    method: str
    reference: str  # "<variant>/<method>" of the row subtracted
    seeds: tuple[int, ...]
    differences: tuple[float, ...]  # top-1 points (fractions, like the rows)
    mean: float
    std: float  # sample std of the differences (0 for one seed)
    interval: tuple[float, float] | None


def _top1_by_seed(experiments: Iterable[Experiment]) -> dict[tuple[str, str], dict[int, float]]:
    table: dict[tuple[str, str], dict[int, float]] = {}
    for experiment in experiments:
        for method, row in experiment.evaluate().items():
            if method != "teacher" and not diverged(row):
                table.setdefault((experiment.variant, method), {})[experiment.seed] = float(row[M.EVAL_TOP1])
    return table


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """The Student-t interval of the mean of ``values`` (None for fewer than two)."""
    from scipy import stats

    if len(values) < 2:
        return None
    mean, std = mean_std(values)
    half = float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1)) * std / math.sqrt(len(values))
    return mean - half, mean + half


def paired(experiments: Iterable[Experiment], *, variant: str | None = None,
           method: str | None = None) -> list[Paired]:
    """Paired top-1 differences of every (variant, method) against the same method in
    ``variant``, or against ``method`` in the same variant (exactly one of the two). Rows
    with no reference, or no seed in common with it, are left out."""
    if (variant is None) == (method is None):
        raise StudyError("pair against a variant or a method, not both or neither")
    table = _top1_by_seed(experiments)
    known = sorted({v for v, _ in table}) if variant is not None else sorted({m for _, m in table})
    if (variant if variant is not None else method) not in known:
        kind, name = ("variant", variant) if variant is not None else ("method", method)
        raise StudyError(f"no {kind} '{name}' to pair against; the listing has {kind}s {known}")
    out = []
    for (v, m), seeds in table.items():
        ref = (variant, m) if variant is not None else (v, method)
        if (v, m) == ref or ref not in table:
            continue
        common = tuple(sorted(set(seeds) & set(table[ref])))
        if not common:
            continue
        diffs = tuple(seeds[s] - table[ref][s] for s in common)
        mean, std = mean_std(diffs)
        out.append(Paired(variant=v, method=m, reference=f"{ref[0]}/{ref[1]}", seeds=common,
                          differences=diffs, mean=mean, std=std, interval=t_interval(diffs)))
    return out  # in the order of the experiments (variant by variant)


def paired_table(pairs: Iterable[Paired]) -> str:
    """A Markdown table of paired differences in top-1 points (percent)."""
    lines = ["| variant | method | minus | seeds | top-1 difference (points) | 95 % interval | per seed |",
             "|---|---|---|---|---|---|---|"]
    for p in pairs:
        spread = f" ± {100 * p.std:.2f}" if len(p.seeds) > 1 else ""
        interval = "n/a" if p.interval is None else f"[{100 * p.interval[0]:+.2f}, {100 * p.interval[1]:+.2f}]"
        per_seed = ", ".join(f"s{s} {100 * d:+.2f}" for s, d in zip(p.seeds, p.differences))
        lines.append(f"| {p.variant} | {p.method} | {p.reference} | {len(p.seeds)} | {100 * p.mean:+.2f}{spread} | "
                     f"{interval} | {per_seed} |")
    return "\n".join(lines) + "\n"


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


def _figure(value: tuple[float, float], *, scale: float, digits: int, spread: bool) -> str:
    mean, std = value
    return f"{mean * scale:.{digits}f}" + (f" ± {std * scale:.{digits}f}" if spread else "")


def _cells(row: Summary, ratio: float | None, *, scale: float, spread: bool) -> list[str]:
    """The figures of one row as text: 'diverged' instead of numbers for a failed row, and a
    count of the seeds left out otherwise."""
    if row.failed:
        return ["diverged", "diverged", "diverged"] + ([f"{row.seconds[0]:.0f}"] if row.seconds else ["n/a"]) + ["n/a"]
    note = f" ({row.diverged} diverged)" if row.diverged else ""
    time = "n/a" if row.seconds is None else _figure(row.seconds, scale=1.0, digits=0, spread=spread)
    return [_figure(row.top1, scale=scale, digits=2, spread=spread) + note,
            _figure(row.agreement, scale=scale, digits=2, spread=spread),
            _figure(row.kl, scale=1.0, digits=4, spread=spread), time,
            "n/a" if ratio is None else f"{ratio:.2f}"]


def markdown_table(rows: Iterable[Summary], *, percent: bool = True) -> str:
    """A Markdown table: variant, method, seeds, top-1, agreement and KL as mean ± std (one
    seed: its figures, no spread to show), wall time and its ratio to KD's; a row whose seeds
    all diverged says so instead of numbers."""
    rows = list(rows)
    ratios = cost_vs_kd(rows)
    scale = 100.0 if percent else 1.0
    unit = " (%)" if percent else ""
    lines = [f"| variant | method | seeds | top-1{unit} | agreement{unit} | KL(T‖S) | distill wall time (s) | "
             "time / KD |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = _cells(row, ratios.get((row.variant, row.method)), scale=scale, spread=len(row.seeds) > 1)
        lines.append(f"| {row.variant} | {row.method} | {len(row.seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def text_table(rows: Iterable[Summary], *, width: int = 120) -> str:
    """The method table for a terminal, at most ``width`` columns: one line per (variant,
    method), mean ± std where a row has several seeds. Long variant names are shortened."""
    rows = list(rows)
    ratios = cost_vs_kd(rows)
    spread = any(len(r.seeds) > 1 for r in rows)
    header = ["variant", "method", "seeds", "top-1 %", "agree %", "KL(T‖S)", "wall s", "×KD"]
    body = [[r.variant, r.method, str(len(r.seeds)),
             *_cells(r, ratios.get((r.variant, r.method)), scale=100.0, spread=spread)] for r in rows]
    if not any(r.variant for r in rows):  # one workspace: no variant column
        header, body = header[1:], [line[1:] for line in body]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    if "variant" in header:  # shorten the first column to what the others leave
        widths[0] = max(8, min(widths[0], width - sum(widths[1:]) - 2 * (len(widths) - 1)))
    out = []
    for line in [header, *body]:
        cells = [c if len(c) <= w else c[:w - 1] + "…" for c, w in zip(line, widths)]
        text = "  ".join(c.ljust(w) if h in ("variant", "method") else c.rjust(w)
                         for c, w, h in zip(cells, widths, header))
        out.append(text.rstrip())
    return "\n".join(out) + "\n"
