"""Why CIFD loses to KD on the digits default: students on a validation split carved from
train (20 % of it, seed 0; the reported val split is never read), one thread each.

    uv run python studies/digits_cifd.py OUT.jsonl NAME METHOD SEEDS [key=value ...]

e.g. ``uv run python studies/digits_cifd.py docs/digits_cifd_runs.jsonl beta10 cifd 0,1,2
feature_weight=10``. Appends one JSON line per (config, seed): the overrides, the per-epoch
carved-val top-1 and the wall seconds. Needs the digits pipeline run once (``uv run dvc
repro``) for the cache and RDMs. About 15-30 s per student on one core.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml

from schemas.config import DistillConfig, load_stage
from stages.tune import train_trial, with_overrides

FRACTION, SPLIT_SEED = 0.2, 0


def main(out: str, name: str, method: str, seeds: str, *pairs: str) -> None:
    torch.set_num_threads(1)
    paths, base = load_stage(Path("params.yaml"), "distill", DistillConfig)
    overrides = {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in pairs)}
    for seed in (int(s) for s in seeds.split(",")):
        cfg = with_overrides(base, {**overrides, "seed": seed, "threads": 1})
        try:
            history, seconds = train_trial(paths, cfg, method, fraction=FRACTION, split_seed=SPLIT_SEED)
            record = {"name": name, "method": method, "seed": seed, "overrides": overrides,
                      "val_top1": [round(h.val_top1, 5) for h in history],
                      "final": round(history[-1].val_top1, 5), "seconds": round(seconds, 1)}
        except RuntimeError as exc:  # TrainingDiverged
            record = {"name": name, "method": method, "seed": seed, "overrides": overrides, "diverged": str(exc)}
        print(json.dumps(record), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
