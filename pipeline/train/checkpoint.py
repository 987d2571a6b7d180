"""Checkpoints of stage three: what a run is (its fingerprint) and the atomic per-epoch save.

A checkpoint resumes only a run with the same fingerprint: the config, the method, the
caches, the layout of ranks and the source of the code that decides what a step computes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["VOLATILE_KEYS", "code_fingerprint", "config_fingerprint", "load_checkpoint", "save_atomic"]

# Config keys that change how fast a run goes, never what it computes.
VOLATILE_KEYS = ("device", "threads", "loader_workers", "methods", "eval_batch_size")

# Modules whose source decides what a training step computes.
STEP_MODULES = (
    "pipeline.data.preprocess", "pipeline.data.views", "pipeline.losses.comparative", "pipeline.losses.core",
    "pipeline.losses.kd", "pipeline.losses.multi_target", "pipeline.rd.entropy", "pipeline.rd.ibm",
    "pipeline.train.batches", "pipeline.train.distill", "pipeline.train.objective", "pipeline.train.optim",
    "pipeline.train.stream", "pipeline.train.student", "pipeline.train.targets",
)


def code_fingerprint() -> str:
    """sha256 of the source of :data:`STEP_MODULES`, so a checkpoint from before a code change
    (a loss, the IBM, the view replay) is not resumed."""
    import importlib

    digest = hashlib.sha256()
    for name in STEP_MODULES:
        module = sys.modules.get(name) or importlib.import_module(name)
        digest.update(Path(module.__file__ or "").read_bytes())
    return digest.hexdigest()


def config_fingerprint(config: dict[str, Any], method: str, extra: dict[str, Any]) -> str:
    """What decides a run's result: the stage config (``to_dict()``, less
    :data:`VOLATILE_KEYS`), the method, ``extra`` (caches, ranks, steps) and the code."""
    cfg = {k: v for k, v in config.items() if k not in VOLATILE_KEYS}
    data = {"cfg": cfg, "method": method, "code": code_fingerprint(), **extra}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save_atomic` in this workspace."""
    return torch.load(path, map_location="cpu", weights_only=True)
