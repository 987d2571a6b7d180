"""Shared fixtures: tiny data built on the fly (CPU, seconds).

- ``tiny``: the constants below and the tar helpers (write, read, encode).
- ``make_imagefolder_tar``: writes an ImageFolder tar (``train/<class>/<NNNN>.jpg``) of random
  small images, with optional member overrides (corrupt bytes, odd sizes) for error tests.
- ``imagefolder_tar``: the default one, 3 classes × 12 RGB 12×12 JPEGs (session-scoped).
- ``shards_dir``: that tar prepared into WebDataset shards of 4 samples (train 27 rows in 7
  shards, the last one short; val 9 rows in 3 shards).
- ``teacher_file``: a frozen, randomly initialised CIFAR ResNet-8 (width 4, D = 16, C = 3)
  saved with ``save_model`` and a ``preprocess`` spec, as ``cifd teacher`` writes it.
- ``embed_settings`` / ``embedded_cache``: one complete synchronous ``run_embed`` into a
  session store that tests read (copy it before changing it).

Everything is seeded; nothing is fetched from the network.
"""

from __future__ import annotations

import io
import tarfile
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

NUM_CLASSES = 3
PER_CLASS = 12
IMAGE_SIZE = 12
CLASS_NAMES = ("cat", "dog", "frog")  # sorted, so class index = position
SAMPLES_PER_SHARD = 4
VAL_FRACTION = 0.25
TEACHER_PREPROCESS = {"image_size": IMAGE_SIZE, "crop_pct": 1.0, "interpolation": "bilinear", "mean": [0.5, 0.45, 0.4], "std": [0.25, 0.25, 0.25]}


def encode_image(array: np.ndarray, fmt: str) -> bytes:
    """Deterministic JPEG/PNG bytes of a uint8 (H, W, 3) array."""
    buffer = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    else:
        Image.fromarray(array).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def write_tar(path: Path, members: Mapping[str, bytes]) -> Path:
    """A tar with the given members in order, with fixed metadata (mtime 0)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return path


def read_tar(path: Path) -> dict[str, bytes]:
    """Member name → bytes of every file in a tar, in file order."""
    out = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile():
                handle = tar.extractfile(member)
                assert handle is not None
                out[member.name] = handle.read()
    return out


def imagefolder_members(
    *, classes: int = NUM_CLASSES, per_class: int = PER_CLASS, size: int = IMAGE_SIZE,
    fmt: str = "jpg", seed: int = 0,
) -> dict[str, bytes]:
    """``train/<class>/<NNNN>.<fmt>`` → encoded random RGB image, class-dependent brightness."""
    rng = np.random.default_rng(seed)
    members = {}
    for c in range(classes):
        for i in range(per_class):
            base = rng.integers(0, 256, size=(size, size, 3))
            array = ((base + 60 * c) % 256).astype(np.uint8)
            members[f"train/{CLASS_NAMES[c]}/{i:04d}.{fmt}"] = encode_image(array, fmt)
    return members


@pytest.fixture(scope="session")
def tiny() -> types.SimpleNamespace:
    """The constants of the tiny data set and the tar helpers, for tests to use."""
    return types.SimpleNamespace(
        num_classes=NUM_CLASSES, per_class=PER_CLASS, image_size=IMAGE_SIZE, class_names=CLASS_NAMES,
        samples_per_shard=SAMPLES_PER_SHARD, val_fraction=VAL_FRACTION, preprocess=TEACHER_PREPROCESS,
        encode_image=encode_image, write_tar=write_tar, read_tar=read_tar, members=imagefolder_members,
    )


@pytest.fixture(scope="session")
def make_imagefolder_tar() -> Callable[..., Path]:
    """``make(path, overrides={member: bytes}, **imagefolder_members kwargs) -> path``."""

    def make(path: Path, overrides: Mapping[str, bytes] | None = None, **kwargs) -> Path:
        members = imagefolder_members(**kwargs)
        for name, data in (overrides or {}).items():
            assert name in members, f"override {name} is not a member"
            members[name] = data
        return write_tar(path, members)

    return make


@pytest.fixture(scope="session")
def imagefolder_tar(tmp_path_factory: pytest.TempPathFactory, make_imagefolder_tar) -> Path:
    return make_imagefolder_tar(tmp_path_factory.mktemp("source") / "images.tar")


@pytest.fixture(scope="session")
def prepare_config(imagefolder_tar: Path):
    from schemas.config import PrepareConfig

    return PrepareConfig(source="imagefolder", train=str(imagefolder_tar), val_fraction=VAL_FRACTION,
                         samples_per_shard=SAMPLES_PER_SHARD, seed=0)


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory: pytest.TempPathFactory, prepare_config) -> Path:
    from pipeline.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("shards")
    prepare_dataset(prepare_config, out)
    return out


@pytest.fixture(scope="session")
def manifest(shards_dir: Path):
    from pipeline.data.shards import load_manifest

    return load_manifest(shards_dir)


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny frozen teacher with the spec ``stages/teacher.py`` writes (random weights)."""
    from pipeline.models import build_model, save_model

    name, kwargs = "pipeline.models.cifar_resnet:resnet8", {"width": 4}
    torch.manual_seed(0)
    model = build_model(name, num_classes=NUM_CLASSES, in_chans=3, model_kwargs=kwargs)
    with torch.no_grad():  # non-trivial BN statistics, so eval-mode outputs vary per image
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.bias.uniform_(-0.2, 0.2)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_model(path, model.eval(), spec={
        "name": name, "num_classes": NUM_CLASSES, "in_chans": 3, "model_kwargs": kwargs,
        "preprocess": dict(TEACHER_PREPROCESS), "classes": list(CLASS_NAMES),
    })
    return path


@pytest.fixture(scope="session")
def embed_settings():
    """Synchronous, 3 views (rrc with flips), 2-row chunks inside 4-row shards."""
    from schemas.config import EmbedConfig

    return EmbedConfig.from_mapping({
        "views": 3, "policy": {"kind": "rrc", "scale": [0.3, 1.0]}, "batch_size": 8,
        "chunk_rows": 2, "scheduler": "synchronous", "workers": 1, "threads_per_worker": 1,
        "device": "cpu", "seed": 0,
    }, section="embed")


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory: pytest.TempPathFactory, embed_settings, manifest, teacher_file):
    """``(store path, EmbedReport)`` of one complete run; read-only for tests."""
    from pipeline.cache.embed import run_embed

    before = torch.get_num_threads()
    path = tmp_path_factory.mktemp("cache") / "teacher.zarr"
    try:
        report = run_embed(settings=embed_settings, manifest=manifest, teacher_path=teacher_file,
                           store_path=path)
    finally:
        torch.set_num_threads(before)
    return path, report


@pytest.fixture(scope="session")
def mixed_caches(tmp_path_factory: pytest.TempPathFactory, embed_settings, manifest, teacher_file):
    """``get(cutmix) -> store path``: a cache of 4 views whose last 2 are mixed (α = 0.5), the
    last ``cutmix`` of those CutMix views; each made once per session, read-only for tests."""
    import dataclasses

    from pipeline.cache.embed import run_embed
    from schemas.config import MixupConfig

    made: dict[int, Path] = {}

    def get(cutmix: int = 0) -> Path:
        if cutmix not in made:
            settings = dataclasses.replace(embed_settings, views=4,
                                           mixup=MixupConfig(views=2, alpha=0.5, cutmix=cutmix))
            path = tmp_path_factory.mktemp(f"mixed{cutmix}") / "teacher.zarr"
            before = torch.get_num_threads()
            try:
                run_embed(settings=settings, manifest=manifest, teacher_path=teacher_file, store_path=path)
            finally:
                torch.set_num_threads(before)
            made[cutmix] = path
        return made[cutmix]

    return get


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threading costs more than it saves on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
