"""Images of many sizes, end to end: real photos (the shared CIFAR-10 JPEGs) re-sized to
random sizes, plus a grey and an RGBA image, through prepare → embed → cache verify →
stage three's loaders. References: torchvision's eval transform, timm's own eval transform,
and the teacher run on the pixels the loaders hand the student."""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from pipeline.cache.embed import run_embed
from pipeline.cache.inspect import cache_info, verify_cache
from pipeline.cache.reader import open_cache
from pipeline.data.prepare import prepare_dataset
from pipeline.data.preprocess import Preprocess, render_inputs, resolve_preprocess
from pipeline.data.shards import load_manifest, load_split
from pipeline.models import build_model, load_model, save_model
from pipeline.train.batches import MemoryBatches
from pipeline.train.stream import StreamBatches
from pipeline.train.targets import load_targets, target_fields
from schemas import layout as L
from schemas.config import EmbedConfig, PrepareConfig

SHARED_TEST = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-jpeg/test.tar"
CLASSES = ("airplane", "automobile", "bird")
PER_CLASS = 8
TEACHER_PRE = {"image_size": 16, "crop_pct": 0.875, "interpolation": "bicubic", "mean": [0.49, 0.48, 0.45],
               "std": [0.25, 0.24, 0.26]}
pytestmark = [
    pytest.mark.skipif(not SHARED_TEST.is_file(), reason=f"{SHARED_TEST} absent (../shared beside the repository)"),
    pytest.mark.usefixtures("one_thread"),
]


def _photos() -> dict[str, bytes]:
    """ImageFolder members: real CIFAR photos re-sized to random sizes (shorter side 14..60,
    aspect 3:4..4:3, seeded), one saved grey and one saved RGBA."""
    rng = np.random.default_rng(0)
    out: dict[str, bytes] = {}
    with tarfile.open(SHARED_TEST) as tar:
        for cls in CLASSES:
            for i in range(PER_CLASS):
                member = tar.extractfile(f"test/{cls}/{i:04d}.jpg")
                assert member is not None
                img = Image.open(io.BytesIO(member.read())).convert("RGB")
                short, aspect = int(rng.integers(14, 61)), math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
                size = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
                img = img.resize(size, Image.Resampling.BICUBIC)
                buffer = io.BytesIO()
                if (cls, i) == ("bird", 0):
                    img.convert("L").save(buffer, format="JPEG", quality=90)
                elif (cls, i) == ("bird", 1):
                    rgba = img.convert("RGBA")
                    rgba.putalpha(128)
                    rgba.save(buffer, format="PNG")
                else:
                    img.save(buffer, format="JPEG", quality=90)
                out[f"train/{cls}/{i:04d}.jpg"] = buffer.getvalue()
    return out


@pytest.fixture(scope="module")
def varsize(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("varsize")
    tar_path = root / "photos.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in _photos().items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    prepare_dataset(PrepareConfig(source="imagefolder", train=str(tar_path), samples_per_shard=4, val_fraction=0.25),
                    root / "shards")
    manifest = load_manifest(root / "shards")
    torch.manual_seed(0)
    model = build_model("pipeline.models.cifar_resnet:resnet8", num_classes=3, in_chans=3, model_kwargs={"width": 4})
    teacher = root / "teacher.safetensors"
    save_model(teacher, model.eval(), spec={"name": "pipeline.models.cifar_resnet:resnet8", "num_classes": 3,
                                            "in_chans": 3, "model_kwargs": {"width": 4}, "preprocess": TEACHER_PRE})
    settings = EmbedConfig.from_mapping({"views": 3, "policy": {"kind": "rrc", "scale": [0.2, 1.0]}, "batch_size": 8,
                                         "chunk_rows": 2, "scheduler": "synchronous", "device": "cpu"}, section="embed")
    run_embed(settings=settings, manifest=manifest, teacher_path=teacher, store_path=root / "cache.zarr")
    return manifest, teacher, root / "cache.zarr"


def test_the_set_really_has_many_sizes_and_modes(varsize) -> None:
    manifest, _, _ = varsize
    assert manifest.image_shape is None and manifest.mode == "RGB"
    sizes = np.concatenate([manifest.sizes(s) for s in L.SPLITS])
    assert len({tuple(s) for s in sizes.tolist()}) > 15 and sizes.min() >= 14 and sizes.max() <= 80


def test_cached_clean_views_are_the_teacher_on_torchvisions_eval_transform(varsize) -> None:
    """View 0 of every row is the teacher on Resize(floor(S / crop_pct), bicubic) + CenterCrop(S)
    of that image, computed by torchvision, not by the pipeline's renderer."""
    manifest, teacher_path, store = varsize
    model, _ = load_model(teacher_path)
    model.eval()
    cache = open_cache(store)
    size, mean, std = TEACHER_PRE["image_size"], torch.tensor(TEACHER_PRE["mean"]), torch.tensor(TEACHER_PRE["std"])
    for split in L.SPLITS:
        block = load_split(manifest, split)
        expected = []
        for image in block.images:
            x = torch.from_numpy(image).float()[None] / 255
            x = TF.resize(x, math.floor(size / TEACHER_PRE["crop_pct"]), interpolation=TF.InterpolationMode.BICUBIC,
                          antialias=True)
            x = TF.center_crop(x, [size, size]).clamp(0, 1)  # bicubic overshoot clipped, as image loaders do
            expected.append((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
        with torch.no_grad():
            logits = model(torch.cat(expected))
        cached = torch.from_numpy(cache.split(split).read_all((L.LOGITS,))[L.LOGITS][:, 0])
        torch.testing.assert_close(cached, logits, atol=1e-4, rtol=1e-4)


def test_views_are_drawn_on_each_images_own_size(varsize) -> None:
    manifest, _, store = varsize
    views = open_cache(store).split("train").read_all((L.VIEWS,))[L.VIEWS]  # (N, V, 5)
    sizes = manifest.sizes("train").astype(np.float32)
    top, left, h, w = (views[:, 1:, k] for k in range(4))
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= sizes[:, 0, None]).all() and (left + w <= sizes[:, 1, None]).all()
    assert (h * w < 0.9 * (sizes[:, 0] * sizes[:, 1])[:, None]).any()  # real crops
    assert ((h / sizes[:, 0, None]) < 0.8).any() and ((w / sizes[:, 1, None]) < 0.8).any()


def test_both_loaders_hand_the_student_the_pixels_embed_fed_the_teacher(varsize) -> None:
    """Stream mode (two loader workers rendering image by image) and memory mode give, for every
    (row, view), the same inputs; the teacher on them gives the cached outputs."""
    manifest, teacher_path, store = varsize
    model, spec = load_model(teacher_path)
    model.eval()
    pre = Preprocess.from_spec(spec, source="teacher")
    cached = open_cache(store).split("train").read_all((L.VIEWS, L.LOGITS, L.LABELS))
    boxes = torch.from_numpy(cached[L.VIEWS])
    n = len(boxes)
    block = load_split(manifest, "train")
    choice = torch.randint(3, (n,), generator=torch.Generator().manual_seed(1))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(2))
    cache = open_cache(store)
    stream = StreamBatches(manifest, "train", teacher=cache.split("train"), rdm=None, fields=target_fields("kd"),
                           preprocess=pre, batch_size=5, workers=2, device=torch.device("cpu"), rank=0, world=1, seed=0,
                           shuffle_buffer=100)
    targets = load_targets(cache, None, method="kd", device=torch.device("cpu"))
    memory = MemoryBatches([torch.from_numpy(im) for im in block.images], targets, preprocess=pre, batch_size=5,
                           rank=0, world=1)
    seen = {}
    for source in (stream, memory):
        for rows, views, x, batch in source(0, order, choice):
            assert x.shape == (len(rows), 3, 16, 16) and x.dtype == torch.float32
            assert torch.equal(batch.teacher_logits, targets.teacher_logits[rows, views])
            for r, v, xi in zip(rows.tolist(), views.tolist(), x, strict=True):
                if (r, v) in seen:
                    assert torch.equal(seen[(r, v)], xi), (r, v)
                seen[(r, v)] = xi
    assert len(seen) == n
    keys = sorted(seen)
    with torch.no_grad():
        logits = model(torch.stack([seen[k] for k in keys]))
    expected = torch.from_numpy(np.stack([cached[L.LOGITS][r, v] for r, v in keys]))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_cache_verify_replays_a_variable_size_cache(varsize) -> None:
    manifest, teacher_path, store = varsize
    report = verify_cache(store, teacher=teacher_path, shards=manifest.root, samples=40, seed=3, tolerance=1e-2,
                          full=True)
    assert report.ok, report.problems
    info = cache_info(store)
    assert info["preprocess"] == TEACHER_PRE and info["images"] == {"mode": "RGB", "shape": None}


def test_a_student_of_another_size_sees_the_same_box_at_its_own_size(varsize) -> None:
    manifest, teacher_path, store = varsize
    _, spec = load_model(teacher_path)
    teacher = Preprocess.from_spec(spec, source="teacher")
    student = Preprocess(image_size=24, crop_pct=1.0, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)
    boxes = torch.from_numpy(open_cache(store).split("train").read_all((L.VIEWS,))[L.VIEWS])
    block = load_split(manifest, "train")
    row = int(np.argmax(block.sizes.prod(-1)))  # the largest image: both renderings shrink it
    image = torch.from_numpy(block.images[row])
    box = boxes[row, :1]
    big = render_inputs([image], box, preprocess=student)
    small = render_inputs([image], box, preprocess=teacher)
    assert big.shape == (1, 3, 24, 24) and small.shape == (1, 3, 16, 16)
    # The same pixels: the student's input, brought to the teacher's size and normalisation,
    # is close to the teacher's (two resamplings of one box differ only by filtering).
    as_teacher = torch.nn.functional.interpolate(big * 0.5 + 0.5, size=(16, 16), mode="bilinear", antialias=True)
    mean, std = torch.tensor(teacher.mean).view(1, 3, 1, 1), torch.tensor(teacher.std).view(1, 3, 1, 1)
    assert float(((as_teacher - (small * std + mean)).abs()).mean()) < 0.03


def test_timm_models_bring_their_own_preprocessing() -> None:
    """Fields the params leave out come from timm's pretrained config (and say so); fields given
    win; a model without one needs image_size, mean and std."""
    timm_model = build_model("test_resnet", num_classes=3, in_chans=3)
    pre, origin = resolve_preprocess({"image_size": 16}, timm_model, in_chans=3, fallback={}, section="teacher.preprocess")
    assert pre == Preprocess(image_size=16, crop_pct=0.95, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)
    assert origin == {"image_size": "params", "crop_pct": "timm pretrained config",
                      "interpolation": "timm pretrained config", "mean": "timm pretrained config",
                      "std": "timm pretrained config"}
    plain = build_model("pipeline.models.cifar_resnet:resnet8", num_classes=3, in_chans=3, model_kwargs={"width": 4})
    from pipeline.data.preprocess import PreprocessError

    with pytest.raises(PreprocessError, match=r"teacher.preprocess.mean' is not given.*set teacher.preprocess.mean"):
        resolve_preprocess({"image_size": 32}, plain, in_chans=3, fallback={"crop_pct": 1.0,
                                                                             "interpolation": "bilinear"},
                           section="teacher.preprocess")
    grey = build_model("test_resnet", num_classes=3, in_chans=1)
    with pytest.raises(PreprocessError, match=r"has 3 values but the model takes 1 channels"):
        resolve_preprocess({"image_size": 16}, grey, in_chans=1, fallback={}, section="teacher.preprocess")


def test_clean_view_matches_timms_own_eval_transform_on_pil_images() -> None:
    """The clean view of a timm model's resolved preprocessing against ``timm.data.create_transform``
    (its eval pipeline, on PIL images), within the PIL tolerance of tests/data/test_views.py."""
    from timm.data import create_transform

    model = build_model("test_resnet", num_classes=3, in_chans=3)
    pre, _ = resolve_preprocess({"image_size": 24}, model, in_chans=3, fallback={}, section="teacher.preprocess")
    transform = create_transform(input_size=(3, 24, 24), is_training=False, interpolation=pre.interpolation,
                                 crop_pct=pre.crop_pct, mean=pre.mean, std=pre.std)
    rng = np.random.default_rng(4)
    std = torch.tensor(pre.std).view(3, 1, 1)
    for h, w in ((40, 53), (200, 150), (31, 31)):
        photo = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
        expected = transform(photo)
        image = torch.from_numpy(np.asarray(photo).transpose(2, 0, 1).copy())
        got = render_inputs([image], pre.clean_views(torch.tensor([[h, w]])), preprocess=pre)[0]
        err = ((got - expected) * std).abs()  # back on [0, 1] pixels
        assert float(err.max()) <= 1.5 / 255 and float(err.mean()) <= 0.5 / 255, (h, w)


def test_a_timm_teachers_cache_records_timms_eval_preprocessing(varsize, tmp_path: Path) -> None:
    """`cifd teacher` with only image_size given: the rest comes from timm's pretrained config of
    the model, the frozen file and then the cache's provenance record it and where it came from."""
    import yaml

    from stages import teacher as teacher_stage

    manifest, _, _ = varsize
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "paths": {"shards": str(manifest.root), "teacher": str(tmp_path / "teacher.safetensors"),
                  "metrics": str(tmp_path / "metrics"), "plots": str(tmp_path / "plots")},
        "teacher": {"model": "test_resnet", "in_chans": 3, "preprocess": {"image_size": 16}, "epochs": 0,
                    "device": "cpu"},
    }))
    torch.manual_seed(0)
    teacher_stage.run(params)
    _, spec = load_model(tmp_path / "teacher.safetensors")
    timm_pre = {"image_size": 16, "crop_pct": 0.95, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}
    assert spec["preprocess"] == timm_pre
    assert spec["preprocess_origin"]["image_size"] == "params"
    assert {spec["preprocess_origin"][k] for k in ("crop_pct", "interpolation", "mean", "std")} == {
        "timm pretrained config"}
    settings = EmbedConfig.from_mapping({"views": 1, "batch_size": 8, "chunk_rows": 4, "scheduler": "synchronous",
                                         "device": "cpu"},
                                        section="embed")
    run_embed(settings=settings, manifest=manifest, teacher_path=tmp_path / "teacher.safetensors",
              store_path=tmp_path / "cache.zarr")
    info = cache_info(tmp_path / "cache.zarr")
    assert info["preprocess"] == timm_pre and info["preprocess_origin"] == spec["preprocess_origin"]


def test_evaluation_reads_each_val_shard_once_for_every_student(varsize) -> None:
    """`cifd evaluate`'s pass: every model's scores on the cache's clean boxes, streamed shard
    by shard, equal a float64 computation over the whole split held in memory."""
    from pipeline.cache.join import cached_chunks
    from pipeline.evaluate import predict, score_models

    manifest, teacher_path, store = varsize
    teacher, spec = load_model(teacher_path)
    small = Preprocess(image_size=12, crop_pct=1.0, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)
    models = {"teacher": (teacher.eval(), Preprocess.from_spec(spec, source="teacher")), "small": (teacher, small)}
    cache = open_cache(store)
    split = cache.split("val")
    assert len(manifest.split("val")["shards"]) > 1  # streamed: more than one chunk
    results, own = score_models(models, cached_chunks(manifest, cache, "val", torch.device("cpu")), batch_size=4)
    cached = split.read_all((L.VIEWS, L.LOGITS))
    clean = torch.from_numpy(cached[L.VIEWS][:, 0])
    t = cached[L.LOGITS][:, 0].astype(np.float64)
    block = load_split(manifest, "val")
    images = [torch.from_numpy(im) for im in block.images]
    assert own.top1 == pytest.approx(float(np.mean(t.argmax(1) == block.labels)))
    for name, (model, pre) in models.items():
        s = predict(model, images, preprocess=pre, batch_size=64, views=clean).double().numpy()
        log_s = s - s.max(1, keepdims=True) - np.log(np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True))
        log_t = t - t.max(1, keepdims=True) - np.log(np.exp(t - t.max(1, keepdims=True)).sum(1, keepdims=True))
        kl = float(np.mean((np.exp(log_t) * (log_t - log_s)).sum(1)))
        assert results[name].top1 == pytest.approx(float(np.mean(s.argmax(1) == block.labels)))
        assert results[name].agreement == pytest.approx(float(np.mean(s.argmax(1) == t.argmax(1))))
        assert results[name].kl == pytest.approx(kl, rel=1e-4, abs=1e-6)



# The stated tolerance against timm's eval transform (PIL) on real photos, [0, 1] pixels:
# PIL resizes in two 8-bit passes, rounding and clipping between them, which bicubic's
# overshoot at sharp edges feels most (measured on 300 CIFAR photos: bilinear max 1.0/255;
# bicubic median 1.0, 99th percentile 4.1, max 4.9/255; mean 0.3/255 both).
PHOTO_MAX_ERR = {"bilinear": 1.01 / 255, "bicubic": 5.0 / 255}
PHOTO_MEAN_ERR = 0.5 / 255


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_clean_view_matches_timms_eval_transform_on_real_photos(interpolation: str) -> None:
    from timm.data import create_transform

    size = 24
    pre = Preprocess(image_size=size, crop_pct=0.875, interpolation=interpolation, mean=(0.0,) * 3, std=(1.0,) * 3)
    transform = create_transform(input_size=(3, size, size), is_training=False, interpolation=interpolation,
                                 crop_pct=0.875, mean=pre.mean, std=pre.std)
    worst, means = 0.0, []
    with tarfile.open(SHARED_TEST) as tar:
        members = [m for m in tar.getmembers() if m.isfile()][:100]
        for member in members:
            handle = tar.extractfile(member)
            assert handle is not None
            photo = Image.open(io.BytesIO(handle.read())).convert("RGB")
            image = torch.from_numpy(np.asarray(photo).transpose(2, 0, 1).copy())
            got = render_inputs([image], pre.clean_views(torch.tensor([[32, 32]])), preprocess=pre)[0]
            err = (got - transform(photo)).abs()
            worst, means = max(worst, float(err.max())), means + [float(err.mean())]
    assert worst <= PHOTO_MAX_ERR[interpolation] and float(np.mean(means)) <= PHOTO_MEAN_ERR, (worst * 255,
                                                                                                np.mean(means) * 255)
