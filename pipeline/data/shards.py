"""WebDataset shards and their manifest: writing (``prepare``) and block reading.

Each split is stored as ``{split}-{index:06d}.tar`` holding ``samples_per_shard`` samples
(the last one may hold fewer). A sample has ``__key__`` = zero-padded global row index,
``cls`` = the integer label, and one image member (bytes as in the source: images keep
their own size and format). ``manifest.json`` records, per split, shard → row range and
file sha256, the images re-encoded because they were larger than ``prepare.max_side``, and
two checked per-row arrays beside it (``{split}-sizes.npy`` (N, 2) int32 (height, width),
``{split}-sample_sha256.npy`` (N, 16) uint8 content hashes: not in the JSON, so the manifest
every stage and loader worker parses stays a few kilobytes at any N), the class names and
the colour mode. Its sha256 identifies the dataset (row arrays included) in every cache.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from pipeline.data.sources import RawSample, iter_tar_samples
from schemas.layout import (
    IMAGE_EXTS,
    KEY_DIGITS,
    LABEL_EXT,
    MANIFEST_NAME,
    MANIFEST_SCHEMA_VERSION,
    ROW_ARRAY_PATTERN,
    ROW_HASH_BYTES,
    SHARD_PATTERN,
    sample_key,
)


class CorruptSampleError(ValueError):
    """An image cannot be decoded, or a sample does not match its manifest."""


class ManifestError(ValueError):
    """The shard manifest is missing, malformed, or disagrees with the shards."""


class VariableSizeError(ValueError):
    """Images of different sizes where one batch array of them was asked for."""


@dataclass(frozen=True)
class ShardBlock:
    """The decoded samples of one or more shards, row-aligned."""

    index: np.ndarray  # (n,) int64 global row index
    labels: np.ndarray  # (n,) int64
    images: list[np.ndarray]  # n × (C, H_i, W_i) uint8

    @property
    def sizes(self) -> np.ndarray:
        """(n, 2) int64 (height, width) of every image."""
        return np.asarray([im.shape[1:] for im in self.images], dtype=np.int64).reshape(-1, 2)

    def stacked(self) -> np.ndarray:
        """The images as one (n, C, H, W) array; they must share one size."""
        shapes = {im.shape for im in self.images}
        if len(shapes) > 1:
            raise VariableSizeError(
                f"the images have {len(shapes)} different shapes (e.g. {sorted(shapes)[:2]}), but this path holds "
                "a split as one array of same-size images; set distill.data: stream (images of any size are "
                "cropped and resized per image in the loader)")
        return np.stack(self.images) if self.images else np.zeros((0, 0, 0, 0), np.uint8)


def content_hash(data: bytes) -> str:
    """Per-sample content hash recorded in the manifest (sha256, 128-bit prefix), as hex."""
    return content_digest(data).hex()


def content_digest(data: bytes) -> bytes:
    """Per-sample content hash recorded in the manifest: the first 16 bytes of its sha256."""
    return hashlib.sha256(data).digest()[:ROW_HASH_BYTES]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def decode_image(data: bytes, *, mode: str, where: str) -> np.ndarray:
    """Decode image bytes to uint8 (C, H, W) in colour ``mode`` (``RGB``: 3 channels, alpha
    dropped, palette / CMYK / grey converted; ``L``: 1 grey channel), as PIL converts."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            array = np.array(eight_bit(img).convert(mode), dtype=np.uint8)  # writable: torch.from_numpy takes it
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CorruptSampleError(f"{where}: cannot decode image ({exc})") from exc
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def eight_bit(img: Image.Image) -> Image.Image:
    """16- and 32-bit integer images scaled to 8 bits (PIL's convert would clip them to 255)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.rint(values * (255.0 / top)).clip(0, 255).astype(np.uint8), "L")
    return img


def channels_of(mode: str) -> int:
    """Channels of a decoded image in colour ``mode``."""
    return len(Image.new(mode, (1, 1)).getbands())


def write_split(
    out_dir: Path, split: str, samples: Sequence[RawSample], *, samples_per_shard: int,
    sizes: Sequence[tuple[int, int]],
) -> dict[str, Any]:
    """Write ``samples`` as shards and the split's per-row arrays (sizes, content hashes);
    return the split's manifest entry."""
    shards = []
    hashes: list[bytes] = []
    labels = []
    for shard_index, start in enumerate(range(0, len(samples), samples_per_shard)):
        stop = min(start + samples_per_shard, len(samples))
        name = SHARD_PATTERN.format(split=split, index=shard_index)
        with open(out_dir / name, "wb") as handle:
            writer = wds.TarWriter(handle, mtime=0, user="cifd", group="cifd", encoder=False)
            for row in range(start, stop):
                sample = samples[row]
                image = sample.image  # read (or re-encoded) now: one image in memory at a time
                ext = "jpg" if sample.ext == "jpeg" else sample.ext
                writer.write({"__key__": sample_key(row), LABEL_EXT: str(sample.label).encode(),
                              ext: image})
                hashes.append(content_digest(image))
                labels.append(sample.label)
            writer.close()
        shards.append({"file": name, "start": start, "stop": stop, "sha256": file_sha256(out_dir / name)})
    digests = np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(len(hashes), ROW_HASH_BYTES)
    return {
        "num_samples": len(samples),
        "shards": shards,
        "class_counts": np.bincount(np.asarray(labels, dtype=np.int64)).tolist() if labels else [],
        "rows": {
            "sizes": _write_rows(out_dir, split, "sizes", np.asarray(sizes, dtype=np.int32).reshape(-1, 2)),
            "sample_sha256": _write_rows(out_dir, split, "sample_sha256", digests),
        },
    }


# The per-row arrays of a split: name → (dtype, columns).
ROW_ARRAYS: dict[str, tuple[str, int]] = {"sizes": ("int32", 2), "sample_sha256": ("uint8", ROW_HASH_BYTES)}


def _write_rows(out_dir: Path, split: str, name: str, values: np.ndarray) -> dict[str, str]:
    """One per-row array as ``.npy`` (byte-stable: a fixed header and the raw values)."""
    file = ROW_ARRAY_PATTERN.format(split=split, name=name)
    np.save(out_dir / file, np.ascontiguousarray(values), allow_pickle=False)
    return {"file": file, "sha256": file_sha256(out_dir / file)}


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> str:
    """Write ``manifest.json`` canonically (sorted keys); return its sha256."""
    manifest = {"schema_version": MANIFEST_SCHEMA_VERSION, **manifest}
    text = json.dumps(manifest, sort_keys=True, indent=1) + "\n"
    (out_dir / MANIFEST_NAME).write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """A loaded shard manifest and its sha256 (the dataset's identity)."""

    root: Path
    data: dict[str, Any]
    sha256: str

    @property
    def classes(self) -> list[str]:
        return list(self.data["classes"])

    @property
    def mode(self) -> str:
        """The colour mode every image is decoded to (``RGB`` or ``L``)."""
        return str(self.data["mode"])

    @property
    def channels(self) -> int:
        return channels_of(self.mode)

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) when every image of every split has one size, else None."""
        shape = self.data["image_shape"]
        return tuple(shape) if shape is not None else None  # type: ignore[return-value]

    def sizes(self, split: str) -> np.ndarray:
        """(N, 2) int64 (height, width) of every image of ``split``, in row order."""
        return self.rows(split, "sizes").astype(np.int64)

    def sample_hashes(self, split: str) -> np.ndarray:  # (N, 16) uint8: content_digest of every sample
        return self.rows(split, "sample_sha256")

    def rows(self, split: str, name: str) -> np.ndarray:
        """A per-row array of ``split`` (:data:`ROW_ARRAYS`), checked against the sha256, dtype
        and shape the manifest records (the file never unpickles)."""
        entry = self.split(split)
        record, path = entry["rows"][name], self.root / entry["rows"][name]["file"]
        if not path.is_file():
            raise ManifestError(f"{path} is missing (the per-row '{name}' array of split '{split}'); rerun "
                                "`cifd prepare`, or copy the whole shards directory")
        if file_sha256(path) != record["sha256"]:
            raise ManifestError(f"{path} does not match the sha256 in {MANIFEST_NAME}: the file changed after "
                                "`cifd prepare`; rerun it")
        try:
            values, (dtype, columns) = np.load(path, allow_pickle=False), ROW_ARRAYS[name]
        except ValueError as exc:
            raise ManifestError(f"{path} is not a plain .npy array ({exc}); rerun `cifd prepare`") from exc
        if values.dtype != np.dtype(dtype) or values.shape != (entry["num_samples"], columns):
            raise ManifestError(f"{path} holds {values.dtype} {values.shape}, expected {dtype} "
                                f"({entry['num_samples']}, {columns}); rerun `cifd prepare`")
        return values

    def split(self, name: str) -> dict[str, Any]:
        splits = self.data["splits"]
        if name not in splits:
            raise ManifestError(f"manifest {self.root / MANIFEST_NAME} has no split '{name}'; has {sorted(splits)}")
        return splits[name]

    def shard_paths(self, split: str) -> list[Path]:
        return [self.root / s["file"] for s in self.split(split)["shards"]]


def load_manifest(shards_dir: str | Path) -> Manifest:
    root = Path(shards_dir)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_NAME} in {root}: no image shards there. In the project that made them, "
                            "run `cifd prepare` (dvc repro prepare); with a cache from another team, import "
                            f"their shards too: `dvc import REPO <their paths.shards> -o {root}` (`cifd init "
                            "--from REPO` imports cache, teacher and shards)")
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    version = data.get("schema_version")
    if version != MANIFEST_SCHEMA_VERSION:
        raise ManifestError(
            f"{path} has schema_version {version}, expected {MANIFEST_SCHEMA_VERSION}; rerun `cifd prepare`"
        )
    return Manifest(root=root, data=data, sha256=hashlib.sha256(text.encode()).hexdigest())


def read_shard(
    path: str | Path,
    *,
    mode: str,
    start: int,
    stop: int,
    expected_hashes: np.ndarray | None = None,
) -> ShardBlock:
    """Decode one whole shard (one read per tar). Checks that keys are exactly rows
    ``start..stop-1`` in order and, when given ((stop - start, 16) uint8 rows of
    :meth:`Manifest.sample_hashes`), that image bytes match the manifest hashes."""
    path = Path(path)
    index, labels, images = [], [], []
    for position, sample in enumerate(iter_tar_samples(path)):
        key = str(sample["__key__"])
        where = f"shard {path.name} sample {key}"
        row = start + position
        if len(key) != KEY_DIGITS or not key.isdigit() or int(key) != row:
            raise CorruptSampleError(
                f"{where}: expected key {sample_key(row)} at position {position}; the shard does not "
                "match its manifest row range. Rerun `cifd prepare`"
            )
        exts = [e for e in sample if e in IMAGE_EXTS]
        if len(exts) != 1 or LABEL_EXT not in sample:
            raise CorruptSampleError(f"{where}: expected one image and a '.{LABEL_EXT}' member, got {sorted(sample)}")
        data = sample[exts[0]]
        assert isinstance(data, bytes)
        if expected_hashes is not None and content_digest(data) != expected_hashes[position].tobytes():
            raise CorruptSampleError(
                f"{where}: image bytes do not match the manifest content hash (file changed after "
                "`cifd prepare`). Rerun `cifd prepare` to rebuild the shards"
            )
        images.append(decode_image(data, mode=mode, where=where))
        label = sample[LABEL_EXT]
        assert isinstance(label, bytes)
        labels.append(int(label))
        index.append(row)
    if start + len(index) != stop:
        raise CorruptSampleError(
            f"shard {path.name} holds {len(index)} samples, manifest says rows {start}..{stop - 1} "
            f"({stop - start}); the shard is truncated or altered. Rerun `cifd prepare`"
        )
    return ShardBlock(index=np.asarray(index, dtype=np.int64), labels=np.asarray(labels, dtype=np.int64),
                      images=images)


def load_split(manifest: Manifest, split: str, *, verify_hashes: bool = False) -> ShardBlock:
    """Decode every shard of a split into memory (for CIFAR-sized data), in row order.
    ``.stacked()`` of the result is the (N, C, H, W) array of a same-size set."""
    entry = manifest.split(split)
    hashes = manifest.sample_hashes(split) if verify_hashes else None
    blocks = [
        read_shard(manifest.root / s["file"], mode=manifest.mode, start=s["start"], stop=s["stop"],
                   expected_hashes=hashes[s["start"]:s["stop"]] if hashes is not None else None)
        for s in entry["shards"]
    ]
    return ShardBlock(
        index=np.concatenate([b.index for b in blocks]),
        labels=np.concatenate([b.labels for b in blocks]),
        images=[image for b in blocks for image in b.images],
    )
