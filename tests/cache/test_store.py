"""The teacher-cache store (`pipeline.cache.store`) and reader (`pipeline.cache.reader`).

No torch here: this module is imported by the spawned writer processes, so it stays light.
"""

from __future__ import annotations

import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.cache.reader import CacheExpectation, open_cache
from pipeline.cache.store import (
    CacheCorruptError,
    CacheError,
    SplitSpec,
    StoreSpec,
    claim,
    create_store,
    existing_store,
    finalize,
    fingerprint,
    write_rows,
)
from schemas import layout as L

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part")

V, D, C = 2, 16, 5
SHARD_ROWS, CHUNK_ROWS = 8, 4
ROWS = {"train": 150, "val": 20}  # 19 and 3 shards, the last ones short
TEACHER_SHA = "a" * 64
MANIFEST_SHA = "b" * 64
TOKEN = "t" * 32  # the writer token tests claim their stores with


def bounds(n: int) -> tuple[tuple[int, int], ...]:
    return tuple((a, min(a + SHARD_ROWS, n)) for a in range(0, n, SHARD_ROWS))


def provenance(**teacher) -> dict:
    return {
        "teacher": {"model": "tiny", "state_dict_sha256": TEACHER_SHA, "num_classes": C, "embed_dim": D, **teacher},
        "dataset": {"manifest_sha256": MANIFEST_SHA},
    }


def spec() -> StoreSpec:
    return StoreSpec(num_views=V, embed_dim=D, num_classes=C, shard_rows=SHARD_ROWS, chunk_rows=CHUNK_ROWS,
                     logits_dtype="float32",
                     splits=tuple(SplitSpec(name=s, num_rows=n, shard_bounds=bounds(n)) for s, n in ROWS.items()))


def rows_for(split: str, start: int, stop: int) -> dict[str, np.ndarray]:
    """Distinct, exactly representable values for every row (split-dependent)."""
    r = np.arange(start, stop)
    offset = 1000 if split == "val" else 0
    emb = (r[:, None, None] % 512 + offset) + np.arange(V)[None, :, None] * 0.5 + np.arange(D)[None, None, :] * 0.0625
    logits = -(r[:, None, None] + offset) - np.arange(V * C).reshape(1, V, C) * 0.25
    views = np.broadcast_to((r[:, None, None] + offset) * 10 + np.arange(V * 5).reshape(1, V, 5), (len(r), V, 5))
    return {
        L.EMBEDDINGS: emb.astype(np.float16),
        L.LOGITS: logits.astype(np.float32),
        L.VIEWS: views.astype(np.float32),
        L.LABELS: (r % C).astype(np.int64),
        L.INDEX: (r + offset).astype(np.int64),
    }


def expected_split(split: str) -> dict[str, np.ndarray]:
    return rows_for(split, 0, ROWS[split])


def writer(path: str, worker: int, workers: int, barrier) -> None:
    """Spawned process: write every ``workers``-th whole shard of each split."""
    barrier.wait()
    root = zarr.open_group(path, mode="r+", use_consolidated=False)
    for split, n in ROWS.items():
        for i, (a, b) in enumerate(bounds(n)):
            if i % workers == worker:
                write(root, split, a, b)


def write(root: zarr.Group, split: str, a: int, b: int) -> None:
    write_rows(root, split, a, b, rows_for(split, a, b), fingerprint_=fingerprint(provenance()), token=TOKEN)


def make_store(path: Path, *, prov: dict | None = None) -> zarr.Group:
    root = create_store(path, spec(), provenance=prov or provenance())
    claim(root, TOKEN)
    return root


def fill(path: Path) -> None:
    root = zarr.open_group(path, mode="r+", use_consolidated=False)
    for split, n in ROWS.items():
        for a, b in bounds(n):
            write(root, split, a, b)


@pytest.fixture(scope="module")
def complete_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A filled, finalized store; read-only (tests that change it use ``store_copy``)."""
    path = tmp_path_factory.mktemp("store") / "cache.zarr"
    make_store(path)
    fill(path)
    finalize(path)
    return path


@pytest.fixture
def store_copy(complete_store: Path, tmp_path: Path) -> Path:
    path = tmp_path / "cache.zarr"
    shutil.copytree(complete_store, path)
    return path


def test_two_processes_writing_whole_shards_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "cache.zarr"
    make_store(path)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=writer, args=(str(path), w, 2, barrier)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0, f"writer exited with {p.exitcode}"
    root = zarr.open_group(path, mode="r", use_consolidated=False)
    for split in ROWS:
        group = root[split]
        assert np.asarray(group[L.DONE][:]).tolist() == [1] * len(bounds(ROWS[split]))
        expected = expected_split(split)
        for name in L.ROW_ARRAYS:
            got = group[name][:]
            assert got.dtype == expected[name].dtype
            lost = np.flatnonzero((got != expected[name]).reshape(len(got), -1).any(axis=1))
            assert lost.size == 0, f"{split}/{name}: rows {lost.tolist()} lost or wrong"
    finalize(path)
    cache = open_cache(path, CacheExpectation(teacher_sha256=TEACHER_SHA, manifest_sha256=MANIFEST_SHA,
                                              num_classes=C, embed_dim=D))
    assert cache.splits == ["train", "val"]


def test_store_layout_is_preallocated_and_shard_aligned(tmp_path: Path) -> None:
    path = tmp_path / "cache.zarr"
    root = make_store(path)
    assert root.attrs[L.ATTR_COMPLETE] is False
    assert root.attrs[L.ATTR_FINGERPRINT] == fingerprint(provenance())
    train = root["train"]
    assert train[L.EMBEDDINGS].shape == (ROWS["train"], V, D) and train[L.EMBEDDINGS].dtype == np.float16
    assert train[L.LOGITS].shape == (ROWS["train"], V, C) and train[L.LOGITS].dtype == np.float32
    assert train[L.VIEWS].shape == (ROWS["train"], V, len(L.VIEW_FIELDS))
    assert train[L.EMBEDDINGS].shards == (SHARD_ROWS, V, D) and train[L.EMBEDDINGS].chunks == (CHUNK_ROWS, V, D)
    assert train[L.DONE].shape == (len(bounds(ROWS["train"])),)
    assert not np.asarray(train[L.DONE][:]).any()
    with pytest.raises(CacheError, match="chunk_rows = 3 does not divide"):
        create_store(tmp_path / "bad.zarr", StoreSpec(**{**spec().__dict__, "chunk_rows": 3}),
                     provenance=provenance())


def test_write_rows_flags_only_its_own_shard(tmp_path: Path) -> None:
    path = tmp_path / "cache.zarr"
    root = make_store(path)
    a, b = bounds(ROWS["train"])[-1]  # the short last shard
    write(root, "train", a, b)
    done = np.asarray(root["train"][L.DONE][:])
    assert done.tolist() == [0] * (len(done) - 1) + [1]
    assert np.array_equal(root["train"][L.INDEX][a:b], np.arange(a, b))
    assert (root["train"][L.INDEX][:a] == L.INT_FILL).all()  # unwritten rows read as the fill value
    assert np.isnan(root["train"][L.LOGITS][:a]).all()


def test_existing_store_resumes_the_same_inputs_and_names_what_differs(tmp_path: Path) -> None:
    path = tmp_path / "cache.zarr"
    assert existing_store(path, provenance()) == (None, [])
    make_store(path)
    root, changes = existing_store(path, provenance())
    assert root is not None and changes == []
    root, changes = existing_store(path, provenance(state_dict_sha256="c" * 64, model="other"))
    assert root is None
    assert changes == ["teacher.model: tiny → other", f"teacher.state_dict_sha256: {'a' * 12}… → {'c' * 12}…"]


def test_read_all_equals_concatenated_blocks(complete_store: Path) -> None:
    cache = open_cache(complete_store)
    for split in ROWS:
        part = cache.split(split)
        assert (part.num_rows, part.num_views, part.embed_dim, part.num_classes) == (ROWS[split], V, D, C)
        everything = part.read_all()
        blocks = [part.read(a, b) for a, b in part.shard_bounds]
        expected = expected_split(split)
        for name in L.ROW_ARRAYS:
            assert np.array_equal(everything[name], np.concatenate([blk[name] for blk in blocks]))
            assert np.array_equal(everything[name], expected[name])
        some = part.read_all((L.LOGITS, L.LABELS))
        assert set(some) == {L.LOGITS, L.LABELS}
    with pytest.raises(CacheError, match="no split 'test'"):
        cache.split("test")


@pytest.mark.parametrize(("expect", "what", "fix"), [
    (CacheExpectation(teacher_sha256="c" * 64), "teacher state-dict sha256", "another teacher: rerun `cifd embed`"),
    (CacheExpectation(manifest_sha256="d" * 64), "dataset manifest sha256", "other shards: rerun `cifd embed`"),
    (CacheExpectation(num_classes=C + 1), "num_classes", "disagree on the label set"),
    (CacheExpectation(embed_dim=D * 2), "embedding dim", "another teacher's embeddings"),
])
def test_open_cache_refuses_other_inputs(complete_store: Path, expect, what, fix) -> None:
    with pytest.raises(CacheError) as info:
        open_cache(complete_store, expect)
    message = str(info.value)
    assert str(complete_store) in message and what in message and fix in message
    open_cache(complete_store, CacheExpectation(teacher_sha256=TEACHER_SHA, manifest_sha256=MANIFEST_SHA))


def test_open_cache_refuses_an_incomplete_store(tmp_path: Path) -> None:
    path = tmp_path / "cache.zarr"
    root = make_store(path)
    a, b = bounds(ROWS["train"])[0]
    write(root, "train", a, b)
    with pytest.raises(CacheError) as info:
        open_cache(path)
    message = str(info.value)
    assert "incomplete" in message and "1/19" in message and "0/3" in message
    assert "rerun `cifd embed` to resume" in message


def test_open_cache_refuses_a_complete_flag_with_missing_shards(store_copy: Path) -> None:
    root = zarr.open_group(store_copy, mode="r+", use_consolidated=False)
    root["val"][L.DONE][1] = 0
    with pytest.raises(CacheError, match=r"split val: shards \[1\] are not written"):
        open_cache(store_copy)


@pytest.mark.parametrize(("attr", "value", "what"), [
    (L.ATTR_SCHEMA, L.CACHE_SCHEMA_VERSION + 1, "schema version"),
    (L.ATTR_KIND, "something-else", "kind"),
])
def test_open_cache_refuses_another_schema_or_kind(store_copy: Path, attr, value, what) -> None:
    root = zarr.open_group(store_copy, mode="r+")
    root.attrs[attr] = value
    with pytest.raises(CacheError) as info:
        open_cache(store_copy)
    message = str(info.value)
    assert f"{what} is {value!r}" in message
    assert ("`cifd embed`" in message) if attr == L.ATTR_SCHEMA else ("paths.cache" in message)


def test_open_cache_without_a_store(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="no teacher cache at .*run `cifd embed`"):
        open_cache(tmp_path / "missing.zarr")


# Integrity on read and on open ------------------------------------------------------------


def test_a_deleted_shard_file_is_refused_naming_split_array_and_rows(store_copy: Path) -> None:
    (store_copy / "train" / L.LOGITS / "c" / "1" / "0" / "0").unlink()  # rows 8-15
    part = open_cache(store_copy).split("train")
    part.read_all((L.EMBEDDINGS, L.LABELS))  # the other arrays are intact
    with pytest.raises(CacheCorruptError, match=r"teacher cache .*cache\.zarr split train array logits: rows "
                                                r"8-15 \(8 rows\) are missing: they read as the fill value NaN"):
        part.read_all((L.LOGITS,))
    (store_copy / "val" / L.INDEX / "c" / "2").unlink()  # rows 16-19
    with pytest.raises(CacheCorruptError, match=r"split val array index: rows 16-19 \(4 rows\) are missing: .*-1"):
        open_cache(store_copy).split("val").read_all((L.INDEX,))


def test_a_flipped_byte_fails_the_read_naming_the_chunk_rows(store_copy: Path) -> None:
    shard = store_copy / "train" / L.EMBEDDINGS / "c" / "2" / "0" / "0"  # rows 16-23, chunks of 4
    data = bytearray(shard.read_bytes())
    data[20] ^= 0x01  # inside the first chunk's compressed bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match=r"split train array embeddings: rows 16-19 \(4 rows\) cannot be "
                                                r"read \(ValueError: Stored and computed checksum do not match"):
        open_cache(store_copy).split("train").read_all((L.EMBEDDINGS,))


def test_nan_in_a_cache_is_refused_on_read_with_the_row(store_copy: Path) -> None:
    root = zarr.open_group(store_copy, mode="r+")
    root["train"][L.LOGITS][42, 1, 3] = np.inf
    part = open_cache(store_copy).split("train")
    with pytest.raises(CacheCorruptError, match=r"split train array logits: rows 42 \(1 row\) hold NaN or inf"):
        part.rms(L.LOGITS)
    # verify's content check sees a change that keeps every value finite and every crc valid
    root["train"][L.LOGITS][42, 1, 3] = 1.0
    shard = 42 // SHARD_ROWS
    with pytest.raises(CacheCorruptError, match=rf"split train shard {shard} \(rows 40:48\): .*sha256 mismatch"):
        part.verify_shard(shard)
    part.verify_shard(shard - 1)


def test_an_edited_provenance_is_refused_on_open(store_copy: Path) -> None:
    root = zarr.open_group(store_copy, mode="r+")
    prov = dict(root.attrs[L.ATTR_PROVENANCE])
    prov["teacher"] = {**prov["teacher"], "model": "someone:else"}
    root.attrs[L.ATTR_PROVENANCE] = prov
    with pytest.raises(CacheError, match=r"provenance hashes to .*not to its recorded fingerprint .*edited"):
        open_cache(store_copy)


def test_unreadable_metadata_is_an_error_and_the_store_is_kept(store_copy: Path) -> None:
    (store_copy / "zarr.json").write_text("{ not json")
    with pytest.raises(CacheError, match="metadata cannot be read"):
        open_cache(store_copy)
    with pytest.raises(CacheError, match=r"existing teacher cache at .* cannot be read .*left as it is"):
        existing_store(store_copy, provenance())
    assert (store_copy / "train" / L.LOGITS).is_dir()


def test_a_directory_that_is_not_a_cache_is_never_replaced(tmp_path: Path) -> None:
    other = tmp_path / "data"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(CacheError, match="not a teacher cache .*left as it is"):
        existing_store(other, provenance())
    assert (other / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("stale", ["token", "fingerprint"])
def test_a_write_into_a_store_taken_over_by_another_run_is_refused(tmp_path: Path, stale: str) -> None:
    """Run A resumes after run B recreated (other inputs) or took over (same inputs) the
    store: A's next shard write refuses and writes nothing."""
    path = tmp_path / "cache.zarr"
    root = make_store(path)
    write(root, "train", 0, SHARD_ROWS)
    if stale == "token":
        claim(root, "b" * 32)
    else:
        root.attrs[L.ATTR_FINGERPRINT] = "f" * 64
    root = zarr.open_group(path, mode="r+", use_consolidated=False)
    with pytest.raises(CacheError, match="recreated or taken over by another run .*stops without writing"):
        write(root, "train", SHARD_ROWS, 2 * SHARD_ROWS)
    assert np.asarray(root["train"][L.DONE][:2]).tolist() == [1, 0]
    assert np.isnan(root["train"][L.LOGITS][SHARD_ROWS:2 * SHARD_ROWS]).all()


def test_finalize_drops_the_writer_token(tmp_path: Path) -> None:
    path = tmp_path / "cache.zarr"
    make_store(path)
    fill(path)
    finalize(path)
    attrs = zarr.open_group(path, mode="r").attrs.asdict()
    assert L.ATTR_WRITER not in attrs and attrs[L.ATTR_COMPLETE] is True
