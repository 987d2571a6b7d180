"""The digits default's students over seeds, scored on the val split evaluate reports (for
reporting the spread only; nothing here chooses a setting).

    uv run python studies/digits_seeds.py OUT.jsonl METHOD SEEDS [PARAMS]

e.g. ``uv run python studies/digits_seeds.py docs/digits_seeds.jsonl cifd 1,2``. Appends one
JSON line per seed (final val top-1 and agreement). Needs ``uv run dvc repro`` once. PARAMS
(default ``params.yaml``): another params file on the same cache, e.g. with other students
or ``distill.per_method`` settings (the method's own settings apply).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pipeline.train.distill import train_student
from schemas.config import DistillConfig, load_stage
from stages.distill import build_inputs
from stages.tune import with_overrides


def main(out: str, method: str, seeds: str, params: str = "params.yaml") -> None:
    torch.set_num_threads(1)
    paths, base = load_stage(Path(params), "distill", DistillConfig)
    base = base.for_method(method)
    for seed in (int(s) for s in seeds.split(",")):
        cfg = with_overrides(base, {"seed": seed, "threads": 1})
        inputs = build_inputs(paths, cfg, method, device=torch.device("cpu"))
        run = inputs.run
        run.checkpoint = None
        history = train_student(inputs.student, run=run, info=inputs.info, batches=inputs.batches, val=inputs.val)
        record = {"method": method, "seed": seed, "params": params, "val_top1": round(history[-1].val_top1, 5),
                  "agreement": round(history[-1].val_agreement, 5)}
        print(json.dumps(record), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
