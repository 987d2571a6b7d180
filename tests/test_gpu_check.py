"""``bench/gpu_check.sh --smoke``: the GPU check script itself, on the CPU, at a tiny size
(the shared CIFAR-10 JPEGs and ResNet-56; skipped where they are absent). Every step must
run and write its JSON: prepare, embed (stored and from_head caches), distill (KD, online
KD, fp32 KD, KD from the from_head cache, CIFD)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CIFD_SHARED") or ROOT.parent / "shared")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED / "data/cifar10-jpeg/train.tar").is_file()
                       or not (SHARED / "models/cifar10-resnet56.th").is_file(),
                       reason="needs the shared CIFAR-10 JPEGs and ResNet-56"),
]


def test_gpu_check_smoke_runs_every_step(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "WORK": str(tmp_path / "work"), "PYTHON": sys.executable,
           "CIFD_SHARED": str(SHARED), "BUDGET": "600", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s["rc"] for s in summary["steps"]}
    assert summary["smoke"] is True
    assert steps == {"environment": 0, "cuda_tests": 0, "prepare": 0, "embed": 0, "distill": 0}, run.stdout[-3000:]
    assert run.returncode == 0
    embed = json.loads((out / "embed.json").read_text())
    disk = embed["stage_from_head"]["bytes_per_sample_view_on_disk"]
    assert disk["from_head"] < disk["stored_float32"]  # no logits stored
    distill = json.loads((out / "distill.json").read_text())
    for name in ("kd", "online_kd", "kd_fp32", "kd_from_head", "cifd"):
        assert "error" not in distill["variants"][name], distill["variants"][name]
        assert distill["variants"][name]["images_per_s"] > 0
    assert distill["ratios"]["kd_from_head_over_kd"] is not None
    assert "passed" in (out / "pytest.txt").read_text() or "skipped" in (out / "pytest.txt").read_text()
    # a failed step makes the script fail
    bad = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                         env={**env, "OUT": str(tmp_path / "bad"), "BUDGET": "1"}, timeout=120)
    assert bad.returncode == 1
