"""The scale benchmark's CI smoke size: 20,000 rows through every stage as the CLI runs them
(prepare, embed, rdm, distill kd; stream mode), with memory sampled from /proc."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_scale_smoke_runs_every_stage_at_20k_rows(tmp_path) -> None:
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--smoke", "--threads", "1",
                           "--work", str(tmp_path), "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (size,) = result["sizes"]
    assert size["rows"] == 20000 and size["val_rows"] == 2000
    assert set(size["stages"]) == {"prepare", "embed", "rdm_stream", "distill_kd_stream"}
    for name, stage in size["stages"].items():
        assert stage["peak_rss_mib"] > 50, name  # the sampler saw the process (torch alone is more)
    assert size["stages"]["distill_kd_stream"]["processes"] >= 2  # the loader worker was sampled too
    assert size["stages"]["rdm_stream"]["rows_per_s"] > 0 and size["stages"]["distill_kd_stream"]["rows_per_s"] > 0
    assert size["embed_metrics"]["teacher_forwards"] == (20000 + 2000) * 2
    # from_head: D = 512 float16 embeddings per view (1,024 bytes before compression, which
    # gains little on these) and no logits; the RDM store: 3 x̂ of 512 float16 values per view.
    per_view = size["bytes_per_sample_view"]
    assert 700 < per_view["teacher_cache"] < 1100 and 2200 < per_view["rdm_cache_stream"] < 3200
