#!/usr/bin/env bash
# After the tunes: 3 seeds per method with each method's best carved-split settings, on the
# full 10k subset, scored on the 10,000-image test split (the pipeline's val split).
set -uo pipefail
cd /work/cifar
while [ ! -f runs/DONE ]; do sleep 20; done
uv run python - <<'PY'
import yaml
p = yaml.safe_load(open("presets/cifar10.yaml"))
p["distill"]["per_method"] = {}
for m in ("kd", "dgkd", "cifd"):
    p["distill"]["per_method"].update(yaml.safe_load(open(f"tune/{m}.best.yaml"))["distill"]["per_method"])
yaml.safe_dump(p, open("params_tuned.yaml", "w"), sort_keys=False)
PY
one() { uv run python studies/digits_seeds.py runs/tuned_seeds.jsonl "$1" "$2" params_tuned.yaml >> runs/seeds.log 2>&1; }
(one cifd 0,1,2; one kd 2) & (one kd 0,1; one dgkd 0,1,2) & wait
echo done > runs/SEEDS_DONE
