"""Compact teacher caches (issue 12, item 3): ``embed.logits: from_head``, bfloat16 logits,
top-k logits with the tail mass, the renormalised KD term over the kept classes, and the
bytes per view ``cifd cache info`` reports."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from click.testing import CliRunner

from pipeline.cache.embed import run_embed, teacher_head
from pipeline.cache.inspect import cache_info, verify_cache
from pipeline.cache.logits import LogitsFormat, bf16_bits, bytes_per_view, from_bf16_bits
from pipeline.cache.reader import open_cache
from pipeline.cache.store import CacheCorruptError, CacheError
from pipeline.losses import dgkd_loss, hinton_kd, kd_kl
from pipeline.models import ModelError, load_model
from pipeline.train.objective import LossWeights, method_loss
from pipeline.train.rdm import embedding_set
from pipeline.train.student import StudentOutput
from pipeline.train.targets import Batch, gather_targets, load_targets, target_fields
from schemas import layout as L
from schemas.base import ConfigError
from schemas.config import EmbedConfig
from stages.cli import main

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part"),
]


# ---------------------------------------------------------------- the KD term over kept classes

def renormalised_kl(t: list[float], s: list[float], kept: list[int], tau: float) -> float:
    """τ²·KL(p‖q) of teacher and student softmaxes at τ over the kept classes only, by hand."""
    pt = [math.exp(t[i] / tau) for i in kept]
    ps = [math.exp(s[i] / tau) for i in kept]
    p = [x / sum(pt) for x in pt]
    q = [x / sum(ps) for x in ps]
    return tau**2 * sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def test_kept_kl_against_a_hand_computed_case() -> None:
    t, s, kept = [3.0, 1.0, -2.0, 0.5], [0.2, 1.5, 0.0, -1.0], [0, 3]
    got = kd_kl(student_logits=torch.tensor([s]), teacher_logits=torch.tensor([t]), temperature=2.0,
                kept=torch.tensor([kept]))
    # p over {0, 3} at τ=2: e^1.5 / (e^1.5 + e^0.25); q: e^0.1 / (e^0.1 + e^-0.5)
    p0 = math.exp(1.5) / (math.exp(1.5) + math.exp(0.25))
    q0 = math.exp(0.1) / (math.exp(0.1) + math.exp(-0.5))
    hand = 4.0 * (p0 * math.log(p0 / q0) + (1 - p0) * math.log((1 - p0) / (1 - q0)))
    assert got.item() == pytest.approx(hand, rel=1e-5)
    assert hand == pytest.approx(renormalised_kl(t, s, kept, 2.0), rel=1e-12)


def test_kept_kl_with_every_class_kept_is_the_full_kl_and_batches_average() -> None:
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(5, 7, generator=g) * 3, torch.randn(5, 7, generator=g) * 3
    perm = torch.stack([torch.randperm(7, generator=g) for _ in range(5)])  # any order of all classes
    full = kd_kl(student_logits=s, teacher_logits=t, temperature=1.5)
    assert kd_kl(student_logits=s, teacher_logits=t, temperature=1.5, kept=perm).item() == pytest.approx(
        full.item(), rel=1e-5)
    kept = t.topk(3, dim=1).indices
    by_hand = np.mean([renormalised_kl(t[b].tolist(), s[b].tolist(), kept[b].tolist(), 1.5) for b in range(5)])
    assert kd_kl(student_logits=s, teacher_logits=t, temperature=1.5, kept=kept).item() == pytest.approx(
        by_hand, rel=1e-5)
    # Gradients reach only the student's kept classes.
    s = s.clone().requires_grad_(True)
    kd_kl(student_logits=s, teacher_logits=t, temperature=1.5, kept=kept).backward()
    mask = torch.zeros(5, 7, dtype=torch.bool).scatter_(1, kept, True)
    assert (s.grad[~mask] == 0).all() and (s.grad[mask] != 0).any()


def _weights(**kw) -> LossWeights:
    base = dict(temperature=2.0, kd_alpha=0.9, ce_weight=1.0, kl_weight=1.0, rdm_weights=None, feature_weight=0.0,
                rate_weight=0.0, kd_dropout=0.0, distortion="mse", ckd_weight=0.0)
    return LossWeights(**{**base, **kw})


@pytest.mark.parametrize("method", ["kd", "dgkd"])
def test_method_loss_uses_the_kept_kl_for_the_teacher_term(method: str) -> None:
    """KD: (1-α)·CE + α·τ²·KL_kept; DGKD: CE + τ²·KL_kept(T) + Σ λ_n τ²·KL(RDM_n) (RDMs dense)."""
    g = torch.Generator().manual_seed(1)
    b, c, m = 4, 6, 2
    s, t = torch.randn(b, c, generator=g), torch.randn(b, c, generator=g) * 2
    rdm = torch.randn(m, b, c, generator=g)
    labels = torch.tensor([0, 3, 5, 1])
    kept = t.topk(2, dim=1).indices
    batch = Batch(labels=labels, teacher_logits=t, teacher_emb=None, rdm_logits=rdm if method == "dgkd" else None,
                  rdm_emb=None, teacher_kept=kept)
    out = StudentOutput(logits=s, projected=None, bits=None)
    got = method_loss(method, out=out, batch=batch, weights=_weights(), generator=torch.Generator(),
                      rdm_weights=torch.ones(m if method == "dgkd" else 0), emb_scale=1.0)
    ce = F.cross_entropy(s, labels).item()
    kl_kept = np.mean([renormalised_kl(t[i].tolist(), s[i].tolist(), kept[i].tolist(), 2.0) for i in range(b)])
    if method == "kd":
        expected = 0.1 * ce + 0.9 * kl_kept
    else:
        dense = [np.mean([renormalised_kl(rdm[n, i].tolist(), s[i].tolist(), list(range(c)), 2.0) for i in range(b)])
                 for n in range(m)]
        expected = ce + kl_kept + sum(dense)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # Without kept classes: the dense losses, unchanged.
    dense_batch = dataclasses.replace(batch, teacher_kept=None)
    plain = method_loss(method, out=out, batch=dense_batch, weights=_weights(), generator=torch.Generator(),
                        rdm_weights=torch.ones(m if method == "dgkd" else 0), emb_scale=1.0)
    ref = (hinton_kd(student_logits=s, teacher_logits=t, labels=labels, temperature=2.0, alpha=0.9).total
           if method == "kd" else dgkd_loss(student_logits=s, labels=labels, teacher_logits=t, assistant_logits=rdm,
                                            assistant_weights=torch.ones(m), ce_weight=1.0, kl_weight=1.0,
                                            temperature=2.0, keep=None).total)
    assert plain.item() == pytest.approx(ref.item(), rel=1e-6)


# ---------------------------------------------------------------- formats

def test_bfloat16_bits_round_trip_and_fill_reads_as_nan() -> None:
    x = np.array([0.0, -1.5, 3.14159, 1e30, -7e-3], np.float32)
    bits = bf16_bits(x)
    assert bits.dtype == np.int16
    assert np.array_equal(from_bf16_bits(bits), torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    assert np.array_equal(bf16_bits(from_bf16_bits(bits)), bits)  # decoded values re-encode exactly
    assert np.isnan(from_bf16_bits(np.array([L.INT_FILL], np.int16)))[0]  # a missing chunk stays visible


def test_topk_encode_and_dense_logits() -> None:
    g = torch.Generator().manual_seed(2)
    z = (torch.randn(6, 2, 9, generator=g) * 3).numpy()
    fmt = LogitsFormat("stored", "float32", 3, 9)
    arrays = fmt.encode(z)
    assert arrays[L.TOPK_INDEX].dtype == np.int16 and arrays[L.TOPK_VALUES].shape == (6, 2, 3)
    p = torch.softmax(torch.from_numpy(z).double(), -1)
    idx = torch.from_numpy(arrays[L.TOPK_INDEX]).long()
    np.testing.assert_allclose(arrays[L.TOPK_TAIL], 1 - p.gather(-1, idx).sum(-1).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(arrays[L.TOPK_VALUES], np.sort(z, -1)[..., ::-1][..., :3])
    dense = fmt.dense({k: torch.from_numpy(v) for k, v in arrays.items()})
    q = torch.softmax(dense.double(), -1)
    # kept classes keep their probabilities (τ = 1); the others share the tail mass equally
    np.testing.assert_allclose(q.gather(-1, idx), p.gather(-1, idx), rtol=1e-5)
    rest = torch.ones_like(q, dtype=torch.bool).scatter_(-1, idx, False)
    np.testing.assert_allclose(q[rest].view(6, 2, 6), (torch.from_numpy(arrays[L.TOPK_TAIL]).double() / 6)[..., None]
                               .expand(6, 2, 6), rtol=1e-4)
    packed = torch.from_numpy(fmt.pack(arrays))
    unpacked, kept = fmt.unpack(packed)
    assert torch.equal(kept, idx) and torch.allclose(unpacked, dense)
    # k = C: the logits come back exactly
    full = LogitsFormat("stored", "float32", 9, 9)
    back = full.dense({k: torch.from_numpy(v) for k, v in full.encode(z).items()})
    assert torch.equal(back, torch.from_numpy(z))


def test_bytes_per_view_from_d_c_v_k() -> None:
    got = bytes_per_view(embed_dim=2048, num_classes=1000, num_views=8, topk=10)
    base = 2 * 2048 + 20 + 16 / 8
    assert got == {"stored_float32": base + 4000, "stored_float16": base + 2000, "stored_bfloat16": base + 2000,
                   "top10_float16": base + 10 * (2 + 2) + 4, "from_head": base}


def test_config_rules() -> None:
    with pytest.raises(ConfigError, match="logits_topk"):
        EmbedConfig.from_mapping({"logits": "from_head", "logits_topk": 5}, section="embed")
    with pytest.raises(ConfigError, match="logits_topk"):
        EmbedConfig.from_mapping({"logits_topk": 0}, section="embed")
    assert EmbedConfig.from_mapping({"logits_dtype": "bfloat16"}, section="embed").logits_dtype == "bfloat16"


def test_from_head_is_refused_when_the_classifier_does_not_reproduce_the_logits(teacher_file) -> None:
    model, _ = load_model(str(teacher_file))
    x = torch.rand(2, 3, 12, 12)
    with pytest.raises(CacheError, match="embed.logits: stored"):
        teacher_head(model.eval(), x, check=(False, 0.3), source="t")
    model.backbone.linear = torch.nn.Sequential(model.backbone.linear)  # not one Linear any more
    with pytest.raises(ModelError, match="one Linear"):
        teacher_head(model.eval(), x, check=(True, 0.0), source="t")


# ---------------------------------------------------------------- caches written by embed

@pytest.fixture(scope="module")
def compact_caches(tmp_path_factory, embed_settings, manifest, teacher_file) -> dict[str, Path]:
    before = torch.get_num_threads()
    out = {}
    try:
        for name, change in (("from_head", {"logits": "from_head"}),
                             ("top2_bf16", {"logits_topk": 2, "logits_dtype": "bfloat16"})):
            path = tmp_path_factory.mktemp(name) / "teacher.zarr"
            run_embed(settings=dataclasses.replace(embed_settings, **change), manifest=manifest,
                      teacher_path=teacher_file, store_path=path)
            out[name] = path
    finally:
        torch.set_num_threads(before)
    return out


def test_from_head_cache_recomputes_the_logits(compact_caches, embedded_cache) -> None:
    stored, fh = open_cache(embedded_cache[0]), open_cache(compact_caches["from_head"])
    assert fh.fingerprint != stored.fingerprint and fh.provenance["logits"]["kind"] == "from_head"
    root = zarr.open_group(compact_caches["from_head"], mode="r")
    assert L.LOGITS not in root["train"] and root[L.HEAD_WEIGHT].shape == (3, 16)
    ref = stored.split("train").read_all((L.LOGITS, L.EMBEDDINGS))
    got = fh.split("train").read_all((L.LOGITS, L.EMBEDDINGS))
    np.testing.assert_array_equal(got[L.EMBEDDINGS], ref[L.EMBEDDINGS])  # same teacher, same views
    w, b = fh.logits_format.head_weight, fh.logits_format.head_bias
    by_hand = torch.from_numpy(ref[L.EMBEDDINGS]).float() @ w.T + b
    np.testing.assert_allclose(got[L.LOGITS], by_hand.numpy(), rtol=1e-6, atol=1e-6)
    # within float16 embedding rounding of the teacher's own float32 logits
    np.testing.assert_allclose(got[L.LOGITS], ref[L.LOGITS], atol=2e-2 * np.abs(ref[L.LOGITS]).max())
    # memory mode: packed (the embeddings), made into logits per batch on the device
    targets = load_targets(fh, None, method="kd", device=torch.device("cpu"))
    assert targets.logits is not None and targets.teacher_logits.shape[-1] == 16
    rows, views = torch.tensor([0, 5, 7]), torch.tensor([2, 0, 1])
    batch = gather_targets(targets, rows, views)
    np.testing.assert_allclose(batch.teacher_logits.numpy(), got[L.LOGITS][rows, views], rtol=1e-6, atol=1e-6)
    assert batch.teacher_kept is None and target_fields("kd", fh.logits_format)[0] == (L.VIEWS, L.LABELS, L.EMBEDDINGS)
    # stage two reads the same logits
    pairs = embedding_set(fh.split("train"), views=slice(None), device=torch.device("cpu"))
    np.testing.assert_allclose(pairs.logits.numpy(), got[L.LOGITS].reshape(-1, 3), rtol=1e-6, atol=1e-6)


def test_from_head_cache_refuses_an_edited_head(compact_caches, tmp_path) -> None:
    import shutil

    path = tmp_path / "edited.zarr"
    shutil.copytree(compact_caches["from_head"], path)
    root = zarr.open_group(path, mode="r+", use_consolidated=False)
    weight = root[L.HEAD_WEIGHT][...]
    root[L.HEAD_WEIGHT][0, 0] = weight[0, 0] + 1.0  # a valid chunk (crc32c recomputed), other values
    with pytest.raises(CacheCorruptError, match="classifier head differs"):
        open_cache(path)


def test_topk_bf16_cache(compact_caches, embedded_cache, teacher_file, shards_dir) -> None:
    stored, top = open_cache(embedded_cache[0]), open_cache(compact_caches["top2_bf16"])
    group = zarr.open_group(compact_caches["top2_bf16"], mode="r")["train"]
    assert L.LOGITS not in group and group[L.TOPK_VALUES].dtype == np.int16 and group[L.TOPK_INDEX].shape[-1] == 2
    ref = stored.split("train").read_all((L.LOGITS,))[L.LOGITS]
    raw = top.split("train").read_all(top.split("train").row_arrays)
    idx = raw[L.TOPK_INDEX].astype(np.int64)
    np.testing.assert_array_equal(idx[..., 0], ref.argmax(-1))
    kept_ref = np.take_along_axis(ref, idx, -1)
    np.testing.assert_allclose(raw[L.TOPK_VALUES], kept_ref, rtol=2**-8)  # bfloat16: 8 significant bits
    p = torch.softmax(torch.from_numpy(ref).double(), -1).numpy()
    np.testing.assert_allclose(raw[L.TOPK_TAIL], 1 - np.take_along_axis(p, idx, -1).sum(-1), atol=2e-2)
    # memory mode hands the kept classes to the loss
    targets = load_targets(top, None, method="kd", device=torch.device("cpu"))
    batch = gather_targets(targets, torch.tensor([1, 2]), torch.tensor([0, 2]))
    assert torch.equal(batch.teacher_kept, torch.from_numpy(idx[[1, 2], [0, 2]]))
    # cache verify compares the kept classes with the live teacher; --full checks the bits
    report = verify_cache(compact_caches["top2_bf16"], teacher=teacher_file, shards=shards_dir, samples=20, seed=0,
                          tolerance=1e-2, full=True)
    assert report.ok, report.problems
    report = verify_cache(compact_caches["from_head"], teacher=teacher_file, shards=shards_dir, samples=20, seed=0,
                          tolerance=1e-2, full=True)
    assert report.ok, report.problems


def test_cache_info_bytes_per_choice(compact_caches, embedded_cache) -> None:
    info = cache_info(compact_caches["from_head"])
    split = info["splits"]["train"]
    d, c, v = split["D"], split["C"], split["V"]
    assert split["bytes_per_sample_view_by_choice"] == bytes_per_view(embed_dim=d, num_classes=c, num_views=v, topk=5)
    assert info["logits"]["kind"] == "from_head" and info["logits"]["head_bytes"] > 0
    assert L.LOGITS not in split["stored_bytes_per_sample_view_by_array"]
    # uncompressed: the embeddings, boxes, labels and index only
    assert split["bytes_per_sample_view_raw"] == pytest.approx(2 * d + 20 + 16 / v, abs=0.1)
    result = CliRunner().invoke(main, ["cache", "info", str(compact_caches["top2_bf16"]), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["logits"] == {"kind": "stored", "dtype": "bfloat16", "topk": 2, "head_bytes": 0}
    assert "top2_float16" in data["splits"]["train"]["bytes_per_sample_view_by_choice"]
    text = CliRunner().invoke(main, ["cache", "info", str(embedded_cache[0])])
    assert text.exit_code == 0 and "by logits choice" in text.output and "from_head" in text.output


@pytest.mark.parametrize("name", ["from_head", "top2_bf16"])
def test_stream_and_memory_give_the_same_compact_targets(compact_caches, manifest, name: str) -> None:
    """Stream mode packs the compact arrays per sample and makes the logits on the device,
    as memory mode does per batch: the same logits (and kept classes) for every (row, view)."""
    from pipeline.data.preprocess import Preprocess
    from pipeline.train.stream import StreamBatches

    cache = open_cache(compact_caches[name])
    cpu = torch.device("cpu")
    targets = load_targets(cache, None, method="kd", device=cpu)
    stream = StreamBatches(manifest, "train", teacher=cache.split("train"), rdm=None,
                           fields=target_fields("kd", cache.logits_format),
                           preprocess=Preprocess.from_spec(cache.provenance, source="cache"), batch_size=4, workers=0,
                           device=cpu, rank=0, world=1, seed=0, shuffle_buffer=100)
    assert stream.logits is not None  # packed: made into logits in the main process
    choice = torch.randint(cache.split("train").num_views, (targets.num_rows,), generator=torch.Generator().manual_seed(3))
    seen = 0
    for rows, views, _, batch in stream(0, torch.arange(targets.num_rows), choice):
        expected = gather_targets(targets, rows, views)
        torch.testing.assert_close(batch.teacher_logits, expected.teacher_logits, rtol=0, atol=0)
        assert (batch.teacher_kept is None) == (expected.teacher_kept is None)
        if expected.teacher_kept is not None:
            assert torch.equal(batch.teacher_kept, expected.teacher_kept)
        seen += len(rows)
    assert seen == targets.num_rows
