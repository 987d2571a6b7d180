#!/usr/bin/env bash
# Issue 14 item 4, MobileNetV3 student: 3 seeds per method with each method's best carved-split
# settings (CE: the preset's), full 10k subset, scored on the 10,000 test images.
set -uo pipefail
cd /work/cifar
uv run python - <<'PY'
import yaml
p = yaml.safe_load(open("presets/cifar10.yaml"))
p["distill"]["student"] = "mobilenetv3_small_050"
yaml.safe_dump(p, open("params_mnv3_ce.yaml", "w"), sort_keys=False)
PY
one() { uv run python studies/digits_seeds.py runs/mnv3_seeds.jsonl "$1" "$2" "$3" >> runs/mnv3_seeds.log 2>&1; }
tuned() {
    while [ ! -f runs/MNV3_DONE ]; do sleep 20; done
    uv run python - <<'PY'
import yaml
p = yaml.safe_load(open("params_mnv3_ce.yaml"))
p["distill"]["per_method"] = {}
for m in ("kd", "dgkd", "cifd"):
    p["distill"]["per_method"].update(yaml.safe_load(open(f"tune_mnv3/{m}.best.yaml"))["distill"]["per_method"])
yaml.safe_dump(p, open("params_mnv3_tuned.yaml", "w"), sort_keys=False)
PY
}
lane1() {
    while pgrep -f "claims_copy.sh consistency" >/dev/null; do sleep 20; done
    one ce 0,1,2 params_mnv3_ce.yaml
    tuned; one cifd 0,1,2 params_mnv3_tuned.yaml
}
lane2() { tuned; one kd 0,1,2 params_mnv3_tuned.yaml; one dgkd 0,1,2 params_mnv3_tuned.yaml; }
lane1 & lane2 & wait
echo done > runs/MNV3_SEEDS_DONE
