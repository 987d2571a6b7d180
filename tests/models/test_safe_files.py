"""No code runs from a file: model files, weights files and checkpoints never unpickle, and a
model file's spec names an entrypoint that is imported only when timm, `pipeline.models` or the
user's own params vouch for it. Every refusal is checked with a marker file that the payload
would create if any of its code ran."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

from pipeline.models import (
    MODEL_FILE_FORMAT,
    EntrypointRefusedError,
    ModelFileError,
    build_model,
    load_model,
    load_weights,
    read_state_dict,
    save_model,
    state_dict_sha256,
)
from pipeline.models.files import read_tensor_file, write_tensor_file
from pipeline.train.checkpoint import load_checkpoint, resumable_seconds

from . import toy

TOY = f"{toy.__name__}:make"
R8 = "pipeline.models.cifar_resnet:resnet8"


class _Payload:
    """Pickles as "run this shell command": what a hostile model file carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _hostile_files(tmp_path: Path, marker: Path) -> dict[str, Path]:
    """The same payload as a raw pickle and inside a torch.save zip (next to real weights)."""
    weights = build_model(TOY, num_classes=3).backbone.state_dict()
    out = {}
    for suffix in (".pt", ".pth", ".ckpt", ".safetensors"):
        raw = tmp_path / f"raw{suffix}"
        raw.write_bytes(pickle.dumps({"state_dict": weights, "x": _Payload(marker)}))
        out[f"pickle{suffix}"] = raw
        zipped = tmp_path / f"zip{suffix}"
        torch.save({"state_dict": weights, "x": _Payload(marker)}, zipped)
        out[f"torch.save{suffix}"] = zipped
    return out


def test_the_payload_is_live(tmp_path: Path) -> None:
    # Guards the tests below: unpickling this file really runs the command.
    marker = tmp_path / "ran"
    path = _hostile_files(tmp_path, marker)["torch.save.pt"]
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_files_are_refused_by_every_loader_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    loaders = {
        "load_model": load_model,
        "read_state_dict": read_state_dict,  # teacher.weights
        "load_weights": lambda p: load_weights(build_model(TOY, num_classes=3), p),
        "build_model(weights=)": lambda p: build_model(TOY, num_classes=3, weights=p),
        "load_checkpoint": load_checkpoint,
        "resumable_seconds": lambda p: resumable_seconds(p, "f" * 64),
    }
    for kind, path in _hostile_files(tmp_path, marker).items():
        for name, loader in loaders.items():
            with pytest.raises(ModelFileError) as info:
                loader(path)
            assert "\n" not in str(info.value), f"{name} on {kind}: not one line"
            assert str(path) in str(info.value), f"{name} on {kind}: the file is not named"
            assert not marker.exists(), f"{name} ran code from {kind}"


def test_weights_only_torch_files_are_still_accepted(tmp_path: Path) -> None:
    source = build_model(TOY, num_classes=3)
    torch.save({"state_dict": source.backbone.state_dict(), "epoch": 3}, tmp_path / "w.pth")
    assert state_dict_sha256(build_model(TOY, num_classes=3, weights=tmp_path / "w.pth")) == state_dict_sha256(source)


# --- entrypoints named by a file --------------------------------------------------------------


def _forged(tmp_path: Path, name: str, model_kwargs: dict | None = None) -> Path:
    """A well-formed cifd model file (real weights, right hash) whose spec names ``name``."""
    state = {k: v.clone() for k, v in build_model(R8, num_classes=3).backbone.state_dict().items()}
    path = tmp_path / f"forged-{abs(hash(name))}.safetensors"
    spec = {"name": name, "num_classes": 3, "in_chans": 3, "model_kwargs": model_kwargs or {}}
    write_tensor_file(path, state, {"format": MODEL_FILE_FORMAT, "spec": spec,
                                    "state_dict_sha256": state_dict_sha256(state)})
    return path


def _evil_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, marker: Path) -> str:
    """A module that touches ``marker`` when imported, on sys.path: what a file could point at."""
    name = "cifd_evil_models"
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{name}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from pipeline.models.cifar_resnet import resnet8 as make\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def _hub_repo(tmp_path: Path, marker: Path) -> dict:
    """A hubconf.py shipped beside a cache: torch.hub.load(source='local') imports it."""
    repo = tmp_path / "cache_dir"
    repo.mkdir()
    (repo / "hubconf.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                     "def evil(**kwargs):\n    raise SystemExit\n")
    return {"repo_or_dir": str(repo), "model": "evil", "source": "local", "trust_repo": True}


def test_entrypoints_a_file_names_are_refused_before_anything_is_imported(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "ran"
    evil = _evil_module(tmp_path, monkeypatch, marker)
    hub = _hub_repo(tmp_path, marker)
    cases = {
        "os:system": {},
        "builtins:eval": {},
        "torch.hub:load": hub,
        f"{evil}:make": {},
        # pipeline.models code that is not a model builder must not be a way round the rule
        "pipeline.models.factory:build_model": {"name": "torch.hub:load", "model_kwargs": hub},
        "pipeline.models.cifar_resnet:torch.hub.load": hub,
        "pipeline.models.factory:torch.hub.load": hub,
    }
    for name, kwargs in cases.items():
        path = _forged(tmp_path, name, kwargs)
        with pytest.raises(EntrypointRefusedError) as info:
            load_model(path)
        message = str(info.value)
        assert "\n" not in message and repr(name) in message and "allow_entrypoint" in message, message
        assert not marker.exists(), f"{name}: code ran"
        assert evil not in sys.modules
        # Another entrypoint named by the params does not vouch for this one.
        with pytest.raises(EntrypointRefusedError):
            load_model(path, allow_entrypoint=TOY)
        assert not marker.exists(), f"{name}: code ran"


def test_the_entrypoint_the_params_name_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "imported"
    user = f"{_evil_module(tmp_path, monkeypatch, marker)}:make"  # the user's own (trusted) module
    source = build_model(R8, num_classes=3)
    save_model(tmp_path / "m.safetensors", source, spec={"name": user, "num_classes": 3, "in_chans": 3})
    with pytest.raises(EntrypointRefusedError):
        load_model(tmp_path / "m.safetensors")
    assert not marker.exists()
    model, spec = load_model(tmp_path / "m.safetensors", allow_entrypoint=user)
    assert marker.exists() and spec["name"] == user
    assert state_dict_sha256(model) == state_dict_sha256(source)


def test_timm_names_and_pipeline_builders_need_no_allowance(tmp_path: Path) -> None:
    for name in ("test_resnet", R8):
        save_model(tmp_path / "m.safetensors", build_model(name, num_classes=3), spec={
            "name": name, "num_classes": 3, "in_chans": 3})
        assert load_model(tmp_path / "m.safetensors")[1]["name"] == name


def test_timm_kwargs_cannot_load_a_second_file(tmp_path: Path) -> None:
    # checkpoint_path would make timm load (and, in some versions, unpickle) another file.
    marker = tmp_path / "ran"
    evil = _hostile_files(tmp_path, marker)["torch.save.pt"]
    path = _forged(tmp_path, "test_resnet", {"checkpoint_path": str(evil)})
    with pytest.raises(ModelFileError, match="model_kwargs must not set .*checkpoint_path"):
        load_model(path)
    assert not marker.exists()


# --- integrity -----------------------------------------------------------------------------------


def _flip_a_data_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # tensors follow the JSON header
    data[start + (len(data) - start) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_an_edited_tensor_fails_the_hash(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_model(path, build_model(R8, num_classes=3), spec={"name": R8, "num_classes": 3, "in_chans": 3})
    tensors, document = read_tensor_file(path)
    tensors["linear.weight"][0, 0] += 1.0  # a value changed, the document left as it was
    write_tensor_file(tmp_path / "edited.safetensors", tensors, document)
    with pytest.raises(ModelFileError, match="weights hash .* differs from the recorded .*edited"):
        load_model(tmp_path / "edited.safetensors")
    _flip_a_data_byte(path)  # one bit of the raw file
    with pytest.raises(ModelFileError, match="weights hash"):
        load_model(path)
