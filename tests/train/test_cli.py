"""CPU smoke tests of ``cifd distill`` and ``cifd evaluate`` through the click CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

from click.testing import CliRunner

from schemas import metrics as M
from schemas.config import METHODS
from stages.cli import main


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_cli_distill_cifd(project, tmp_path: Path) -> None:
    from pipeline.models import load_model

    params = project.params(tmp_path)
    result = _invoke("distill", "--method", "cifd", "--params", str(params))
    assert result.exit_code == 0, result.output
    assert "distill cifd: val top-1" in result.output
    student, spec = load_model(tmp_path / "students" / "cifd.safetensors")
    assert spec["method"] == "cifd" and student.embed_dim == 8  # the bare backbone: no IBM, no projection
    assert not any(k.startswith(("ibm", "proj")) for k in student.state_dict())
    assert (tmp_path / "checkpoints" / "cifd.safetensors").is_file()  # outside the DVC outputs
    assert sorted(p.name for p in (tmp_path / "students").iterdir()) == ["cifd.safetensors"]
    assert (tmp_path / "plots" / "distill" / "cifd.csv").read_text().startswith("epoch,train_loss,val_top1")
    timing = json.loads((tmp_path / "metrics" / "distill" / "cifd.json").read_text())
    assert timing[M.SECONDS] > 0 and timing[M.DEVICE] == "cpu" and timing[M.EPOCHS] >= 1

    # A user error is one clear line and exit status 2, not a traceback.
    broken = project.params(tmp_path / "broken", paths={"rdm_cache": str(tmp_path / "missing.zarr")})
    result = _invoke("distill", "--method", "cifd", "--params", str(broken))
    assert result.exit_code == 2 and "error: no RDM cache at" in result.output


def test_cli_evaluate_after_every_method(project, tmp_path: Path) -> None:
    params = project.params(tmp_path)
    for method in METHODS:
        result = _invoke("distill", "--method", method, "--params", str(params))
        assert result.exit_code == 0, f"{method}: {result.output}"
    result = _invoke("evaluate", "--params", str(params))
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "metrics" / "evaluate.json").read_text())
    assert set(table) == {"teacher", *METHODS}
    for name, row in table.items():
        assert all(math.isfinite(v) for v in row.values()), name
        assert 0.0 <= row[M.EVAL_TOP1] <= 1.0 and 0.0 <= row[M.EVAL_AGREEMENT] <= 1.0
    assert all(table[method][M.EVAL_SECONDS] > 0 for method in METHODS)  # each stage's wall time, for costs
