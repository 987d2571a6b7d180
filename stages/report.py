"""``cifd report``: the study table (mean ± std over seeds) from ``dvc exp show --json``."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from report.plots import plot_study
from report.study import (
    StudyError,
    cost_vs_kd,
    markdown_table,
    parse_exp_show,
    summarize,
    teacher_top1,
)
from stages._io import write_json


def run(listings: Sequence[Path], out: Path) -> None:
    experiments = []
    for path in listings:
        try:
            listing = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StudyError(f"cannot read {path} as `dvc exp show --json` output ({exc}); "
                             f"write it with `uv run dvc exp show --json > {path}`") from exc
        experiments.extend(parse_exp_show(listing))
    names = [e.name for e in experiments]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise StudyError(f"experiment(s) {duplicates} appear in more than one listing; pass each once")
    if not experiments:
        raise StudyError("no experiments named '<variant>-s<seed>' in the listing(s); name them with "
                         "`dvc exp run -n main-s0 ...`")
    rows = summarize(experiments)
    teachers = teacher_top1(experiments)
    ratios = cost_vs_kd(rows)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "study.json", {
        "experiments": {e.name: {"variant": e.variant, "seed": e.seed} for e in experiments},
        "teacher_top1": teachers,
        "rows": [dataclasses.asdict(r) | {"time_vs_kd": ratios.get((r.variant, r.method))} for r in rows],
    })
    table = markdown_table(rows)
    (out / "study.md").write_text(table)
    plot_study(rows, teacher_top1=teachers, path=out / "study_top1.png")
    print(table, end="")
    print(f"report: {len(experiments)} experiments, {len(rows)} rows -> {out}")
