#!/usr/bin/env bash
# The GPU check (issue 12): CUDA tests, then stage one (embed) and stage three (distill) on the
# full CIFAR-10 on the device, in under 8 minutes. Needs the carry folders of bench/gpu_pack.sh
# (.gpu/a from an earlier call on the same warm machine, .gpu/b in this one).
#   OUT=/some/dir bash bench/gpu_check.sh                 # on the GPU machine ($OUT is given there)
#   SMOKE=1 OUT=/tmp/gpu_out PYTHON=python uv run bash bench/gpu_check.sh   # CPU smoke test, here
# Writes under $OUT: log.txt (everything), summary.json (status and seconds of every step,
# rewritten after each), env.txt, pytest.txt, prepare.json, embed.json, distill.json.
# A failed or timed-out step is recorded and the next steps still run.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_out}"
PY="${PYTHON:-python3}"
SMOKE="${SMOKE:-0}"
WORK="${WORK:-/tmp/cifd-gpu-work}"
BUDGET="${BUDGET:-465}"   # seconds for the whole script (the lead's run has 8 minutes)
mkdir -p "$OUT" "$WORK"
T0=$(date +%s)
STATUS=()

record() {  # name rc seconds: append to summary.json, rewritten whole each time
  STATUS+=("{\"step\": \"$1\", \"rc\": $2, \"seconds\": $3}")
  local IFS=,
  printf '{"smoke": %s, "elapsed_s": %s, "steps": [%s]}\n' "$([[ $SMOKE == 1 ]] && echo true || echo false)" \
    "$(( $(date +%s) - T0 ))" "${STATUS[*]}" > "$OUT/summary.json"
}

step() {  # name limit_s command...: run with a time limit inside the remaining budget
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  (( limit > left )) && limit=$left
  if (( limit < 5 )); then echo "=== $name: skipped, budget spent"; record "$name" -2 0; return; fi
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  local began=$(date +%s)
  timeout -k 10 "$limit" "$@"
  local rc=$?
  local took=$(( $(date +%s) - began ))
  (( rc == 124 || rc == 137 )) && echo "=== $name: TIMED OUT after ${took}s" || echo "=== $name: rc $rc in ${took}s"
  record "$name" "$rc" "$took"
}

assemble() {  # train.tar from .gpu/a + .gpu/b, checked against the sums gpu_pack.sh recorded
  local d="$WORK/shared"
  mkdir -p "$d/data/cifar10-jpeg" "$d/models"
  cat .gpu/a/train.tar.part-a .gpu/b/train.tar.part-b > "$d/data/cifar10-jpeg/train.tar" || return 1
  ln -sf "$PWD/.gpu/b/test.tar" "$d/data/cifar10-jpeg/test.tar"
  ln -sf "$PWD/.gpu/b/cifar10-resnet56.th" "$d/models/cifar10-resnet56.th"
  local sums="$PWD/.gpu/b/SHA256SUMS"
  ( cd "$d/data/cifar10-jpeg" && grep -E ' (train|test)\.tar$' "$sums" | sha256sum -c - ) &&
  ( cd "$d/models" && grep -E ' cifar10-resnet56\.th$' "$sums" | sha256sum -c - )
}

install_wheels() {
  if [[ $SMOKE == 1 ]]; then echo "SMOKE: wheels not installed (the venv has them)"; return 0; fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/b/whl/*.whl
}

environment() {
  { nvidia-smi || echo "no nvidia-smi"
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory >> 20, "MiB")
import numpy, zarr, numcodecs, dask, distributed, webdataset, timm, torchvision
for m in (numpy, zarr, numcodecs, dask, distributed, webdataset, timm, torchvision):
    print(m.__name__, m.__version__)
EOF
  } 2>&1 | tee "$OUT/env.txt"
}

cuda_tests() {  # every test marked gpu (they skip themselves without CUDA)
  "$PY" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors -rs tests 2>&1 | tee "$OUT/pytest.txt"
}

export -f assemble install_wheels environment cuda_tests  # `timeout` runs them through bash -c
export OUT PY SMOKE WORK

main() {
  echo "gpu_check: SMOKE=$SMOKE OUT=$OUT WORK=$WORK PY=$PY budget ${BUDGET}s; $(nproc) CPUs"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  [[ $SMOKE == 1 ]] || export PYTHONPATH="/tmp/site:$PYTHONPATH"
  export CIFD_SHARED="$WORK/shared"
  step assemble 60 bash -c assemble
  step install 60 bash -c install_wheels
  step environment 30 bash -c environment
  step cuda_tests 60 bash -c cuda_tests
  local args=(--work "$WORK" --threads "${THREADS:-8}")
  if [[ $SMOKE == 1 ]]; then
    args=(--work "$WORK" --device cpu --threads 2 --train 500 --val 100 --shard-size 100 --chunk-rows 50 --views 4
          --embed-batch-size 200 --bare-images 200 --rdm-epochs 1 --epochs 1 --batch-size 64)
  fi
  step prepare 120 "$PY" bench/gpu_stages.py prepare "${args[@]}" --out "$OUT/prepare.json"
  step embed 120 "$PY" bench/gpu_stages.py embed "${args[@]}" --out "$OUT/embed.json"
  step distill 180 "$PY" bench/gpu_stages.py distill "${args[@]}" --out "$OUT/distill.json"
  echo "gpu_check: done in $(( $(date +%s) - T0 ))s"; cat "$OUT/summary.json"
}

main 2>&1 | tee "$OUT/log.txt"
