#!/usr/bin/env bash
set -uo pipefail
cd /work/cifar
one() { uv run python studies/digits_seeds.py runs/tuned_seeds.jsonl "$1" "$2" "$3" >> runs/seeds2.log 2>&1; }
(one kd 2 params_tuned.yaml; one dgkd 1 params_tuned.yaml; one ce 1 params_ce.yaml) &
(one cifd 2 params_tuned.yaml; one dgkd 2 params_tuned.yaml; one ce 2 params_ce.yaml) &
wait
echo done > runs/SEEDS2_DONE
