"""build_model / weights / save-load / hashing, on tiny models at 32x32 (CPU, no downloads)."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import pytest
import torch

from pipeline.models import (
    MODEL_FILE_FORMAT,
    ImageClassifier,
    ModelFileError,
    ModelInterfaceError,
    ModelNotFoundError,
    WeightsMismatchError,
    build_model,
    file_sha256,
    library_versions,
    load_model,
    load_weights,
    logits_from_embedding_check,
    save_model,
    state_dict_sha256,
)
from pipeline.models.files import read_tensor_file

from . import toy

TOY = f"{toy.__name__}:make"
TIMM_TINY = "test_resnet"


def _x(channels: int = 3, batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, 32, 32, generator=torch.Generator().manual_seed(seed))


def _spec(name: str, num_classes: int, in_chans: int = 3, **extra) -> dict:
    return {"name": name, "num_classes": num_classes, "in_chans": in_chans, "model_kwargs": {}, **extra}


# --- timm -----------------------------------------------------------------------------------


def test_timm_embed_classify_reproduce_logits() -> None:
    model = build_model(TIMM_TINY, num_classes=5, in_chans=1)
    x = _x(channels=1)
    model.eval()
    with torch.no_grad():
        e = model.embed(x)
        assert e.shape == (4, model.embed_dim)
        assert model.classify(e).shape == (4, 5) and model.num_classes == 5
        torch.testing.assert_close(model(x), model.backbone(x))
    model.train()
    ok, err = logits_from_embedding_check(model, x)
    assert ok, err
    assert model.training and all(m.training for m in model.modules()), "check must restore train mode"


def test_unknown_timm_name_suggests_close_matches() -> None:
    with pytest.raises(ModelNotFoundError, match=r"resnet18.*module:function"):
        build_model("resnet_18", num_classes=10)


def test_hub_names_are_refused_with_a_hint() -> None:
    with pytest.raises(ModelNotFoundError, match="weights="):
        build_model("hf-hub:timm/resnet18.a1_in1k", num_classes=10)


def test_model_kwargs_must_not_override_arguments() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_model(TIMM_TINY, num_classes=10, model_kwargs={"num_classes": 3})


# --- entrypoints ----------------------------------------------------------------------------


def test_entrypoint_module_function() -> None:
    model = build_model(TOY, num_classes=3, in_chans=2, model_kwargs={"hidden": 6})
    assert isinstance(model, ImageClassifier) and not model.is_timm
    assert model.embed_dim == 6 and model.num_classes == 3
    assert model(_x(channels=2)).shape == (4, 3)
    assert logits_from_embedding_check(model, _x(channels=2)) == (True, 0.0)


def test_entrypoint_without_embed_is_an_interface_error() -> None:
    with pytest.raises(ModelInterfaceError, match=r"no method embed\(\).*embed_dim"):
        build_model(f"{toy.__name__}:make_no_embed", num_classes=10)


@pytest.mark.parametrize(
    ("function", "match"),
    [
        ("make_without_in_chans", "in_chans"),
        ("make_not_a_module", "expected a torch.nn.Module"),
    ],
)
def test_entrypoint_contract_errors(function: str, match: str) -> None:
    with pytest.raises(ModelInterfaceError, match=match):
        build_model(f"{toy.__name__}:{function}", num_classes=10)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("no_such_package_xyz.models:make", "cannot import module"),
        (f"{toy.__name__}:no_such_function", "callables there: .*make"),
    ],
)
def test_entrypoint_not_found(name: str, match: str) -> None:
    with pytest.raises(ModelNotFoundError, match=match):
        build_model(name, num_classes=10)


def test_logits_check_detects_inconsistent_forward() -> None:
    ok, err = logits_from_embedding_check(build_model(f"{toy.__name__}:make_inconsistent", num_classes=4), _x())
    assert not ok and err == pytest.approx(1.0)
    # Without a forward of its own there is nothing to compare against.
    assert logits_from_embedding_check(build_model(f"{toy.__name__}:make_no_forward", num_classes=4), _x()) == (
        True,
        0.0,
    )


# --- save / load / hash ---------------------------------------------------------------------


@pytest.mark.parametrize(("name", "in_chans"), [(TIMM_TINY, 1), ("pipeline.models.cifar_resnet:resnet8", 3)])
def test_save_load_round_trip(tmp_path: Path, name: str, in_chans: int) -> None:
    model = build_model(name, num_classes=4, in_chans=in_chans)
    with torch.no_grad():  # move BN statistics away from their init so they are checked too
        model.train()(_x(channels=in_chans, batch=8, seed=1))
    spec = _spec(name, 4, in_chans, versions=library_versions())
    path = tmp_path / "sub" / "model.safetensors"
    digest = save_model(path, model, spec=spec)
    assert digest == state_dict_sha256(model)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["model.safetensors"], "no temp file may remain"

    loaded, loaded_spec = load_model(path)
    assert loaded_spec == spec
    assert state_dict_sha256(loaded) == digest
    x = _x(channels=in_chans)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded.eval()(x))
        assert torch.equal(model.embed(x), loaded.embed(x))
    # safetensors + a JSON document: readable with no torch or pickle at all
    tensors, document = read_tensor_file(path)
    assert document == {"format": MODEL_FILE_FORMAT, "spec": spec, "state_dict_sha256": digest}
    assert state_dict_sha256(tensors) == digest
    # a model file is also a valid weights= file
    again = build_model(name, num_classes=4, in_chans=in_chans, weights=path)
    assert state_dict_sha256(again) == digest


def test_sha256_is_content_hash(tmp_path: Path) -> None:
    model = build_model(TOY, num_classes=3)
    digest = state_dict_sha256(model)
    assert digest == state_dict_sha256(model.backbone.state_dict())
    # independent of serialisation and key order
    reordered = dict(reversed(list(model.backbone.state_dict().items())))
    assert state_dict_sha256(reordered) == digest
    with torch.no_grad():
        model.backbone.head.weight[0, 0] += 1e-3
    assert state_dict_sha256(model) != digest
    # dtype is part of the hash
    assert state_dict_sha256(model.double()) != state_dict_sha256(model.float())


def test_library_versions_are_plain_strings() -> None:
    versions = library_versions()
    assert set(versions) == {"torch", "timm", "torchvision", "numpy"}
    assert all(type(v) is str for v in versions.values())


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"abc")
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_spec_must_hold_plain_types(tmp_path: Path) -> None:
    model = build_model(TOY, num_classes=3)
    with pytest.raises(TypeError, match="stored as JSON"):
        save_model(tmp_path / "m.pt", model, spec=_spec(TOY, 3, path=tmp_path))
    with pytest.raises(TypeError, match="TorchVersion"):
        save_model(tmp_path / "m.pt", model, spec=_spec(TOY, 3, torch=torch.__version__))
    with pytest.raises(ValueError, match="num_classes"):
        save_model(tmp_path / "m.pt", model, spec=_spec(TOY, 5))
    assert not list(tmp_path.iterdir())


def test_load_model_rejects_bare_weights(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = build_model(TOY, num_classes=3)
    torch.save(model.backbone.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ModelFileError, match="not a safetensors file written by cifd"):
        load_model(tmp_path / "bare.pt")
    save_file(model.backbone.state_dict(), tmp_path / "bare.safetensors")
    with pytest.raises(ModelFileError, match="without cifd's 'cifd' header entry"):
        load_model(tmp_path / "bare.safetensors")


# --- weights files --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "state_dict_ema", "module_prefix", "wrapper"])
def test_weights_layouts(tmp_path: Path, layout: str) -> None:
    source = build_model(TOY, num_classes=3)
    sd = source.backbone.state_dict()
    payload = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd},
        "state_dict_ema": {"state_dict_ema": sd},
        "module_prefix": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        "wrapper": source.state_dict(),  # ImageClassifier keys: backbone.*
    }[layout]
    torch.save(payload, tmp_path / "w.pt")
    model = build_model(TOY, num_classes=3, weights=tmp_path / "w.pt")
    assert state_dict_sha256(model) == state_dict_sha256(source)


def test_weights_needing_full_pickle_are_refused_with_the_conversion(tmp_path: Path) -> None:
    # timm training checkpoints carry an argparse.Namespace, which weights_only=True refuses:
    # cifd does not fall back to unpickling; it says how to convert the file.
    source = build_model(TOY, num_classes=3)
    torch.save({"state_dict": source.backbone.state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "w.pth")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "w.pth", weights_only=True)
    with pytest.raises(ModelFileError) as info:
        build_model(TOY, num_classes=3, weights=tmp_path / "w.pth")
    message = str(info.value)
    assert "\n" not in message and "never unpickles" in message
    assert "safetensors.torch.save_file(state_dict, " in message and str(tmp_path / "w.safetensors") in message
    # The conversion the message gives, run by the user on a file they trust, gives a file cifd reads.
    from safetensors.torch import save_file

    save_file(torch.load(tmp_path / "w.pth", weights_only=False)["state_dict"], tmp_path / "w.safetensors")
    model = build_model(TOY, num_classes=3, weights=tmp_path / "w.safetensors")
    assert state_dict_sha256(model) == state_dict_sha256(source)


def test_safetensors_weights(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = build_model(TOY, num_classes=3)
    save_file(source.backbone.state_dict(), tmp_path / "w.safetensors")
    model = build_model(TOY, num_classes=3, weights=tmp_path / "w.safetensors")
    assert state_dict_sha256(model) == state_dict_sha256(source)


def test_shape_mismatch_is_explained(tmp_path: Path) -> None:
    torch.save(build_model(TOY, num_classes=3, model_kwargs={"hidden": 6}).backbone.state_dict(), tmp_path / "w.pt")
    with pytest.raises(WeightsMismatchError) as info:
        build_model(TOY, num_classes=3, weights=tmp_path / "w.pt")
    message = str(info.value)
    assert str(tmp_path / "w.pt") in message
    assert "stem.weight file (6, 3, 3, 3) vs model (8, 3, 3, 3)" in message
    assert "stem.weight" in info.value.shape_mismatched and not info.value.missing


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    sd = build_model(TOY, num_classes=3).backbone.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["stem.bias"]
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(WeightsMismatchError, match=r"missing .*stem\.bias(.|\n)*unexpected .*extra\.weight") as info:
        build_model(TOY, num_classes=3, weights=tmp_path / "w.pt")
    assert info.value.missing == ["stem.bias"] and info.value.unexpected == ["extra.weight"]


def test_other_num_classes_suggests_fix_and_drop_head(tmp_path: Path) -> None:
    source = build_model(TIMM_TINY, num_classes=10, in_chans=1)
    save_model(tmp_path / "t.pt", source, spec=_spec(TIMM_TINY, 10, 1))  # safetensors whatever the suffix
    with pytest.raises(WeightsMismatchError, match=r"file has 10 classes, the model 4\. Set num_classes=10"):
        build_model(TIMM_TINY, num_classes=4, in_chans=1, weights=tmp_path / "t.pt")
    model = build_model(TIMM_TINY, num_classes=4, in_chans=1)
    head_before = model.get_classifier().weight.clone()
    load_weights(model, tmp_path / "t.pt", drop_head=True)
    assert torch.equal(model.get_classifier().weight, head_before)
    body = {k: v for k, v in model.backbone.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(v, source.backbone.state_dict()[k]) for k, v in body.items())


def test_wrong_in_chans_hint(tmp_path: Path) -> None:
    torch.save(build_model(TOY, num_classes=3, in_chans=3).backbone.state_dict(), tmp_path / "w.pt")
    with pytest.raises(WeightsMismatchError, match="check in_chans"):
        build_model(TOY, num_classes=3, in_chans=1, weights=tmp_path / "w.pt")


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        build_model(TOY, num_classes=3, weights=tmp_path / "nope.pt")
