"""Helpers for the tests that drive ``dvc`` and ``cifd`` in temporary git + DVC repositories
(``test_dvc_e2e.py``, ``test_two_teams.py``): a tiny digits configuration, a producer project
made from this checkout, and a command runner that fails with the command's output."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "prepare": {"source": "digits", "limit_train": 160, "limit_val": 60, "samples_per_shard": 40},
    "teacher": {"model": "test_resnet", "in_chans": 1, "preprocess": {"image_size": 16, "crop_pct": 1.0, "interpolation": "bilinear", "mean": [0.5], "std": [0.5]},
                "epochs": 2, "batch_size": 64},
    "embed": {"views": 2, "batch_size": 128, "chunk_rows": 20, "scheduler": "synchronous"},
    "rdm": {"rate_weights": [4.0, 1.0], "hidden": 32, "epochs": 2, "batch_size": 128},
    "distill": {"student": "pipeline.models.cifar_resnet:resnet8", "student_kwargs": {"width": 4}, "epochs": 1,
                "batch_size": 64, "threads": 1},
}

# git commits in the temporary repositories need an identity, whatever the machine's config.
_GIT_IDENTITY = {"GIT_AUTHOR_NAME": "cifd tests", "GIT_AUTHOR_EMAIL": "tests@cifd.invalid",
                 "GIT_COMMITTER_NAME": "cifd tests", "GIT_COMMITTER_EMAIL": "tests@cifd.invalid"}


def run(args: list[str], cwd: Path, *, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run a command with this environment's ``bin`` first on PATH (``dvc``, ``cifd``); fail
    with the tail of its output."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **_GIT_IDENTITY)
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def tiny_params(overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """This checkout's params.yaml with :data:`TINY` (and ``overrides``) merged per section."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for extra in (TINY, overrides or {}):
        for section, values in extra.items():
            params[section].update(values)
    return params


def make_producer(path: Path, params: Mapping[str, Any]) -> Path:
    """A git + DVC repository at ``path`` holding this checkout's pipeline sources, ``dvc.yaml``
    and ``params``: the producer's project as a team would have it."""
    if shutil.which("git") is None:
        import pytest

        pytest.skip("git is not installed")
    path.mkdir(parents=True, exist_ok=True)
    for name in ("pipeline", "stages", "schemas", "report"):
        shutil.copytree(ROOT / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", path / "dvc.yaml")
    (path / "params.yaml").write_text(yaml.safe_dump(dict(params), sort_keys=False))
    run(["git", "init", "-q"], path)
    run(dvc("init", "-q"), path)
    run(dvc("config", "core.analytics", "false"), path)
    return path
