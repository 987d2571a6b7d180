#!/usr/bin/env bash
# TAKD part 2 (Mirzadeh et al. 2020): the ResNet-8 student learns by KD from the ResNet-20
# assistant that `studies/cifar10.sh assistant` distilled from the ResNet-56 cache. Run it in
# a second workspace (a clone beside the first, sharing its DVC cache) after copying the
# assistant there right after that piece (a later experiment replaces the first workspace's
# students; the assistant stays in the DVC cache under the md5 that the assistant-s0
# experiment's dvc.lock lists for models/students/kd.safetensors):
#   mkdir -p models && cp ../<first>/models/students/kd.safetensors models/assistant.safetensors
#   studies/takd.sh 0 1 2
# The assistant is frozen as this workspace's teacher and cached once by `embed`; each seed
# is one `cifd distill --method kd` plus `cifd evaluate` with its own params file
# (params_takd_s<seed>.yaml), writing metrics_takd_s<seed>/. No RDMs are trained: KD needs none.
set -euo pipefail
[ -f models/assistant.safetensors ] || { echo "models/assistant.pt is missing: copy the assistant's kd.safetensors here first" >&2; exit 2; }
cp presets/cifar10_takd.yaml params.yaml
uv run dvc repro embed  # prepare (restored from the shared cache), the assistant as teacher, its cache
for s in ${*:-0 1 2}; do
    params=params_takd_s$s.yaml
    uv run python - "$s" "$params" <<'PY'
import sys
import yaml
seed, out = int(sys.argv[1]), sys.argv[2]
params = yaml.safe_load(open("params.yaml"))
params["distill"]["seed"] = seed
for key, path in (("students", "models/students_takd_s"), ("metrics", "metrics_takd_s"), ("plots", "plots_takd_s")):
    params["paths"][key] = f"{path}{seed}"
yaml.safe_dump(params, open(out, "w"), sort_keys=False)
PY
    uv run cifd distill --params "$params" --method kd
    uv run cifd evaluate --params "$params"
done
