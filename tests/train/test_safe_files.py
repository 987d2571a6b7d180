"""Stage three's files carry no code: checkpoints are safetensors + JSON, checked on load (an
edited or pickled checkpoint stops the run, nothing in it runs); a resumed run reports its whole
wall time; the teacher file may name only the entrypoint the user's params name (distill and
evaluate, through the CLI)."""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.models import ModelFileError
from pipeline.train.checkpoint import load_checkpoint
from pipeline.train.distill import train_student
from schemas import metrics as M
from schemas.config import DistillConfig, load_stage
from stages.cli import main

CPU = torch.device("cpu")


def _inputs(project, where: Path, method: str = "ce", **distill):
    from stages.distill import build_inputs

    paths, cfg = load_stage(project.params(where, distill=distill), "distill", DistillConfig)
    return build_inputs(paths, cfg, method, device=CPU)


def _train(inputs) -> None:
    train_student(inputs.student, run=inputs.run, info=inputs.info, batches=inputs.batches, val=inputs.val)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_is_safetensors_and_an_edited_or_pickled_one_stops_the_run(project, tmp_path: Path) -> None:
    from pipeline.models.files import read_tensor_file

    inputs = _inputs(project, tmp_path, epochs=1)
    _train(inputs)
    path = inputs.run.checkpoint
    assert path == tmp_path / "checkpoints" / "ce.safetensors"
    tensors, document = read_tensor_file(path)  # no pickle anywhere
    assert tensors["generator"].dtype == torch.uint8
    assert any(k.startswith("student/") for k in tensors) and any(k.startswith("optimizer/") for k in tensors)
    assert document["epoch"] == 1 and document["fingerprint"] == inputs.run.fingerprint and document["seconds"] > 0

    data = bytearray(path.read_bytes())  # one bit of a tensor
    start = 8 + int.from_bytes(data[:8], "little")
    data[start + (len(data) - start) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="corrupt or was edited: delete it"):
        _train(_inputs(project, tmp_path, epochs=1))

    marker = tmp_path / "ran"
    torch.save({"epoch": 1, "x": _Payload(marker)}, path)  # an old-style pickled checkpoint
    with pytest.raises(ModelFileError, match="not a safetensors file"):
        _train(_inputs(project, tmp_path, epochs=1))
    path.write_bytes(pickle.dumps({"epoch": 1, "x": _Payload(marker)}))
    with pytest.raises(ModelFileError):
        _train(_inputs(project, tmp_path, epochs=1))
    assert not marker.exists()


def test_reported_seconds_after_a_resume_are_the_sum(project, tmp_path: Path, monkeypatch) -> None:
    from stages import distill as stage

    params = project.params(tmp_path, distill={"methods": ["kd"], "epochs": 2})
    checkpoint = tmp_path / "checkpoints" / "kd.safetensors"
    metrics = tmp_path / "metrics" / "distill" / "kd.json"
    real = stage.train_student

    class Killed(Exception):
        pass

    def slow_then_killed(student, *, on_epoch, **kwargs):
        time.sleep(2.0)  # the first piece is slow: its time must reach the final report

        def on(log):
            on_epoch(log)
            if log.epoch == 1:
                raise Killed

        return real(student, on_epoch=on, **kwargs)

    monkeypatch.setattr(stage, "train_student", slow_then_killed)
    with pytest.raises(Killed):
        stage.run(params, "kd")
    monkeypatch.setattr(stage, "train_student", real)
    first = load_checkpoint(checkpoint).seconds
    assert first >= 2.0 and not metrics.exists()

    began = time.perf_counter()
    stage.run(params, "kd")
    second = time.perf_counter() - began
    reported = json.loads(metrics.read_text())[M.SECONDS]
    assert first <= reported <= first + second + 0.01  # the first piece + this run's own time
    final = load_checkpoint(checkpoint)
    assert final.epoch == 2 and first < final.seconds <= reported + 0.01

    # A rerun that finds the finished checkpoint trains nothing and adds only its own time.
    began = time.perf_counter()
    stage.run(params, "kd")
    third = time.perf_counter() - began
    again = json.loads(metrics.read_text())[M.SECONDS]
    assert final.seconds - 0.01 <= again <= final.seconds + third + 0.01


def test_the_teacher_entrypoint_must_be_named_by_the_params(project, tmp_path: Path, teacher_file: Path,
                                                            monkeypatch) -> None:
    """A teacher file naming a user module: refused by distill and evaluate (one line, exit 2,
    the module never imported) until ``teacher.model`` names it."""
    from pipeline.models import load_model, save_model

    marker = tmp_path / "imported"
    module = "cifd_user_teachers"
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{module}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from pipeline.models.cifar_resnet import resnet8 as build\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    monkeypatch.delitem(sys.modules, module, raising=False)
    teacher, spec = load_model(teacher_file)
    user_teacher = tmp_path / "teacher.safetensors"
    save_model(user_teacher, teacher, spec={**spec, "name": f"{module}:build"})  # same weights: the cache fits

    def invoke(*args: str):
        return CliRunner().invoke(main, list(args), catch_exceptions=False)

    sections = {"paths": {"teacher": str(user_teacher)}, "distill": {"methods": ["ce"]},
                "evaluate": {"methods": ["ce"], "batch_size": 64, "device": "cpu"}}
    refused = project.params(tmp_path / "refused", **sections)
    result = invoke("distill", "--method", "ce", "--params", str(refused))
    assert result.exit_code == 2, result.output
    assert f"'{module}:build'" in result.output and "teacher.model" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not marker.exists() and module not in sys.modules

    allowed = project.params(tmp_path / "allowed", teacher={"model": f"{module}:build"}, **sections)
    result = invoke("distill", "--method", "ce", "--params", str(allowed))
    assert result.exit_code == 0, result.output
    assert marker.exists()
    result = invoke("evaluate", "--params", str(allowed))
    assert result.exit_code == 0, result.output

    # evaluate on the refused params (its student copied over): refused the same way
    (tmp_path / "refused" / "students").mkdir()
    (tmp_path / "refused" / "students" / "ce.safetensors").write_bytes(
        (tmp_path / "allowed" / "students" / "ce.safetensors").read_bytes())
    result = invoke("evaluate", "--params", str(refused))
    assert result.exit_code == 2 and f"'{module}:build'" in result.output
