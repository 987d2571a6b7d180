"""Weights files: read a state dict robustly, load it strictly, hash it.

`read_state_dict` accepts the layouts found in the wild: a plain state dict, or a dict
holding one under ``state_dict`` / ``model`` / ``state_dict_ema`` (first found, in that
order). Safetensors files (by suffix or by content: cifd's model files are ones) are read
with safetensors; any other file only with ``torch.load(weights_only=True)``, which rebuilds
tensors and plain containers and runs no pickled code. A file that needs more (a training
checkpoint holding an ``argparse.Namespace``, a pickled module) is refused with the one-line
command that converts it, to be run by the user on a file they trust: cifd never unpickles.
`load_state_dict_into` strips wrapper prefixes (``module.`` from DataParallel/DDP,
``_orig_mod.`` from ``torch.compile``, ``backbone.`` from an `ImageClassifier`) where every
key of the file has one and the model's keys do not, then requires every key and shape to match.

`state_dict_sha256` is a content hash of a state dict (sorted keys, dtype, shape and raw
bytes), independent of how ``torch.save`` serialised it: two files with equal hashes hold the
same weights.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from pipeline.models.classifier import weights_module
from pipeline.models.errors import ModelFileError, WeightsMismatchError

__all__ = [
    "classifier_prefix",
    "file_sha256",
    "load_state_dict_into",
    "load_weights",
    "read_state_dict",
    "state_dict_sha256",
]

StateDict = Mapping[str, torch.Tensor]

_CONTAINER_KEYS = ("state_dict", "model", "state_dict_ema")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.")
_MAX_LISTED = 10


def _convert_hint(path: Path) -> str:
    target = path.with_suffix(".safetensors")
    return (f"If you trust the file, convert it once yourself: torch.load it with weights_only off, pass the "
            f"state dict it holds to safetensors.torch.save_file(state_dict, '{target}') and give that file instead")


def _reason(exc: Exception) -> str:
    """The telling line of a torch.load error: the unpickler's own, else the first."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text[text.index(marker) + len(marker):]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    return first[:160] + ("..." if len(first) > 160 else "")


def _torch_load(path: Path) -> object:
    """``torch.load(weights_only=True)``; a refusal is a one-line `ModelFileError` with the fix."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise ModelFileError(f"cannot read weights file {path}: {exc}") from exc
    except Exception as exc:  # UnpicklingError, RuntimeError (not a torch file), EOFError (truncated), ...
        reason = _reason(exc)
        raise ModelFileError(
            f"{path}: not safetensors, and torch.load(weights_only=True) refuses it ({reason}); cifd never "
            f"unpickles code. {_convert_hint(path)}"
        ) from exc


def _is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts like a safetensors file: an 8-byte little-endian header length
    that fits the file, then the JSON header's ``{``."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if not isinstance(obj, Mapping):
        raise ModelFileError(f"{path}: expected a state dict or a dict holding one, got {type(obj).__name__}")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    for key in _CONTAINER_KEYS:
        if key in obj:
            return _unwrap(obj[key], path)
    raise ModelFileError(
        f"{path}: no state dict found: top-level keys are {sorted(map(str, obj))[:_MAX_LISTED]}, "
        f"expected tensors or one of {list(_CONTAINER_KEYS)}"
    )


def _strip_prefixes(state_dict: StateDict, own_keys: list[str]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes every file key has and the model's keys do not."""
    out = dict(state_dict)
    stripped = True
    while stripped and out:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            model_has_it = bool(own_keys) and all(k.startswith(prefix) for k in own_keys)
            if not model_has_it and all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                stripped = True
    return out


def read_state_dict(path: str | PathLike[str]) -> dict[str, torch.Tensor]:
    """Read the state dict held by a weights file, on CPU, keys as stored.

    Safetensors, or a torch file that ``torch.load(weights_only=True)`` reads; anything else is
    a `ModelFileError` saying how to convert it.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"weights file {path} does not exist (or is not a file)")
    obj: object
    if path.suffix == ".safetensors" or _is_safetensors(path):
        try:
            obj = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    else:
        obj = _torch_load(path)
    state_dict = _unwrap(obj, path)
    non_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise ModelFileError(f"{path}: state dict entries that are not tensors: {non_tensors[:_MAX_LISTED]}")
    return state_dict


def classifier_prefix(module: nn.Module) -> str | None:
    """Key prefix (``"fc."``) of the module returned by ``module.get_classifier()``, if any."""
    get_classifier = getattr(module, "get_classifier", None)
    if not callable(get_classifier):
        return None
    head = get_classifier()
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        return None
    for name, sub in module.named_modules():
        if sub is head and name:
            return name + "."
    return None


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def load_state_dict_into(
    module: nn.Module,
    state_dict: StateDict,
    *,
    source: str,
    drop_head: bool = False,
) -> None:
    """Load ``state_dict`` into ``module``; every key and shape must match.

    Wrapper prefixes (``module.``, ``_orig_mod.``, ``backbone.``) that every key of
    ``state_dict`` carries and the module's keys do not are stripped first.
    Missing ``num_batches_tracked`` buffers are tolerated (checkpoints from PyTorch < 0.4.1
    lack them). With ``drop_head=True`` the checkpoint's classifier keys (found with
    ``module.get_classifier()``) are ignored and the module keeps its own head.
    Raises `WeightsMismatchError` naming up to 10 missing, unexpected and shape-mismatched
    keys, the source and a hint.
    """
    own = module.state_dict()
    head = classifier_prefix(module)
    incoming = _strip_prefixes(state_dict, list(own))
    if drop_head:
        if head is None:
            raise WeightsMismatchError(
                f"{source}: drop_head=True but {type(module).__name__} has no get_classifier() "
                "to say which keys are the head; remove the head keys from the file instead"
            )
        incoming = {k: v for k, v in incoming.items() if not k.startswith(head)}

    def tolerated(key: str) -> bool:
        return key.endswith("num_batches_tracked") or (drop_head and head is not None and key.startswith(head))

    missing = [k for k in own if k not in incoming and not tolerated(k)]
    unexpected = [k for k in incoming if k not in own]
    mismatched = [k for k in incoming if k in own and tuple(incoming[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        raise WeightsMismatchError(
            _mismatch_message(own, incoming, source, head, missing, unexpected, mismatched),
            missing=missing,
            unexpected=unexpected,
            shape_mismatched=mismatched,
        )
    module.load_state_dict(incoming, strict=False)


def _mismatch_message(
    own: StateDict,
    incoming: StateDict,
    source: str,
    head: str | None,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
) -> str:
    lines = [
        f"weights from {source} do not fit the model: {len(missing)} missing, "
        f"{len(unexpected)} unexpected, {len(mismatched)} shape-mismatched keys"
    ]
    if missing:
        lines.append(f"  missing (model has, file lacks): {_listed(missing)}")
    if unexpected:
        lines.append(f"  unexpected (file has, model lacks): {_listed(unexpected)}")
    if mismatched:
        shapes = [f"{k} file {tuple(incoming[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched]
        lines.append(f"  shape mismatch: {_listed(shapes)}")
    if own and incoming and not set(own) & set(incoming):
        lines.append(
            f"  hint: no key in common (file: {next(iter(incoming))!r}, model: {next(iter(own))!r}); "
            "the file may come from another architecture or carry an extra prefix"
        )
    head_only = not missing and not unexpected and mismatched and head is not None
    if head_only and all(k.startswith(head) for k in mismatched):
        weight = incoming.get(head + "weight")
        file_classes = int(weight.shape[0]) if weight is not None and weight.ndim >= 1 else None
        own_weight = own.get(head + "weight")
        model_classes = int(own_weight.shape[0]) if own_weight is not None and own_weight.ndim >= 1 else None
        lines.append(
            f"  hint: only the classifier ({head.rstrip('.')}) differs: the file has "
            f"{file_classes} classes, the model {model_classes}. Set num_classes={file_classes} to use "
            "the file's head, or load with load_weights(..., drop_head=True) to keep the backbone "
            "and train a new head"
        )
    conv_in = [
        k
        for k in mismatched
        if incoming[k].ndim == 4
        and own[k].ndim == 4
        and incoming[k].shape[0] == own[k].shape[0]
        and incoming[k].shape[1] != own[k].shape[1]
    ]
    if conv_in:
        lines.append(
            f"  hint: {conv_in[0]} has {incoming[conv_in[0]].shape[1]} input channels in the file and "
            f"{own[conv_in[0]].shape[1]} in the model: check in_chans"
        )
    return "\n".join(lines)


def load_weights(module: nn.Module, path: str | PathLike[str], *, drop_head: bool = False) -> None:
    """Read a weights file (see `read_state_dict`) and load it strictly into ``module``.

    An `ImageClassifier` loads into its backbone, so files hold the raw model's keys.
    """
    load_state_dict_into(weights_module(module), read_state_dict(path), source=str(path), drop_head=drop_head)


def _tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu").contiguous().reshape(-1)  # (N,)
    return t.view(torch.uint8)  # (N * itemsize,) raw bytes, no copy for CPU tensors


def state_dict_sha256(module_or_state_dict: nn.Module | StateDict) -> str:
    """Content hash of a state dict: sha256 over sorted keys, dtype, shape and tensor bytes.

    An `ImageClassifier` is hashed through its backbone, i.e. over exactly the keys
    `save_model` writes.
    """
    if isinstance(module_or_state_dict, nn.Module):
        state_dict: StateDict = weights_module(module_or_state_dict).state_dict()
    else:
        state_dict = module_or_state_dict
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict_sha256: entry {key!r} is a {type(value).__name__}, not a tensor")
        if value.layout != torch.strided or value.is_quantized:
            raise TypeError(f"state_dict_sha256: entry {key!r} has an unsupported layout {value.layout}")
        header = f"{key}\0{value.dtype}\0{tuple(value.shape)}\0{value.numel() * value.element_size()}\0"
        digest.update(header.encode())
        digest.update(_tensor_bytes(value).numpy())
    return digest.hexdigest()


def file_sha256(path: str | PathLike[str], *, chunk_size: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
