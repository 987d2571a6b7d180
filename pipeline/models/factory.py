"""Build, save and load teachers and students behind one interface (`ImageClassifier`).

``name`` is either a timm model name (``"resnet18"``, ``"vit_tiny_patch16_224"``; built with
``pretrained=False``: nothing is fetched from a hub) or an entrypoint
``"package.module:function"``, called as ``function(num_classes=..., in_chans=...,
**model_kwargs)``. The entrypoint must return an ``nn.Module`` with the small interface of
`pipeline.models.classifier`: ``embed(x) -> (B, D)``, ``classify(e) -> (B, C)`` and an int
``embed_dim`` (optional: ``num_classes``, ``forward``, ``get_classifier``); a timm model is
accepted too. The CIFAR ResNets are ``"pipeline.models.cifar_resnet:resnet56"`` etc.

Model files written by `save_model` are safetensors (`pipeline.models.files`): the backbone's
state dict as tensors (its own keys, so a model file is also a valid ``weights=`` file) and a
JSON document ``{"format", "spec", "state_dict_sha256"}``. Nothing is unpickled. An entrypoint
read from a file is code, so `load_model` builds a spec's ``name`` only if it is a timm name, a
builder `pipeline.models` lists (``MODEL_ENTRYPOINTS`` of its module), or the entrypoint the
caller passes from the user's own params (`check_entrypoint`).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.models.classifier import ImageClassifier
from pipeline.models.errors import (
    EntrypointRefusedError,
    ModelError,
    ModelFileError,
    ModelInterfaceError,
    ModelNotFoundError,
)
from pipeline.models.files import read_tensor_file, write_tensor_file
from pipeline.models.weights import (
    file_sha256,
    load_state_dict_into,
    load_weights,
    state_dict_sha256,
)

__all__ = [
    "MODEL_FILE_FORMAT",
    "ImageClassifier",
    "build_model",
    "check_entrypoint",
    "file_sha256",
    "library_versions",
    "load_model",
    "load_weights",
    "logits_from_embedding_check",
    "save_model",
    "state_dict_sha256",
]

MODEL_FILE_FORMAT = "cifd.model/2"
# Set by build_model itself, or a second route to weights/hub files that would bypass `weights=`.
_RESERVED_KWARGS = ("num_classes", "in_chans", "pretrained", "checkpoint_path", "pretrained_cfg",
                    "pretrained_cfg_overlay", "cache_dir")
_LIBRARY_ENTRYPOINT = re.compile(r"pipeline\.models\.([a-z_][a-z0-9_]*):([A-Za-z_][A-Za-z0-9_]*)")
_SPEC_REQUIRED = ("name", "num_classes", "in_chans")


def _close_timm_names(name: str, limit: int = 8) -> list[str]:
    import timm

    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=limit, cutoff=0.6)
    stem = max(re.split(r"[^a-zA-Z]+", name), key=len, default="")
    if len(close) < limit and len(stem) >= 3:
        close += [n for n in timm.list_models(f"*{stem}*") if n not in close][: limit - len(close)]
    return close


def _build_timm(name: str, num_classes: int, in_chans: int, kwargs: dict[str, Any]) -> nn.Module:
    import timm  # only when a timm model is built: importing timm costs ≈ 7 s of CPU on these machines

    if not timm.is_model(name):
        close = _close_timm_names(name)
        raise ModelNotFoundError(
            f"{name!r} is not a timm model (timm {timm.__version__}); "
            + (f"close matches: {', '.join(close)}. " if close else "no close match. ")
            + "For your own nn.Module give an entrypoint 'package.module:function' instead "
            "(e.g. 'pipeline.models.cifar_resnet:resnet56')"
        )
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as e:
        raise TypeError(f"timm.create_model({name!r}) rejected model_kwargs {kwargs}: {e}") from e


def _resolve_entrypoint(name: str) -> Any:
    module_name, _, attr = name.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ModelNotFoundError(f"entrypoint {name!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ModelNotFoundError(
            f"entrypoint {name!r}: cannot import module {module_name!r} ({e}); "
            "make sure the package is installed or on PYTHONPATH"
        ) from e
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise ModelNotFoundError(
                f"entrypoint {name!r}: module {module_name!r} has no attribute {attr!r}; "
                f"callables there: {', '.join(public[:20]) or 'none'}"
            )
        fn = getattr(fn, part)
    if not callable(fn):
        raise ModelNotFoundError(f"entrypoint {name!r} is a {type(fn).__name__}, not a callable")
    return fn


def _build_entrypoint(name: str, num_classes: int, in_chans: int, kwargs: dict[str, Any]) -> nn.Module:
    fn = _resolve_entrypoint(name)
    try:
        inspect.signature(fn).bind(num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as e:
        raise ModelInterfaceError(
            f"entrypoint {name!r} cannot be called as {getattr(fn, '__name__', name)}(num_classes=..., "
            f"in_chans=..., **{sorted(kwargs)}): {e}. It must accept num_classes and in_chans keyword "
            "arguments (plus any model_kwargs)"
        ) from e
    except ValueError:  # no signature available (builtins): just call it
        pass
    return fn(num_classes=num_classes, in_chans=in_chans, **kwargs)


def build_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int = 3,
    weights: str | PathLike[str] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> ImageClassifier:
    """Build a timm model or an entrypoint's module, wrapped as an `ImageClassifier`.

    ``weights``: a local weights file loaded strictly into the model (see
    `pipeline.models.weights.read_state_dict` for the accepted layouts); to reuse a
    checkpoint whose head has another number of classes, build without weights and call
    ``load_weights(model, path, drop_head=True)``. The model is returned in train mode, on CPU.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"build_model({name!r}): num_classes={num_classes!r} must be an int >= 0")
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"build_model({name!r}): in_chans={in_chans!r} must be an int >= 1")
    kwargs = dict(model_kwargs or {})
    reserved = [k for k in _RESERVED_KWARGS if k in kwargs]
    if reserved:
        raise ValueError(
            f"build_model({name!r}): model_kwargs must not set {reserved}; "
            "pass num_classes / in_chans as arguments and local weights as weights= (teacher.weights); "
            "pretrained hub weights are never fetched"
        )
    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        raise ModelNotFoundError(
            f"{name!r}: hub/pretrained-config names are not built here (nothing is fetched); give the "
            "bare timm architecture name (e.g. 'resnet18') and the local weights file as weights="
        )
    if ":" in name:
        backbone = _build_entrypoint(name, num_classes, in_chans, kwargs)
    else:
        backbone = _build_timm(name, num_classes, in_chans, kwargs)
    model = ImageClassifier(backbone, num_classes=num_classes, origin=name)
    if weights is not None:
        load_weights(model, weights)
    return model


def _library_entrypoint(name: str) -> bool:
    """Whether ``name`` is ``pipeline.models.<module>:<builder>`` with the builder listed in that
    module's ``MODEL_ENTRYPOINTS`` (importing a module of this package runs only cifd's code)."""
    match = _LIBRARY_ENTRYPOINT.fullmatch(name)
    if match is None:
        return False
    try:
        module = importlib.import_module(f"pipeline.models.{match.group(1)}")
    except ImportError:
        return False
    return match.group(2) in getattr(module, "MODEL_ENTRYPOINTS", ())


def check_entrypoint(name: str, *, allow: str | None, source: str) -> None:
    """Refuse to build ``name`` read from the file ``source`` unless cifd may import it.

    Allowed: a name without ``:`` (a timm model name; anything else fails in `build_model`
    without importing), a builder `pipeline.models` lists, or exactly ``allow``: the entrypoint
    the user's own params name for this model. Nothing named by ``name`` is imported before
    the check passes. Raises `EntrypointRefusedError` naming the entrypoint and how to allow it.
    """
    if ":" not in name or name == allow or _library_entrypoint(name):
        return
    raise EntrypointRefusedError(
        f"{source}: its spec names the entrypoint {name!r}, which is neither a timm model nor a "
        f"pipeline.models builder nor the entrypoint your params name for it ({allow!r}); cifd imports no "
        f"code because a file says so. If you trust that code, name it in your params (teacher.model for the "
        f"teacher, distill.student for students) or pass load_model(..., allow_entrypoint={name!r})"
    )


def _check_plain(value: Any, where: str) -> None:
    # Exact types: subclasses (torch.__version__ is a TorchVersion(str)) would not come back as
    # themselves from JSON.
    if value is None or type(value) in (bool, int, float, str):
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(f"spec{where}: key {key!r} is a {type(key).__name__}, keys must be str")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"spec{where} is a {type(value).__name__}; a model spec holds only None, bool, int, float, "
        "str, list, tuple and dict with str keys (it is stored as JSON in the model file)"
    )


def save_model(path: str | PathLike[str], model: ImageClassifier, *, spec: Mapping[str, Any]) -> str:
    """Write ``model`` with the ``spec`` that rebuilds it; return the state-dict sha256.

    ``spec`` needs ``name``, ``num_classes`` and ``in_chans`` (``model_kwargs`` defaults to
    ``{}``) and may carry any other plain-typed provenance (stored as JSON: tuples come back as
    lists). The file is safetensors (any suffix; ``.safetensors`` by convention), written
    atomically; missing parent directories are created.
    """
    if not isinstance(model, ImageClassifier):
        raise TypeError(f"save_model: expected an ImageClassifier, got {type(model).__name__}")
    spec = {"model_kwargs": {}, **dict(spec)}
    missing = [k for k in _SPEC_REQUIRED if k not in spec]
    if missing:
        raise ValueError(f"save_model: spec lacks {missing}; it needs {list(_SPEC_REQUIRED)} to rebuild the model")
    if spec["num_classes"] != model.num_classes:
        raise ValueError(f"save_model: spec num_classes={spec['num_classes']!r} but the model has {model.num_classes}")
    _check_plain(spec, "")
    # clone: safetensors refuses tensors that share storage (tied weights)
    state_dict = {k: v.detach().to("cpu").clone() for k, v in model.backbone.state_dict().items()}
    digest = state_dict_sha256(state_dict)
    write_tensor_file(path, state_dict, {"format": MODEL_FILE_FORMAT, "spec": spec, "state_dict_sha256": digest})
    return digest


def _checked_spec(document: dict[str, Any], path: Path) -> dict[str, Any]:
    if document.get("format") != MODEL_FILE_FORMAT:
        raise ModelFileError(
            f"{path} is not a model file written by save_model (format {document.get('format')!r}, expected "
            f"{MODEL_FILE_FORMAT!r}); for a bare weights file use build_model(name, weights=...)"
        )
    spec = document.get("spec")
    kinds = {"name": str, "num_classes": int, "in_chans": int, "model_kwargs": dict}
    if not isinstance(spec, dict) or any(type(spec.get(k)) is not t for k, t in kinds.items()):
        raise ModelFileError(f"{path}: the model spec must hold name (str), num_classes (int), in_chans (int) "
                             f"and model_kwargs (dict); got {spec!r:.200}")
    if not isinstance(document.get("state_dict_sha256"), str):
        raise ModelFileError(f"{path}: the document lacks the state_dict_sha256 string")
    return spec


def load_model(
    path: str | PathLike[str], *, allow_entrypoint: str | None = None
) -> tuple[ImageClassifier, dict[str, Any]]:
    """Rebuild a model written by `save_model` (on CPU, train mode); return it and its spec.

    ``allow_entrypoint``: the ``package.module:function`` the user's own params name for this
    model (``teacher.model`` for the teacher, ``distill.student`` for students), the only
    entrypoint outside timm and `pipeline.models` that the spec may name (`check_entrypoint`).
    The weights' content hash is checked against the one recorded at save time before anything
    is built. A pickle, a torch zip or an edited file is a `ModelFileError`.
    """
    path = Path(path)
    tensors, document = read_tensor_file(path)
    spec = _checked_spec(document, path)
    digest = state_dict_sha256(tensors)
    if digest != document["state_dict_sha256"]:
        raise ModelFileError(
            f"{path}: weights hash {digest} differs from the recorded {document['state_dict_sha256']}; "
            "the file is corrupt or was edited"
        )
    check_entrypoint(spec["name"], allow=allow_entrypoint, source=str(path))
    try:
        model = build_model(
            spec["name"],
            num_classes=spec["num_classes"],
            in_chans=spec["in_chans"],
            model_kwargs=spec["model_kwargs"],
        )
    except ModelError:
        raise
    except (TypeError, ValueError) as exc:  # e.g. reserved or unknown model_kwargs in the spec
        raise ModelFileError(f"{path}: its spec does not build a model: {exc}") from exc
    load_state_dict_into(model.backbone, tensors, source=str(path))
    return model, spec


@torch.no_grad()
def logits_from_embedding_check(
    model: ImageClassifier, x: torch.Tensor, *, atol: float = 1e-4
) -> tuple[bool, float]:
    """Whether ``classify(embed(x))`` reproduces the raw model's own ``forward(x)``.

    Runs in eval mode (restoring each submodule's mode afterwards) without gradients.
    Returns ``(max_abs_err <= atol, max_abs_err)``. A user module without a forward of its own
    has nothing to compare against: ``(True, 0.0)``.
    """
    if not model.has_native_forward():
        return True, 0.0
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        reference = model.backbone(x)
        if not isinstance(reference, torch.Tensor):
            raise ModelInterfaceError(
                f"{type(model.backbone).__name__}.forward returned a {type(reference).__name__} in eval "
                "mode, expected a logits tensor"
            )
        split = model.classify(model.embed(x))
    finally:
        for m, training in modes.items():
            m.training = training
    if split.shape != reference.shape:
        raise ModelInterfaceError(
            f"classify(embed(x)) has shape {tuple(split.shape)} but forward(x) {tuple(reference.shape)}"
        )
    err = float((split.float() - reference.float()).abs().max()) if reference.numel() else 0.0
    return err <= atol, err


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide what a model computes (for provenance)."""
    import timm
    import torchvision

    return {
        "torch": str(torch.__version__),  # a TorchVersion: a str subclass JSON would not give back
        "timm": str(timm.__version__),
        "torchvision": str(torchvision.__version__),
        "numpy": str(np.__version__),
    }
