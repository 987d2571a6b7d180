#!/usr/bin/env bash
# The GPU check (issue 12): CUDA tests, then stage one (embed, stored and from_head caches) and
# stage three (distill: KD, online KD, fp32 KD, KD from the from_head cache, CIFD) on the full
# CIFAR-10 (all 50,000 train images held on the device, bf16 autocast, channels-last), in under
# 8 minutes. Needs the carry folders of bench/gpu_pack.sh (.gpu/a from an earlier call on the
# same warm machine, .gpu/b in this one).
#   OUT=/some/dir bash bench/gpu_check.sh       # on the GPU machine ($OUT is given there)
#   bash bench/gpu_check.sh                     # default OUT: bench/results/gpu
#   OUT=/tmp/gpu_out PYTHON=.venv/bin/python bash bench/gpu_check.sh --smoke
#       # the CPU smoke test of this script, here (tests/test_gpu_check.py): a few hundred
#       # images from ../shared (CIFD_SHARED), one epoch, no wheels, no .gpu folders
# Writes under $OUT: log.txt (everything), summary.json (status and seconds of every step,
# rewritten after each), env.txt, pytest.txt, prepare.json, embed.json, distill.json.
# A failed or timed-out step is recorded and the next steps still run; the exit status is 1
# when any step failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
SMOKE="${SMOKE:-0}"
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
OUT="${OUT:-bench/results/gpu}"
PY="${PYTHON:-python3}"
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

cuda_tests() {  # every test marked gpu (they skip themselves without CUDA), collected from their files only
  local files
  files=$(grep -rl --include='test_*.py' 'mark.gpu' tests | sort)
  "$PY" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors -rs $files 2>&1 | tee "$OUT/pytest.txt"
}

export -f assemble install_wheels environment cuda_tests  # `timeout` runs them through bash -c
export OUT PY SMOKE WORK

main() {
  echo "gpu_check: SMOKE=$SMOKE OUT=$OUT WORK=$WORK PY=$PY budget ${BUDGET}s; $(nproc) CPUs"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  if [[ $SMOKE == 1 ]]; then  # the shared data as it is here: nothing to assemble or install
    export CIFD_SHARED="${CIFD_SHARED:-$(cd .. && pwd)/shared}"
  else
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
    export CIFD_SHARED="$WORK/shared"
    step assemble 60 bash -c assemble
    step install 60 bash -c install_wheels
  fi
  step environment 60 bash -c environment
  step cuda_tests 120 bash -c cuda_tests  # collecting the suite took over 60 s on a loaded 2-core machine
  local args=(--work "$WORK" --threads "${THREADS:-8}")
  if [[ $SMOKE == 1 ]]; then
    args=(--work "$WORK" --device cpu --threads 1 --train 100 --val 50 --shard-size 50 --chunk-rows 25 --views 2
          --embed-batch-size 100 --bare-images 50 --rdm-epochs 1 --epochs 1 --batch-size 64)
  fi
  step prepare 120 "$PY" bench/gpu_stages.py prepare "${args[@]}" --out "$OUT/prepare.json"
  step embed 120 "$PY" bench/gpu_stages.py embed "${args[@]}" --out "$OUT/embed.json"
  step distill 240 "$PY" bench/gpu_stages.py distill "${args[@]}" --out "$OUT/distill.json"
  echo "gpu_check: done in $(( $(date +%s) - T0 ))s"; cat "$OUT/summary.json"
}

main 2>&1 | tee "$OUT/log.txt"
# The exit status: 1 when a step failed or timed out (summary.json says which).
! grep -qE '"rc": [^0]' "$OUT/summary.json"
