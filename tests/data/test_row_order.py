"""``prepare`` puts rows in a seeded random order before sharding (issue 10 item 6), and a
failed ``prepare`` leaves the previous shards as they were (item 4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.prepare import SHUFFLE_RULE, prepare_dataset
from pipeline.data.preprocess import Preprocess
from pipeline.data.shards import CorruptSampleError, load_manifest, load_split
from pipeline.train.batches import MemoryBatches
from pipeline.train.stream import StreamBatches
from pipeline.train.targets import Targets, target_fields
from schemas import layout as L
from schemas.config import PrepareConfig

CLASSES = 10
PER_CLASS = 24


@pytest.fixture(scope="module")
def sorted_source(tmp_path_factory: pytest.TempPathFactory, tiny) -> Path:
    """An ImageFolder tar listed class by class (as every ImageFolder is): 10 classes × 24."""
    rng = np.random.default_rng(0)
    members = {f"train/c{c}/{i:04d}.png": tiny.encode_image(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), "png")
               for c in range(CLASSES) for i in range(PER_CLASS)}
    return tiny.write_tar(tmp_path_factory.mktemp("sorted") / "sorted.tar", members)


def _prepare(source: Path, out: Path, *, shuffle: bool) -> object:
    cfg = PrepareConfig(source="imagefolder", train=str(source), val_fraction=0.1, samples_per_shard=PER_CLASS,
                        shuffle=shuffle, seed=3)
    prepare_dataset(cfg, out)
    return load_manifest(out)


def test_rows_are_shuffled_before_sharding_and_the_rule_is_recorded(sorted_source: Path, tmp_path: Path) -> None:
    plain = _prepare(sorted_source, tmp_path / "plain", shuffle=False)
    mixed = _prepare(sorted_source, tmp_path / "mixed", shuffle=True)
    plain_labels = load_split(plain, "train").labels
    mixed_labels = load_split(mixed, "train").labels
    assert np.all(np.diff(plain_labels) >= 0)  # source order: class by class
    assert sorted(plain_labels.tolist()) == sorted(mixed_labels.tolist())  # the same rows
    first_shard = mixed_labels[:PER_CLASS]
    assert len(set(first_shard.tolist())) >= 6  # one shard holds many classes, not one
    assert mixed.data["row_order"] == {"shuffled": True, "seed": 3, "rule": SHUFFLE_RULE}
    assert plain.data["row_order"]["shuffled"] is False
    again = _prepare(sorted_source, tmp_path / "again", shuffle=True)  # seeded: the same order
    assert np.array_equal(load_split(again, "train").labels, mixed_labels)
    assert again.sha256 == mixed.sha256


def _classes_per_batch(source, labels: np.ndarray, epochs: int = 3) -> float:
    seen = []
    for epoch in range(epochs):
        choice = torch.zeros(len(labels), dtype=torch.int64)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
        for rows, *_ in source(epoch, order, choice):
            if len(rows) == 16:
                seen.append(len(set(labels[rows.numpy()].tolist())))
    return float(np.mean(seen))


class _LabelsOnly:
    """Stands in for a teacher cache's split (``ShardedSplit``'s reading interface): the
    shards' own labels, whole-image views and zero logits; enough for the row order."""

    def __init__(self, manifest, labels: np.ndarray, size: int) -> None:
        self.shard_bounds = [(s["start"], s["stop"]) for s in manifest.split("train")["shards"]]
        self.num_rows, self.labels, self.size = len(labels), labels, size

    def read(self, start: int, stop: int, fields) -> dict[str, np.ndarray]:
        n = stop - start
        views = np.tile(np.asarray([0, 0, self.size, self.size, 0], np.float32), (n, 1, 1))  # (n, 1, 5)
        return {L.VIEWS: views, L.LABELS: self.labels[start:stop], L.LOGITS: np.zeros((n, 1, 10), np.float32)}

    def targets(self) -> Targets:
        whole = self.read(0, self.num_rows, ())
        return Targets(views=torch.from_numpy(whole[L.VIEWS]), labels=torch.from_numpy(whole[L.LABELS]),
                       teacher_logits=torch.from_numpy(whole[L.LOGITS]), teacher_emb=None, rdm_head=None,
                       rdm_emb=None, emb_scale=1.0)


def test_stream_batches_mix_classes_as_memory_batches_do(sorted_source: Path, tmp_path: Path) -> None:
    """A stream reads a few shards at a time through a buffer smaller than the split: over
    class-sorted shards its batches hold two or three classes; over shuffled rows as many as a
    random permutation of the whole split gives (memory mode)."""
    cpu = torch.device("cpu")
    result = {}
    for shuffle in (False, True):
        manifest = _prepare(sorted_source, tmp_path / str(shuffle), shuffle=shuffle)
        split = load_split(manifest, "train")
        size = split.stacked().shape[-1]
        cached = _LabelsOnly(manifest, split.labels, size)
        pre = Preprocess(image_size=size, crop_pct=1.0, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)
        stream = StreamBatches(manifest, "train", teacher=cached, rdm=None, fields=target_fields("ce"), preprocess=pre,
                               batch_size=16, workers=0, device=cpu, rank=0, world=1, seed=0, shuffle_buffer=32)
        memory = MemoryBatches(torch.from_numpy(split.stacked()), cached.targets(), preprocess=pre, batch_size=16,
                               rank=0, world=1)
        result[shuffle] = (_classes_per_batch(stream, split.labels), _classes_per_batch(memory, split.labels))
    stream_sorted, memory_sorted = result[False]
    stream_mixed, memory_mixed = result[True]
    assert memory_mixed > 7 and memory_sorted > 7  # a random batch of 16 from 10 classes: ~8 classes
    assert stream_mixed >= 0.9 * memory_mixed, result
    assert stream_sorted < 0.75 * memory_sorted  # what the shuffle fixes (measured: 0.64)


def test_a_failed_prepare_leaves_the_previous_shards(tiny, make_imagefolder_tar, tmp_path: Path) -> None:
    good = make_imagefolder_tar(tmp_path / "good.tar")
    out = tmp_path / "shards"
    prepare_dataset(PrepareConfig(source="imagefolder", train=str(good), samples_per_shard=4), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = make_imagefolder_tar(tmp_path / "bad.tar", overrides={"train/dog/0003.jpg": b"not a jpeg"})
    with pytest.raises(CorruptSampleError):
        prepare_dataset(PrepareConfig(source="imagefolder", train=str(bad), samples_per_shard=4), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # manifest and every tar untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar", "good.tar", "shards"]  # no temp dir left


def test_a_tar_cut_at_a_member_boundary_is_refused_and_the_old_shards_stay(tiny, make_imagefolder_tar,
                                                                           tmp_path: Path) -> None:
    """A tar cut where a member header starts (an interrupted copy) reads as a shorter valid
    archive with Python's tarfile; prepare must refuse it, not replace good shards with half."""
    import tarfile

    from pipeline.data.sources import SourceError

    good = make_imagefolder_tar(tmp_path / "good.tar")
    out = tmp_path / "shards"
    prepare_dataset(PrepareConfig(source="imagefolder", train=str(good), samples_per_shard=4), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with tarfile.open(good) as tar:
        members = tar.getmembers()
    cut = members[len(members) // 2].offset  # the header of a member in the middle
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(good.read_bytes()[:cut])
    with tarfile.open(truncated) as tar:  # what makes this dangerous: tarfile reads it without error
        assert 0 < len(tar.getmembers()) < len(members)
    with pytest.raises(SourceError, match="end-of-archive marker.*truncated"):
        prepare_dataset(PrepareConfig(source="imagefolder", train=str(truncated), samples_per_shard=4), out)
    with pytest.raises(SourceError, match="truncated"):
        prepare_dataset(PrepareConfig(source="webdataset", train=str(truncated), samples_per_shard=4), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
