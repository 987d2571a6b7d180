"""Checkpoints of stage three: what a run is (its fingerprint) and the atomic per-epoch save.

A checkpoint resumes only a run with the same fingerprint: the config, the method, the
caches, the layout of ranks and the source of the code that decides what a step computes.

A checkpoint is a safetensors file (`pipeline.models.files`; nothing is unpickled): the
student's state as ``student/<key>``, the optimizer's per-parameter state tensors as
``optimizer/<param id>/<name>`` and the generator's state as the uint8 tensor ``generator``;
its JSON document holds the rest (optimizer param groups and non-tensor state, scheduler state,
epoch, history, fingerprint, the wall seconds the run has spent so far) and the content hash of
all its tensors, checked on load.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from pipeline.models.errors import ModelFileError
from pipeline.models.files import read_document, read_tensor_file, write_tensor_file
from pipeline.models.weights import state_dict_sha256

__all__ = ["CHECKPOINT_FORMAT", "STEP_MODULES", "VOLATILE_KEYS", "Checkpoint", "code_fingerprint",
           "config_fingerprint", "import_closure", "load_checkpoint", "resumable_seconds", "save_checkpoint",
           "student_fingerprint"]

CHECKPOINT_FORMAT = "cifd.checkpoint/1"

# Config keys that change how fast a run goes, never what it computes.
VOLATILE_KEYS = ("device", "threads", "loader_workers", "methods", "eval_batch_size")

# The training step's entry points; every module of ``pipeline.models`` too, since the student's
# module is imported by name (``distill.student``).
STEP_ROOTS = ("pipeline.train.distill", "pipeline.train.stream", "pipeline.train.batches", "pipeline.models")
_PACKAGE = Path(__file__).resolve().parents[1]  # the ``pipeline`` directory


def _source(name: str) -> Path | None:
    """The file of ``pipeline`` module or package ``name``, None for a name that is not one
    (an imported function or class)."""
    base = _PACKAGE.parent.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_closure(roots: tuple[str, ...]) -> tuple[str, ...]:
    """The ``pipeline`` modules ``roots`` import, directly or not (read from their source with
    ``ast``, imports inside functions included; nothing is imported), with every package they
    sit in and every module of a root package, sorted."""
    import ast

    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        path = _source(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        todo.extend(".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1))  # its packages
        if path.name == "__init__.py" and name in roots:
            todo.extend(f"{name}.{p.stem}" for p in path.parent.glob("*.py") if p.stem != "__init__")
        for node in ast.walk(ast.parse(path.read_bytes())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "pipeline":
                todo.append(node.module or "")
                todo.extend(f"{node.module}.{alias.name}" for alias in node.names)  # a submodule by name
            elif isinstance(node, ast.Import):
                todo.extend(alias.name for alias in node.names if alias.name.split(".")[0] == "pipeline")
    return tuple(sorted(seen))


# Modules whose source decides what a training step computes: found from the imports, so a
# module added to the step later (the mixed-view render, the row streams) cannot be forgotten.
STEP_MODULES = import_closure(STEP_ROOTS)


def code_fingerprint() -> str:
    """sha256 of the source of :data:`STEP_MODULES`, so a checkpoint from before a code change
    (a loss, the IBM, the view replay) is not resumed."""
    import importlib

    digest = hashlib.sha256()
    for name in STEP_MODULES:
        module = sys.modules.get(name) or importlib.import_module(name)
        digest.update(Path(module.__file__ or "").read_bytes())
    return digest.hexdigest()


def student_fingerprint(spec: str) -> str:
    """What of a student's code the :data:`STEP_MODULES` do not cover: for a
    ``package.module:function`` outside ``pipeline``, the sha256 of that module's source (a user's
    edited network must not resume an old checkpoint); for a timm name, timm's version."""
    import importlib

    module_name, colon, _ = spec.partition(":")
    if not colon:
        import timm

        return f"timm {timm.__version__}"
    if module_name in STEP_MODULES:
        return "pipeline"
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    source = Path(module.__file__ or "")
    return hashlib.sha256(source.read_bytes()).hexdigest() if source.is_file() else f"no source: {module_name}"


def config_fingerprint(config: dict[str, Any], method: str, extra: dict[str, Any]) -> str:
    """What decides a run's result: the stage config (``to_dict()``, less
    :data:`VOLATILE_KEYS`), the method, ``extra`` (caches, ranks, steps) and the code."""
    cfg = {k: v for k, v in config.items() if k not in VOLATILE_KEYS}
    data = {"cfg": cfg, "method": method, "code": code_fingerprint(), **extra}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """One epoch's end of a run: everything a resume needs to continue bit-exactly."""

    fingerprint: str
    epoch: int  # epochs done
    seconds: float  # wall seconds the run has spent up to this save, over every resumed piece
    student: dict[str, torch.Tensor]  # Module.state_dict()
    optimizer: dict[str, Any]  # Optimizer.state_dict()
    scheduler: dict[str, Any]  # LRScheduler.state_dict(): plain values only
    generator: torch.Tensor  # torch.Generator.get_state(), uint8
    history: list[dict[str, Any]]  # one plain dict per epoch done


def save_checkpoint(path: str | PathLike[str], checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` atomically (a temporary file beside ``path``, then rename)."""
    tensors = {f"student/{k}": v for k, v in checkpoint.student.items()}
    plain_state: dict[str, dict[str, Any]] = {}
    for pid, entries in checkpoint.optimizer["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{pid}/{name}"] = value
            else:
                plain_state.setdefault(str(pid), {})[name] = value
    tensors["generator"] = checkpoint.generator
    # clone: safetensors refuses tensors that share storage
    tensors = {k: v.detach().to("cpu").clone() for k, v in tensors.items()}
    document = {
        "format": CHECKPOINT_FORMAT, "fingerprint": checkpoint.fingerprint, "epoch": checkpoint.epoch,
        "seconds": checkpoint.seconds, "history": checkpoint.history, "scheduler": checkpoint.scheduler,
        "optimizer": {"param_groups": checkpoint.optimizer["param_groups"], "state": plain_state},
        "tensors_sha256": state_dict_sha256(tensors),
    }
    write_tensor_file(path, tensors, document)


def _document(path: Path) -> dict[str, Any]:
    document = read_document(path)
    if document.get("format") != CHECKPOINT_FORMAT:
        raise ModelFileError(f"{path} is not a training checkpoint of this cifd (format {document.get('format')!r}, "
                             f"expected {CHECKPOINT_FORMAT!r}); delete it to start the run over")
    return document


def load_checkpoint(path: str | PathLike[str]) -> Checkpoint:
    """A checkpoint written by :func:`save_checkpoint`; anything else, or an edited file, is a
    `ModelFileError` (delete the file to start the run over)."""
    path = Path(path)
    _document(path)
    tensors, document = read_tensor_file(path)
    digest = state_dict_sha256(tensors)
    if digest != document.get("tensors_sha256"):
        raise ModelFileError(f"{path}: its tensors hash to {digest}, not the recorded "
                             f"{document.get('tensors_sha256')}; the checkpoint is corrupt or was edited: delete it "
                             "to start the run over")
    student: dict[str, torch.Tensor] = {}
    state: dict[int, dict[str, Any]] = {}
    generator = None
    try:
        for name, value in tensors.items():
            kind, _, rest = name.partition("/")
            if kind == "student":
                student[rest] = value
            elif kind == "optimizer":
                pid, _, entry = rest.partition("/")
                state.setdefault(int(pid), {})[entry] = value
            elif name == "generator":
                generator = value
            else:
                raise ValueError(f"unexpected tensor {name!r}")
        for pid, entries in document["optimizer"]["state"].items():
            state.setdefault(int(pid), {}).update(entries)
        if generator is None:
            raise ValueError("no generator state")
        return Checkpoint(
            fingerprint=str(document["fingerprint"]), epoch=int(document["epoch"]),
            seconds=float(document["seconds"]), student=student,
            optimizer={"state": dict(sorted(state.items())), "param_groups": document["optimizer"]["param_groups"]},
            scheduler=dict(document["scheduler"]), generator=generator, history=list(document["history"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: a malformed checkpoint ({type(exc).__name__}: {exc}); delete it to start "
                             "the run over") from exc


def resumable_seconds(path: str | PathLike[str] | None, fingerprint: str) -> float:
    """The wall seconds recorded by the checkpoint at ``path`` if it holds the run ``fingerprint``
    (the one :func:`~pipeline.train.distill.train_student` will resume), else 0. Reads only the
    file's header."""
    if path is None or not Path(path).is_file():
        return 0.0
    document = _document(Path(path))
    if document.get("fingerprint") != fingerprint:
        return 0.0
    seconds = document.get("seconds")
    if type(seconds) not in (int, float) or seconds < 0:
        raise ModelFileError(f"{path}: the checkpoint's seconds is {seconds!r}, expected a number >= 0; delete it "
                             "to start the run over")
    return float(seconds)
