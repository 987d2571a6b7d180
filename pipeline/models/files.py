"""Safe tensor files: safetensors for the tensors, a JSON document in the header for the rest.

Nothing here unpickles and nothing is imported because a file says so: a file holds only
named tensors (``safetensors``) and one JSON object (the header's ``cifd`` metadata entry),
read with ``json.loads``. Every model file of the tool (teacher, RDMs, students) and every
training checkpoint is one of these. Writes are atomic: a temporary file beside the target,
fsync, then ``os.replace``, so a killed writer never leaves half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pipeline.models.errors import ModelFileError

__all__ = ["META_KEY", "read_document", "read_tensor_file", "write_tensor_file"]

META_KEY = "cifd"  # the header metadata entry holding the JSON document


def _check_json(value: Any, where: str) -> None:
    """Only what JSON holds exactly: None, bool, int, finite float, str, list, dict[str, ...]."""
    if value is None or type(value) in (bool, int, str):
        return
    if type(value) is float:
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{where} is {value}: a tensor file's document holds only finite numbers")
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise ValueError(f"{where}: key {key!r} is a {type(key).__name__}; keys must be str")
            _check_json(item, f"{where}[{key!r}]")
        return
    raise ValueError(f"{where} is a {type(value).__name__}; a tensor file's document holds only JSON values")


def write_tensor_file(path: str | PathLike[str], tensors: Mapping[str, torch.Tensor], document: Mapping[str, Any]) -> None:
    """Write ``tensors`` (moved to CPU, made contiguous) and the JSON ``document`` to ``path``."""
    _check_json(dict(document), "document")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(plain, tmp, metadata={META_KEY: json.dumps(dict(document), sort_keys=True)})
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _open(path: Path, *, with_tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not path.is_file():
        raise ModelFileError(f"{path} does not exist (or is not a file)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()} if with_tensors else {}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(
            f"{path} is not a safetensors file written by cifd ({exc}); model files and checkpoints are "
            "safetensors with a JSON header: re-create it with this version of cifd"
        ) from exc
    if META_KEY not in meta:
        raise ModelFileError(f"{path} is a safetensors file without cifd's '{META_KEY}' header entry; "
                             "it was not written by cifd (for bare weights use teacher.weights)")
    try:
        document = json.loads(meta[META_KEY])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: its '{META_KEY}' header entry is not valid JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise ModelFileError(f"{path}: its '{META_KEY}' header entry is a {type(document).__name__}, "
                             "expected a JSON object")
    return tensors, document


def read_tensor_file(path: str | PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors (on CPU) and the JSON document of a file written by :func:`write_tensor_file`.

    Anything else (a pickle, a torch zip, a truncated or edited file) is a :class:`ModelFileError`
    naming the file and what was expected.
    """
    return _open(Path(path), with_tensors=True)


def read_document(path: str | PathLike[str]) -> dict[str, Any]:
    """Only the JSON document of a file written by :func:`write_tensor_file` (no tensor is read)."""
    return _open(Path(path), with_tensors=False)[1]
