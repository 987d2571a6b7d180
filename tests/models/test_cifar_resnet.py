"""CIFAR ResNet: architecture of He et al. §4.2 and the shared akamaster checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.models import build_model, logits_from_embedding_check, read_state_dict
from pipeline.models.cifar_resnet import CifarResNet, resnet8, resnet20, resnet56

SHARED_R56 = Path(__file__).resolve().parents[2].parent / "shared/models/cifar10-resnet56.th"
needs_shared = pytest.mark.skipif(
    not SHARED_R56.is_file(), reason=f"shared checkpoint {SHARED_R56} absent (../shared next to the repo)"
)


@pytest.mark.parametrize(
    ("factory", "n_params"),
    # He et al. 2016, Table 6: ResNet-20 0.27M, ResNet-56 0.85M parameters.
    [(resnet20, 269_722), (resnet56, 853_018)],
)
def test_parameter_count_matches_paper(factory, n_params: int) -> None:
    assert sum(p.numel() for p in factory().parameters()) == n_params


def test_shapes_width_and_channels() -> None:
    model = resnet8(num_classes=7, in_chans=1, width=8)
    x = torch.randn(2, 1, 32, 32)
    assert model.embed(x).shape == (2, 32)
    assert model(x).shape == (2, 7)
    assert model.embed_dim == 32 and model.num_classes == 7


def test_option_a_shortcut_has_no_parameters() -> None:
    keys = resnet20().state_dict().keys()
    assert not [k for k in keys if "shortcut" in k or "downsample" in k]


def test_rejects_bad_width() -> None:
    with pytest.raises(ValueError, match="width"):
        CifarResNet(1, width=0)


@needs_shared
def test_state_dict_keys_equal_shared_checkpoint() -> None:
    file_keys = set(read_state_dict(SHARED_R56))
    model_keys = set(resnet56().state_dict())
    # The checkpoint predates BatchNorm's num_batches_tracked buffer (PyTorch 0.4.1);
    # loading fills it in. Every other key is the same, with the module. prefix stripped.
    assert {k.removeprefix("module.") for k in file_keys} == {
        k for k in model_keys if not k.endswith("num_batches_tracked")
    }


@needs_shared
def test_shared_checkpoint_loads_and_splits_exactly() -> None:
    model = build_model("pipeline.models.cifar_resnet:resnet56", num_classes=10, weights=SHARED_R56).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.classify(model.embed(x)), model.backbone(x))
    ok, err = logits_from_embedding_check(model, x)
    assert ok and err == 0.0
    assert model.embed_dim == 64
