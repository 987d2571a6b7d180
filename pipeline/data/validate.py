"""``prepare``'s check of every source image: decoded once (corrupt ones fail or are skipped
and counted), sized, and shrunk when over ``prepare.max_side`` (re-encoded, recorded).
Nothing here holds an image's bytes beyond the one being checked."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from pipeline.data.shards import CorruptSampleError, decode_image, eight_bit
from pipeline.data.sources import ByteSource, RawSample

__all__ = ["Shrunk", "ValidatedSplit", "validate_samples"]


def _reencode(data: bytes, ext: str, *, max_side: int, mode: str, where: str) -> tuple[bytes, tuple[int, int]]:
    """The image, decoded to ``mode`` as every reader decodes it, shrunk so that its longer
    side is ``max_side`` (bicubic, antialiased), re-encoded in its format (JPEG quality 95,
    lossless otherwise); its new (height, width)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = eight_bit(img).convert(mode)  # palette / bilevel images would otherwise shrink NEAREST
            width, height = img.size
            scale = max_side / max(width, height)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = img.resize(size, Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            if ext in ("jpg", "jpeg"):
                small.save(buffer, format="JPEG", quality=95)
            elif ext == "webp":
                small.save(buffer, format="WEBP", lossless=True)
            else:
                small.save(buffer, format="PNG" if ext == "png" else "BMP")
    except (OSError, ValueError) as exc:
        raise CorruptSampleError(f"{where}: cannot shrink and re-encode the image for prepare.max_side ({exc})") from exc
    return buffer.getvalue(), (size[1], size[0])


@dataclass(frozen=True)
class Shrunk:
    """An image over ``prepare.max_side``, re-encoded at its new size each time it is read
    (deterministic: the same bytes every time), so the shrunk bytes are never held."""

    source: bytes | ByteSource
    ext: str
    max_side: int
    mode: str
    where: str

    def read(self) -> bytes:
        data = self.source if isinstance(self.source, bytes) else self.source.read()
        return _reencode(data, self.ext, max_side=self.max_side, mode=self.mode, where=self.where)[0]


@dataclass(frozen=True)
class ValidatedSplit:
    samples: list[RawSample]
    skipped: list[dict[str, str]]
    sizes: list[tuple[int, int]]  # (height, width) of every kept sample, in row order
    reencoded: list[dict[str, Any]]  # the rows re-encoded because they were over max_side


def validate_samples(
    samples: Sequence[RawSample], *, on_corrupt: str, max_corrupt_fraction: float, split: str, mode: str,
    max_side: int | None = None,
) -> ValidatedSplit:
    """Decode every image once: corrupt images fail (naming the sample) or are skipped and
    counted; more skips than ``max_corrupt_fraction`` fail. Images keep their own size; one
    whose longer side is over ``max_side`` is shrunk to it and re-encoded (recorded)."""
    kept: list[RawSample] = []
    skipped: list[dict[str, str]] = []
    sizes: list[tuple[int, int]] = []
    reencoded: list[dict[str, Any]] = []
    for sample in samples:
        where = f"{split} sample {sample.origin}"
        image = sample.image  # read once here (a file-backed sample is read again when written)
        try:
            array = decode_image(image, mode=mode, where=where)
        except CorruptSampleError as exc:
            if on_corrupt == "error":
                raise CorruptSampleError(
                    f"{exc}. Fix or remove the file, or set prepare.on_corrupt: skip to skip and "
                    "count corrupt images"
                ) from exc
            skipped.append({"origin": sample.origin, "error": str(exc)})
            continue
        size = (int(array.shape[1]), int(array.shape[2]))
        if max_side is not None and max(size) > max_side:
            try:
                new = _reencode(image, sample.ext, max_side=max_side, mode=mode, where=where)[1]
            except CorruptSampleError as exc:
                if on_corrupt == "error":
                    raise CorruptSampleError(f"{exc}. Fix or remove the file, or set prepare.on_corrupt: skip") from exc
                skipped.append({"origin": sample.origin, "error": str(exc)})
                continue
            reencoded.append({"row": len(kept), "origin": sample.origin, "from": list(size), "to": list(new)})
            # Re-encoded again when written (deterministic), so its bytes are not held meanwhile.
            shrunk = Shrunk(sample.data, ext=sample.ext, max_side=max_side, mode=mode, where=where)
            sample, size = RawSample(label=sample.label, data=shrunk, ext=sample.ext, origin=sample.origin), new
        kept.append(sample)
        sizes.append(size)
    total = len(samples)
    if total and len(skipped) / total > max_corrupt_fraction:
        raise CorruptSampleError(
            f"{split}: {len(skipped)} of {total} images are corrupt, more than "
            f"prepare.max_corrupt_fraction = {max_corrupt_fraction}; first: {skipped[0]['error']}"
        )
    if not kept:
        raise CorruptSampleError(f"{split}: no readable images")
    return ValidatedSplit(samples=kept, skipped=skipped, sizes=sizes, reencoded=reencoded)
