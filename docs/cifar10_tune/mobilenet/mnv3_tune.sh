#!/usr/bin/env bash
# Issue 14 item 4: tune KD, DGKD, CIFD for the MobileNetV3 student (6 trials each, one thread).
set -uo pipefail
cd /work/cifar
for m in cifd kd dgkd; do uv run cifd tune --method "$m" --params "params_tune_mnv3_$m.yaml" > "runs/tune_mnv3_$m.log" 2>&1; done
echo done > runs/MNV3_DONE
