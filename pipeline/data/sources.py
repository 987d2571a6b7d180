"""Data sources for ``prepare``: scikit-learn digits, an ImageFolder (directory or tar),
or existing WebDataset shards. Each yields :class:`RawSample` records in a fixed order.

Image bytes are passed through unchanged (no re-encoding), so shards are byte-stable and
lossless; only digits, which are arrays, are encoded (PNG, deterministic).

A file-backed sample holds where its bytes are (:class:`ImageRef`: a file, or a byte range of
an uncompressed tar), not the bytes: ``prepare`` reads each image when it checks it and again
when it writes it, so its memory is a small record per image, not the dataset's bytes.
"""

from __future__ import annotations

import glob
import io
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

import numpy as np
from PIL import Image

from schemas.layout import IMAGE_EXTS, LABEL_EXT


class SourceError(ValueError):
    """A data source cannot be read as configured."""


class ByteSource(Protocol):
    """Encoded image bytes read on demand."""

    def read(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class ImageRef:
    """Where one image's bytes are: the whole file ``path`` (``size`` < 0) or ``size`` bytes
    at ``offset`` of an uncompressed tar. ``stamp`` (size, mtime in ns) of the file when it
    was listed: a file changed since is refused rather than read half old, half new."""

    path: str
    stamp: tuple[int, int]
    offset: int = 0
    size: int = -1

    @staticmethod
    def stamp_of(path: str | Path) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns

    def read(self) -> bytes:
        try:
            changed = self.stamp_of(self.path) != self.stamp
            if not changed:
                with open(self.path, "rb") as handle:
                    if self.size < 0:
                        return handle.read()
                    handle.seek(self.offset)
                    return handle.read(self.size)
        except OSError as exc:  # deleted or unreadable since it was listed
            raise SourceError(f"'{self.path}' cannot be read any more ({exc.strerror}); rerun prepare once "
                              "the source is complete") from exc
        raise SourceError(f"'{self.path}' changed while `cifd prepare` was reading it; rerun prepare "
                          "once the source is no longer being written")


@dataclass(frozen=True, slots=True)
class RawSample:
    """One source sample: label, its encoded image (bytes, or a :class:`ByteSource` read on
    demand), image extension, and its origin."""

    label: int
    data: bytes | ByteSource
    ext: str
    origin: str

    @property
    def image(self) -> bytes:
        """The encoded image bytes (read from the source each time for a file-backed sample)."""
        return self.data if isinstance(self.data, bytes) else self.data.read()


@dataclass(frozen=True)
class SourceSplit:
    """The samples of one split of a source, and its class names."""

    samples: list[RawSample]
    classes: list[str]


def _ext(name: str) -> str | None:
    suffix = PurePosixPath(name).suffix.lower().lstrip(".")
    return suffix if suffix in IMAGE_EXTS else None


def encode_png(array: np.ndarray) -> bytes:
    """Deterministic PNG bytes of a uint8 (H, W) or (H, W, 3) array."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def digits_source() -> SourceSplit:
    """scikit-learn's 8×8 digits (1,797 images, values 0..16) as grayscale PNGs."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.rint(data.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    samples = [
        RawSample(label=int(y), data=encode_png(img), ext="png", origin=f"digits[{i}]")
        for i, (img, y) in enumerate(zip(images, data.target))
    ]
    return SourceSplit(samples=samples, classes=[str(c) for c in data.target_names])


def _class_of(member: str) -> str:
    parts = PurePosixPath(member).parts
    if len(parts) < 2:
        raise SourceError(
            f"image '{member}' is not inside a class folder; expected <class>/<file> "
            "(ImageFolder layout), optionally under a split folder"
        )
    return parts[-2]


def _resolve_classes(found: Sequence[str], classes: Sequence[str] | None, where: str) -> list[str]:
    names = sorted(set(found))
    if classes is None:
        return names
    missing = sorted(set(names) - set(classes))
    if missing:
        raise SourceError(
            f"{where} has class folders {missing} that are not in prepare.classes {list(classes)}; "
            "add them to prepare.classes or remove the folders"
        )
    return list(classes)


def _check_complete(tar: tarfile.TarFile, path: str | Path) -> None:
    """Refuse a tar that ends without its end-of-archive marker (two zero blocks): Python's
    tarfile reads a tar cut at a member boundary (an interrupted copy or download) as a
    shorter, valid archive. Call after every member was read."""
    assert tar.fileobj is not None
    tar.fileobj.seek(tar.offset)
    tail = tar.fileobj.read(2 * tarfile.BLOCKSIZE)
    if len(tail) < 2 * tarfile.BLOCKSIZE or tail.count(0) != len(tail):
        raise SourceError(f"tar '{path}' ends without its end-of-archive marker after {tar.offset} bytes: it is "
                          "truncated (an interrupted copy or download?); copy it again")


def _seekable(tar: tarfile.TarFile, path: str | Path) -> ImageRef | None:
    """An :class:`ImageRef` of the tar file itself when its members can be read by offset (an
    uncompressed tar), else None (a compressed tar: members are read into memory)."""
    if not isinstance(tar.fileobj, io.BufferedReader):  # gzip/bz2/xz: offsets are in the decompressed stream
        return None
    return ImageRef(str(path), ImageRef.stamp_of(path))


def _member_data(tar: tarfile.TarFile, member: tarfile.TarInfo, ranges: ImageRef | None) -> bytes | ByteSource:
    """A regular member's bytes: where they are in an uncompressed tar, or read now."""
    if ranges is not None:
        return ImageRef(ranges.path, ranges.stamp, offset=member.offset_data, size=member.size)
    handle = tar.extractfile(member)
    assert handle is not None  # isfile() members always have a handle
    return handle.read()


def imagefolder_source(path: str | Path, classes: Sequence[str] | None = None) -> SourceSplit:
    """Images laid out as ``<class>/<file>`` in a directory, or as members of a tar.

    Class index = position in ``classes`` if given, else in the sorted folder names (the
    torchvision ImageFolder convention; for CIFAR-10 this is the standard label order).
    """
    path = Path(path)
    entries: list[tuple[str, str, bytes | ByteSource]] = []  # (member name, ext, bytes or where they are)
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            ext = _ext(file.name)
            if ext is not None:
                entries.append((file.relative_to(path).as_posix(), ext, ImageRef(str(file), ImageRef.stamp_of(file))))
    elif path.is_file() and tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            members = tar.getmembers()  # reads to the end of the archive
            _check_complete(tar, path)
            ranges = _seekable(tar, path)
            for member in sorted(members, key=lambda m: m.name):
                ext = _ext(member.name)
                if member.isfile() and ext is not None:
                    entries.append((member.name, ext, _member_data(tar, member, ranges)))
    else:
        raise SourceError(f"imagefolder source '{path}' is neither a directory nor a tar file")
    if not entries:
        raise SourceError(f"imagefolder source '{path}' holds no images ({', '.join(IMAGE_EXTS)})")
    names = _resolve_classes([_class_of(m) for m, _, _ in entries], classes, str(path))
    index = {name: i for i, name in enumerate(names)}
    samples = [
        RawSample(label=index[_class_of(m)], data=data, ext=ext, origin=f"{path.name}:{m}")
        for m, ext, data in entries
    ]
    samples.sort(key=lambda s: (s.label, s.origin))
    return SourceSplit(samples=samples, classes=names)


def iter_tar_samples(path: str | Path, *, lazy_exts: Sequence[str] = ()) -> Iterator[dict[str, bytes | str | ByteSource]]:
    """Group a WebDataset tar's members by key, in file order (``__key__`` + ext → bytes).
    Members whose ext is in ``lazy_exts`` come as an :class:`ImageRef` to their bytes instead
    (read later), when the tar is uncompressed."""
    current: dict[str, bytes | str | ByteSource] = {}
    with tarfile.open(path) as tar:
        ranges = _seekable(tar, path) if lazy_exts else None
        for member in tar:
            if not member.isfile():
                continue
            name = PurePosixPath(member.name)
            key, _, ext = name.name.partition(".")
            key = str(name.parent / key) if str(name.parent) != "." else key
            if current and current["__key__"] != key:
                yield current
                current = {}
            current["__key__"] = key
            current[ext.lower()] = _member_data(tar, member, ranges if ext.lower() in lazy_exts else None)
        _check_complete(tar, path)
    if current:
        yield current


def webdataset_source(pattern: str, classes: Sequence[str] | None = None) -> SourceSplit:
    """Existing WebDataset shards (a tar, a directory of tars, or a glob), re-keyed.

    Every sample must have a ``cls`` integer label and one image; labels must be in range
    of ``classes`` when given.
    """
    path = Path(pattern)
    files = sorted(str(p) for p in path.glob("*.tar")) if path.is_dir() else sorted(glob.glob(pattern))
    if not files:
        raise SourceError(f"webdataset source '{pattern}' matches no .tar files")
    samples: list[RawSample] = []
    max_label = -1
    for file in files:
        for sample in iter_tar_samples(file, lazy_exts=IMAGE_EXTS):
            key = sample["__key__"]
            where = f"{Path(file).name}:{key}"
            raw_label = sample.get(LABEL_EXT)
            if not isinstance(raw_label, bytes):
                raise SourceError(f"sample {where} has no '.{LABEL_EXT}' label member")
            try:
                label = int(raw_label.decode().strip())
            except ValueError as exc:
                raise SourceError(f"sample {where} label {raw_label!r} is not an integer") from exc
            image_exts = [e for e in sample if e in IMAGE_EXTS]
            if len(image_exts) != 1:
                raise SourceError(f"sample {where} has image members {image_exts}; expected exactly one")
            ext = image_exts[0]
            image = sample[ext]
            assert not isinstance(image, str)
            if label < 0 or (classes is not None and label >= len(classes)):
                raise SourceError(
                    f"sample {where} label {label} is out of range for {len(classes or [])} classes"
                )
            max_label = max(max_label, label)
            samples.append(RawSample(label=label, data=image, ext=ext, origin=where))
    names = list(classes) if classes is not None else [str(i) for i in range(max_label + 1)]
    return SourceSplit(samples=samples, classes=names)
