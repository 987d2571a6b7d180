"""rdm.zarr: layout round trip, row alignment with the teacher cache, refusal of a mismatch."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.cache.embed import run_embed
from pipeline.cache.rdm_store import cache_bank_outputs, open_rdm_cache
from pipeline.cache.reader import open_cache
from pipeline.cache.store import CacheError
from pipeline.rd import RDMBank
from schemas import layout as L


@pytest.fixture(scope="module")
def bank_and_store(tmp_path_factory: pytest.TempPathFactory, embedded_cache):
    teacher = open_cache(embedded_cache[0])
    part = teacher.split("train")
    bank = RDMBank(init_scale=10.0, num_rdms=2, in_dim=part.embed_dim, hidden=8, num_classes=part.num_classes,
                   generator=torch.Generator().manual_seed(0)).eval()
    emb = torch.from_numpy(part.read_all((L.EMBEDDINGS,))[L.EMBEDDINGS].astype(np.float32))
    scale = float(emb.pow(2).mean().sqrt())
    path = tmp_path_factory.mktemp("rdm") / "rdm.zarr"
    cache_bank_outputs(bank, teacher=teacher, path=path, scale=scale,
                       attrs={"rate_weights": [2.0, 1.0], "embedding_scale": scale})
    return teacher, bank, scale, path


def test_layout_round_trip(bank_and_store) -> None:
    teacher, bank, scale, path = bank_and_store
    rdm = open_rdm_cache(path, teacher)
    assert rdm.num_rdms == 2
    for split in teacher.splits:
        part = teacher.split(split)
        block = rdm.split(split).read_all((L.RDM_X_HAT, L.RDM_LOGITS))
        n, v, d, c = part.num_rows, part.num_views, part.embed_dim, part.num_classes
        assert block[L.RDM_X_HAT].shape == (n, v, 2, d) and block[L.RDM_X_HAT].dtype == np.float16
        assert block[L.RDM_LOGITS].shape == (n, v, 2, c) and block[L.RDM_LOGITS].dtype == np.float32
        # Row-aligned: row r, view j holds the bank's output for the cached embedding (r, j),
        # computed here by one direct forward of the bank in rounding mode (no batching).
        emb = torch.from_numpy(part.read_all((L.EMBEDDINGS,))[L.EMBEDDINGS].astype(np.float32))
        with torch.no_grad():
            out = bank.eval()(emb.reshape(-1, d) / scale)
        x_hat, logits = (out.x_hat * scale).transpose(0, 1), out.logits.transpose(0, 1)
        np.testing.assert_allclose(block[L.RDM_LOGITS].reshape(-1, 2, c), logits.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(block[L.RDM_X_HAT].reshape(-1, 2, d).astype(np.float32),
                                   x_hat.numpy(), rtol=2e-3, atol=2e-3)
        # Zarr shards follow the teacher cache's shards.
        assert rdm.root[split][L.RDM_X_HAT].shards[0] == part.group[L.EMBEDDINGS].shards[0]


def test_refuses_other_teacher_cache(bank_and_store, tmp_path: Path, embed_settings, manifest, teacher_file) -> None:
    teacher, _, _, path = bank_and_store
    other_path = tmp_path / "other.zarr"
    settings = type(embed_settings).from_mapping({**embed_settings.to_dict(), "seed": embed_settings.seed + 1},
                                                 section="embed")
    run_embed(settings=settings, manifest=manifest, teacher_path=teacher_file, store_path=other_path)
    other = open_cache(other_path)
    assert other.fingerprint != teacher.fingerprint
    with pytest.raises(CacheError, match="was made from teacher cache .*Rerun `cifd rdm`"):
        open_rdm_cache(path, other)


def test_refuses_incomplete_or_missing(bank_and_store, tmp_path: Path) -> None:
    teacher, _, _, path = bank_and_store
    with pytest.raises(CacheError, match="no RDM cache"):
        open_rdm_cache(tmp_path / "absent.zarr", teacher)
    broken = tmp_path / "broken.zarr"
    shutil.copytree(path, broken)
    root = zarr.open_group(broken, mode="r+", use_consolidated=False)
    root.attrs[L.ATTR_COMPLETE] = False
    zarr.consolidate_metadata(str(broken))
    with pytest.raises(CacheError, match="incomplete"):
        open_rdm_cache(broken, teacher)
