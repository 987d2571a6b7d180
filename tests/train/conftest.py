"""Fixtures for stage three: a tiny project (params file with tmp paths) on the session's
tiny shards, teacher and teacher cache, plus an RDM cache made by ``stages.rdm.run``
(2 RDMs, hidden 8, 1 epoch).

The student is a CIFAR ResNet-8 of width 2 (D = 8 against the teacher's 16, so CIFD's
projection is a real Linear), batches of 8 over 27 train rows: 4 steps per epoch.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

RDM = {"rate_weights": [4.0, 1.0], "hidden": 8, "epochs": 1, "batch_size": 32,
       "device": "cpu", "threads": 1, "seed": 0}
DISTILL = {"student": "pipeline.models.cifar_resnet:resnet8", "student_kwargs": {"width": 2}, "epochs": 1,
           "batch_size": 8, "optim": {"lr": 0.01}, "amp": False, "device": "cpu", "threads": 1, "seed": 0}


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
    return out


def write_params(root: Path, base: dict[str, Any], **sections: Mapping[str, Any]) -> Path:
    """``root/params.yaml`` from ``base`` with ``sections`` merged in (e.g. ``distill={...}``)."""
    root.mkdir(parents=True, exist_ok=True)
    params = _merge(base, sections)
    params["paths"].setdefault("students", str(root / "students"))
    params["paths"].setdefault("metrics", str(root / "metrics"))
    params["paths"].setdefault("plots", str(root / "plots"))
    params["paths"].setdefault("checkpoints", str(root / "checkpoints"))
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def _single_thread(one_thread: None) -> None:
    """Apply the shared ``one_thread`` fixture to every test of this folder."""


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory, shards_dir: Path, teacher_file: Path,
            embedded_cache) -> types.SimpleNamespace:
    """``base`` params (paths + rdm + distill + evaluate sections; students/metrics/plots
    left for :func:`write_params` to place per test) and ``params(root, **sections)``."""
    from stages import rdm as rdm_stage

    root = tmp_path_factory.mktemp("project")
    cache_path, _ = embedded_cache
    base = {
        "paths": {"shards": str(shards_dir), "teacher": str(teacher_file), "cache": str(cache_path),
                  "rdm_models": str(root / "rdm.safetensors"), "rdm_cache": str(root / "rdm.zarr")},
        "rdm": RDM,
        "distill": DISTILL,
        "evaluate": {"batch_size": 64, "device": "cpu"},
    }
    before = torch.get_num_threads()
    try:
        rdm_stage.run(write_params(root / "rdm", base))
    finally:
        torch.set_num_threads(before)
    return types.SimpleNamespace(base=base, root=root,
                                 params=lambda where, **sections: write_params(where, base, **sections))
