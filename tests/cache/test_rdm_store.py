"""rdm.zarr: layout round trip, row alignment with the teacher cache, refusal of a mismatch."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.cache.embed import run_embed
from pipeline.cache.lock import StoreLockedError
from pipeline.cache.rdm_store import cache_bank_outputs, open_rdm_cache, rdm_writer
from pipeline.cache.reader import open_cache
from pipeline.cache.store import CacheCorruptError, CacheError
from pipeline.models import file_sha256
from pipeline.models.files import read_tensor_file
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
        block = rdm.split(split).read_all((L.RDM_X_HAT,))
        n, v, d = part.num_rows, part.num_views, part.embed_dim
        assert block[L.RDM_X_HAT].shape == (n, v, 2, d) and block[L.RDM_X_HAT].dtype == np.float16
        assert set(rdm.root[split].array_keys()) == {L.RDM_X_HAT, L.DONE, L.SHARD_SHA256}  # no logits array
        assert rdm.head.weight.shape == (2, part.num_classes, d)
        # Row-aligned: row r, view j holds the bank's output for the cached embedding (r, j),
        # computed here by one direct forward of the bank in rounding mode (no batching).
        emb = torch.from_numpy(part.read_all((L.EMBEDDINGS,))[L.EMBEDDINGS].astype(np.float32))
        with torch.no_grad():
            out = bank.eval()(emb.reshape(-1, d) / scale)
        x_hat, logits = (out.x_hat * scale).transpose(0, 1), out.logits.transpose(0, 1)
        # The logits readers make: the stored heads on the stored x̂, against the formula
        # written out (x̂ / scale) · Wᵀ + b per RDM, and against the bank's own logits (x̂ is
        # float16 in the store: a relative 2^-11 per value, through a head of D inputs).
        stored = torch.from_numpy(block[L.RDM_X_HAT].reshape(-1, 2, d).astype(np.float32))
        made = rdm.head(stored.transpose(0, 1)).transpose(0, 1)  # (n·V, M, C)
        w, b = bank.head.weight.detach().numpy(), bank.head.bias.detach().numpy()
        formula = np.einsum("nmd,mcd->nmc", stored.numpy() / scale, w) + b
        np.testing.assert_allclose(made.numpy(), formula, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(made.numpy(), logits.numpy(), rtol=0, atol=2e-2)
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


# Integrity, one writer, and the model file + store pair --------------------------------------


def _copy(path: Path, tmp_path: Path) -> Path:
    out = tmp_path / path.name
    shutil.copytree(path, out)
    return out


def test_rdm_cache_reads_are_checked(bank_and_store, tmp_path: Path) -> None:
    teacher, _, _, path = bank_and_store
    broken = _copy(path, tmp_path)
    (broken / "train" / L.RDM_X_HAT / "c" / "1" / "0" / "0" / "0").unlink()  # rows 4-7
    part = open_rdm_cache(broken, teacher).split("train")
    with pytest.raises(CacheCorruptError, match=r"RDM cache .*rdm\.zarr split train array x_hat: rows 4-7 "
                                                r"\(4 rows\) are missing.*`cifd rdm`"):
        part.read_all((L.RDM_X_HAT,))


def test_edited_rdm_heads_are_refused_on_open(bank_and_store, tmp_path: Path) -> None:
    teacher, _, _, path = bank_and_store
    edited = _copy(path, tmp_path)
    root = zarr.open_group(edited, mode="r+")
    weight = np.asarray(root[L.RDM_HEAD_WEIGHT][...])
    weight[0, 0, 0] += 1.0
    root[L.RDM_HEAD_WEIGHT][...] = weight
    with pytest.raises(CacheCorruptError, match="logit heads differ from those its attributes record"):
        open_rdm_cache(edited, teacher)


def test_an_edited_rdm_store_is_refused_on_open(bank_and_store, tmp_path: Path) -> None:
    teacher, _, _, path = bank_and_store
    edited = _copy(path, tmp_path)
    root = zarr.open_group(edited, mode="r+")
    root.attrs[L.ATTR_RDM] = {**root.attrs[L.ATTR_RDM], "embedding_scale": 1.0}
    with pytest.raises(CacheError, match="do not hash to its recorded fingerprint"):
        open_rdm_cache(edited, teacher)


def _bank(teacher, seed: int) -> RDMBank:
    part = teacher.split("train")
    return RDMBank(init_scale=10.0, num_rdms=2, in_dim=part.embed_dim, hidden=8, num_classes=part.num_classes,
                   generator=torch.Generator().manual_seed(seed)).eval()


def _publish(store: Path, model: Path, teacher, bank: RDMBank, on_shard=None) -> str:
    with rdm_writer(store, model) as writer:
        return writer.publish(bank, teacher=teacher, document={"seed": 0}, attrs={"rate_weights": [2.0, 1.0],
                              "embedding_scale": 1.0}, scale=1.0, batch_size=64, on_shard=on_shard)


def _snapshot(*paths: Path) -> dict[str, bytes]:
    files = [p for path in paths for p in ([path] if path.is_file() else sorted(path.rglob("*"))) if p.is_file()]
    return {str(p): p.read_bytes() for p in files}


def test_publish_writes_a_matching_pair(bank_and_store, tmp_path: Path) -> None:
    teacher = bank_and_store[0]
    store, model = tmp_path / "rdm.zarr", tmp_path / "models" / "rdm.safetensors"
    sha = _publish(store, model, teacher, _bank(teacher, 0))
    tensors, document = read_tensor_file(model)
    assert document == {"seed": 0} and set(tensors) == set(_bank(teacher, 0).state_dict())
    rdm = open_rdm_cache(store, teacher, model_file=model)
    assert rdm.checkpoint_sha256 == sha == file_sha256(model)
    other = tmp_path / "other.safetensors"
    shutil.copy(model, other)
    other.write_bytes(other.read_bytes() + b" ")
    with pytest.raises(CacheError, match=r"holds the outputs of the RDM model file .* the pair is out of step"):
        open_rdm_cache(store, teacher, model_file=other)
    # beside them only the lock file (kept: removing a lock file is racy), no working copies
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "other.safetensors", "rdm.zarr", "rdm.zarr.lock"]


def test_a_publish_that_fails_mid_write_leaves_the_old_pair(bank_and_store, tmp_path: Path) -> None:
    teacher = bank_and_store[0]
    store, model = tmp_path / "rdm.zarr", tmp_path / "rdm.safetensors"
    _publish(store, model, teacher, _bank(teacher, 0))
    before = _snapshot(store, model)
    written = []

    def fail_after_one_shard(split: str, start: int, stop: int) -> None:
        written.append((split, start, stop))
        raise OSError(28, "No space left on device")  # what a full disk raises mid-write

    with pytest.raises(CacheError, match=r"cannot write the RDM model file .* previous pair is left as it was"):
        _publish(store, model, teacher, _bank(teacher, 1), on_shard=fail_after_one_shard)
    assert written == [("train", 0, 4)]
    assert _snapshot(store, model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rdm.safetensors", "rdm.zarr", "rdm.zarr.lock"]
    open_rdm_cache(store, teacher, model_file=model)


def test_a_second_rdm_writer_is_refused(bank_and_store, tmp_path: Path) -> None:
    store, model = tmp_path / "rdm.zarr", tmp_path / "rdm.safetensors"
    with rdm_writer(store, model):
        with pytest.raises(StoreLockedError, match=rf"rdm\.zarr is being written by pid {os.getpid()} .*'cifd rdm'"):
            with rdm_writer(store, model):
                pass
