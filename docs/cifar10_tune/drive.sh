#!/usr/bin/env bash
# Issue 14 item 4, first step, on this 2-core machine: tune KD, DGKD and CIFD (6 trials each,
# two side by side, one thread each) on the carved 20 % of the 10k CIFAR subset.
set -uo pipefail
cd /work/cifar
while pgrep -f "dvc repro rdm" >/dev/null; do sleep 20; done
for m in kd dgkd cifd; do uv run cifd tune --method "$m" --params "params_tune_$m.yaml" > "runs/tune_$m.log" 2>&1; done
echo done > runs/DONE
