"""The teacher fine-tune's two batch sources (``pipeline.train.supervised``) and the stage's
``teacher.data: stream``: the streamed split gives every row once per epoch, with the label in
its tar and the pixels of the box the loop drew for that row, exactly as the held split does;
a one-batch epoch trains the same weights from either; the stream never holds a split."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.data.preprocess import Preprocess, render_inputs
from pipeline.data.shards import CorruptSampleError, load_manifest, load_split
from pipeline.data.views import sample_views
from pipeline.models import build_model, load_model
from pipeline.train.supervised import HeldLabelled, LabelledStream
from schemas.config import ViewPolicyConfig

CPU = torch.device("cpu")
PRE = Preprocess(image_size=10, crop_pct=1.0, interpolation="bilinear", mean=(0.5, 0.45, 0.4), std=(0.25, 0.25, 0.25))


def _boxes(manifest, seed: int = 3) -> torch.Tensor:
    sizes = torch.from_numpy(manifest.sizes("train"))
    return sample_views(sizes=sizes, num_views=2, policy=ViewPolicyConfig(kind="rrc", scale=(0.3, 1.0)),
                        generator=torch.Generator().manual_seed(seed), image_size=PRE.image_size,
                        crop_pct=PRE.crop_pct)[:, 1]


def _by_row(batches) -> tuple[dict[int, torch.Tensor], dict[int, int], list[int]]:
    pixels, labels, sizes = {}, {}, []
    for rows, x, y in batches:
        sizes.append(len(rows))
        for r, xi, yi in zip(rows.tolist(), x, y.tolist(), strict=True):
            assert r not in pixels, f"row {r} twice in one epoch"
            pixels[r], labels[r] = xi, yi
    return pixels, labels, sizes


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_gives_each_row_once_with_its_label_and_the_pixels_of_its_box(manifest, workers: int) -> None:
    """Against the split decoded by ``read_shard`` and each row rendered alone under its box."""
    block = load_split(manifest, "train")
    boxes = _boxes(manifest)
    stream = LabelledStream(manifest, "train", preprocess=PRE, batch_size=8, workers=workers, device=CPU, seed=0,
                            shuffle_buffer=5)
    pixels, labels, sizes = _by_row(stream(0, torch.arange(len(block.labels)), boxes))
    assert sorted(pixels) == list(range(len(block.labels)))
    assert sizes == [8, 8, 8, 3] and stream.steps == 4  # 27 rows: exact batches, the last partial
    for row in range(len(block.labels)):
        image = torch.from_numpy(block.images[row])
        assert torch.equal(pixels[row], render_inputs([image], boxes[row:row + 1], preprocess=PRE)[0])
        assert labels[row] == int(block.labels[row])


def test_stream_and_held_sources_give_the_same_row_pixels_on_images_of_many_sizes(tmp_path: Path, tiny) -> None:
    """Images of many sizes are rendered in the worker (stream) or one by one on the host
    (held): the same (row, box) gives the same input and label either way."""
    from pipeline.data.prepare import prepare_dataset
    from schemas.config import PrepareConfig

    rng = np.random.default_rng(0)
    members = {f"train/c{c}/{i:04d}.png": tiny.encode_image(
        rng.integers(0, 256, (int(rng.integers(9, 30)), int(rng.integers(9, 30)), 3), dtype=np.uint8), "png")
        for c in range(2) for i in range(9)}
    tar = tiny.write_tar(tmp_path / "src.tar", members)
    prepare_dataset(PrepareConfig(source="imagefolder", train=str(tar), val_fraction=0.25, samples_per_shard=4),
                    tmp_path / "shards")
    manifest = load_manifest(tmp_path / "shards")
    assert manifest.image_shape is None
    block = load_split(manifest, "train")
    boxes = _boxes(manifest, seed=5)
    held = HeldLabelled([torch.from_numpy(im) for im in block.images], torch.from_numpy(block.labels),
                        preprocess=PRE, batch_size=5)
    order = torch.randperm(len(block.labels), generator=torch.Generator().manual_seed(1))
    held_px, held_y, _ = _by_row(held(0, order, boxes))
    stream = LabelledStream(manifest, "train", preprocess=PRE, batch_size=5, workers=1, device=CPU, seed=2,
                            shuffle_buffer=3)
    px, y, _ = _by_row(stream(1, order, boxes))
    assert sorted(px) == sorted(held_px) == list(range(len(block.labels)))
    for row in px:
        assert torch.equal(px[row], held_px[row]) and y[row] == held_y[row]


def test_stream_order_is_reseeded_per_epoch(manifest) -> None:
    boxes = _boxes(manifest)
    stream = LabelledStream(manifest, "train", preprocess=PRE, batch_size=27, workers=0, device=CPU, seed=0,
                            shuffle_buffer=4)
    orders = [next(iter(stream(epoch, torch.arange(27), boxes)))[0].tolist() for epoch in (0, 1, 0)]
    assert orders[0] == orders[2] and orders[0] != orders[1]


def _copy_with(shards_dir: Path, tmp_path: Path, tiny, member: str, data: bytes) -> Path:
    """A copy of the shards with one member of the first train shard replaced."""
    out = tmp_path / "shards"
    shutil.copytree(shards_dir, out)
    first = sorted(out.glob("train-*.tar"))[0]
    members = tiny.read_tar(first)
    key = sorted(members)[0].split(".")[0]
    name = f"{key}.cls" if member == "cls" else next(n for n in members if n.startswith(key) and n != f"{key}.cls")
    members[name] = data
    tiny.write_tar(first, members)
    return out


@pytest.mark.parametrize(("member", "data", "match"), [
    ("cls", b"7", r"label 7 is not one of the 3 classes; rerun `cifd prepare`"),
    ("cls", b"cat", r"label b'cat' is not an integer"),
    ("image", None, r"image is \(5, 6\) \(height, width\) but the manifest says \(12, 12\)"),
])
def test_a_tampered_shard_is_refused_naming_the_sample(shards_dir: Path, tmp_path: Path, tiny, member: str,
                                                         data: bytes | None, match: str) -> None:
    if data is None:
        data = tiny.encode_image(np.zeros((5, 6, 3), dtype=np.uint8), "png")
    manifest = load_manifest(_copy_with(shards_dir, tmp_path, tiny, member, data))
    stream = LabelledStream(manifest, "train", preprocess=PRE, batch_size=8, workers=0, device=CPU, seed=0,
                            shuffle_buffer=1)
    with pytest.raises(CorruptSampleError, match=r"shard train-\d+\.tar sample \d{9}: " + match):
        list(stream(0, torch.arange(27), _boxes(manifest)))


def _teacher_params(root: Path, shards_dir: Path, **teacher) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({
        "paths": {"shards": str(shards_dir), "teacher": str(root / "teacher.safetensors"),
                  "metrics": str(root / "metrics"), "plots": str(root / "plots")},
        "teacher": {"model": "pipeline.models.cifar_resnet:resnet8", "model_kwargs": {"width": 2}, "in_chans": 3,
                    "preprocess": {"image_size": 12, "mean": [0.5] * 3, "std": [0.25] * 3}, "epochs": 2,
                    "batch_size": 32, "optim": {"lr": 0.05}, "augment": {"kind": "rrc", "scale": [0.4, 1.0]},
                    "device": "cpu", **teacher},
    }))
    return params


def test_stage_trains_the_same_teacher_from_the_stream_without_holding_a_split(
        shards_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    """Batches of 32 over 27 rows: one step per epoch on every row, so the order cannot matter
    and both sources must reach the same weights (to float summation order). The stream run
    may not decode a whole split."""
    from stages import teacher as teacher_stage

    teacher_stage.run(_teacher_params(tmp_path / "memory", shards_dir))

    def refuse(*args, **kwargs):
        raise AssertionError("stream mode decoded a whole split")

    monkeypatch.setattr(teacher_stage, "load_split", refuse)
    teacher_stage.run(_teacher_params(tmp_path / "stream", shards_dir, data="stream", loader_workers=1,
                                      shuffle_buffer=7))
    held, _ = load_model(tmp_path / "memory" / "teacher.safetensors")
    streamed, _ = load_model(tmp_path / "stream" / "teacher.safetensors")
    torch.manual_seed(0)  # the stage's initial weights
    start = build_model("pipeline.models.cifar_resnet:resnet8", num_classes=3, in_chans=3, model_kwargs={"width": 2})
    moved = 0.0
    for (name, a), b, c in zip(held.state_dict().items(), streamed.state_dict().values(),
                               start.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), name
        moved = max(moved, float((a.float() - c.float()).abs().max()))
    assert moved > 1e-2  # it trained
    curves = [list(csv.DictReader((tmp_path / mode / "plots" / "teacher_curve.csv").open()))
              for mode in ("memory", "stream")]
    assert len(curves[0]) == len(curves[1]) == 2
    for a, b in zip(*curves, strict=True):
        assert a["val_top1"] == b["val_top1"] and abs(float(a["train_loss"]) - float(b["train_loss"])) < 1e-4
