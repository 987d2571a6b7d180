"""``cifd report``: the method table. Without listings, of this workspace (``evaluate.json``
under ``paths.metrics``); with ``dvc exp show --json`` listings, of the experiments (mean ± std
over seeds), also written to ``--out`` as study.json, study.md and study_top1.png (and
study_budget.png, top-1 against teacher forwards, when the experiments span several
budgets: ``distill.views`` / ``distill.rows_fraction``). ``--against-variant`` /
``--against-method`` add paired differences seed by seed (``report.study.paired``) to
study.md and study.json, and as study_paired_variant.png / study_paired_method.png."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from report.forest import plot_paired
from report.plots import plot_budget, plot_study
from report.study import (
    StudyError,
    cost_vs_kd,
    markdown_table,
    paired,
    paired_table,
    parse_exp_show,
    summarize,
    summary,
    teacher_top1,
    text_table,
)
from schemas import metrics as M
from schemas.config import DistillConfig, load_stage
from stages._io import write_json


def workspace(params: Path) -> None:
    """The method table of the last ``dvc repro`` in this workspace."""
    paths, cfg = load_stage(params, "distill", DistillConfig)
    path = Path(paths.metrics) / M.EVALUATE
    if not path.is_file():
        raise StudyError(f"no method table at {path}; run `dvc repro` (or `cifd evaluate`) first, or pass "
                         "`dvc exp show --json` listings: `dvc exp show --json > exps.json && cifd report exps.json`")
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StudyError(f"{path} is not JSON ({exc}); rerun `cifd evaluate`") from exc
    rows = [summary("", method, [(cfg.seed, row)]) for method, row in table.items() if method != "teacher"]
    print(text_table(rows), end="")
    if "teacher" in table:
        print(f"teacher top-1 {100 * table['teacher'][M.EVAL_TOP1]:.2f} %  ({path}; distill.seed {cfg.seed})")


def _finite(value: object) -> object:
    """NaN (a row whose seeds all diverged) as null: study.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _read(path: Path) -> object:
    try:
        return json.loads(sys.stdin.read() if str(path) == "-" else Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StudyError(f"cannot read {path} as `dvc exp show --json` output ({exc}); "
                         f"write it with `dvc exp show --json > exps.json`") from exc


def run(listings: Sequence[Path], out: Path, *, against_variant: str | None = None,
        against_method: str | None = None, variants: Sequence[str] = ()) -> None:
    experiments = []
    for path in listings:
        listing = _read(path)
        if not isinstance(listing, list):
            raise StudyError(f"{path} holds {type(listing).__name__}, not the list `dvc exp show --json` prints")
        experiments.extend(parse_exp_show(listing))
    names = [e.name for e in experiments]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise StudyError(f"experiment(s) {duplicates} appear in more than one listing; pass each once")
    if not experiments:
        raise StudyError("no experiments named '<variant>-s<seed>' in the listing(s); name them with "
                         "`dvc exp run -n main-s0 ...`")
    if variants:  # only these variants, in this order
        known = sorted({e.variant for e in experiments})
        missing = [v for v in variants if v not in known]
        if missing:
            raise StudyError(f"--variants {','.join(missing)}: not in the listing(s), which have {known}")
        experiments = sorted((e for e in experiments if e.variant in variants),
                             key=lambda e: (list(variants).index(e.variant), e.seed))
    rows = summarize(experiments)
    teachers = teacher_top1(experiments)
    ratios = cost_vs_kd(rows)
    pairs = {kind: paired(experiments, **{kind: name}) for kind, name in
             (("variant", against_variant), ("method", against_method)) if name is not None}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "study.json", {
        "experiments": {e.name: {"variant": e.variant, "seed": e.seed} for e in experiments},
        "teacher_top1": teachers,
        "rows": [_finite(dataclasses.asdict(r)) | {"time_vs_kd": ratios.get((r.variant, r.method))} for r in rows],
        **({"paired": {kind: [dataclasses.asdict(p) for p in found] for kind, found in pairs.items()}} if pairs else {}),
    })
    sections = [f"\nPaired top-1 differences against the same {kind} "
                f"'{against_variant if kind == 'variant' else against_method}', seed by seed:\n\n" + paired_table(found)
                for kind, found in pairs.items()]
    (out / "study.md").write_text(markdown_table(rows) + "".join(sections))
    for kind, found in pairs.items():
        name = against_variant if kind == "variant" else against_method
        plot_paired(found, title=f"paired top-1 differences against {kind} '{name}'",
                    path=out / f"study_paired_{kind}.png")
    plot_study(rows, teacher_top1=teachers, path=out / "study_top1.png")
    budget = plot_budget(rows, path=out / "study_budget.png")
    print(text_table(rows), end="")
    print("".join(sections), end="")
    plots = "study_top1.png" + (", study_budget.png" if budget else "") + "".join(
        f", study_paired_{kind}.png" for kind in pairs)
    print(f"report: {len(experiments)} experiments, {len(rows)} rows -> {out} (study.md, study.json, {plots})")
