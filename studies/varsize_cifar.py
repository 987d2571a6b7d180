"""Build a variable-size ImageFolder tar from the real CIFAR-10 photos, to test the pipeline on
images of many sizes.

Each 32x32 JPEG of ``../shared/data/cifar10-jpeg/{train,test}.tar`` is upscaled (bicubic) to a
seeded random size: shorter side uniform in [40, 400], aspect width/height = exp(U(log 3/4,
log 4/3)), and re-encoded as JPEG quality 90. Members keep their names
(``train/<class>/<NNNN>.jpg``); a limit (a multiple of the class count, 10) takes the first
limit/10 files of each class in sorted order. Sizes are drawn for every source member in sorted
order (one generator per split, seeded by ``(seed, split index)``), so an image's size depends
on neither limit. The tars are byte-stable for a given Pillow version; ``sizes.json``
summarises them and records the source sha256s.

    uv run python studies/varsize_cifar.py --out data/varsize

Measured on the 2-core CPU machine with the defaults (10,000 train + 10,000 test, seed 0,
Pillow 13.0.0): 22 s wall (single process, ~80 MB RSS); train.tar 87,173,120 bytes, test.tar
87,121,920 bytes; shorter side min/median/max 40/221/400 in both splits.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg"
SPLITS = ("train", "test")
SHORT_MIN, SHORT_MAX = 40, 400
LOG_ASPECT = (math.log(3 / 4), math.log(4 / 3))
PROGRESS_EVERY = 2000


def fail(message: str) -> NoReturn:
    print(f"varsize_cifar: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def select(members: list[tarfile.TarInfo], limit: int, flag: str) -> tuple[list[int], int]:
    """Indices (into the sorted members) of the first limit/#classes files of each class."""
    by_class: dict[str, list[int]] = {}
    for i, m in enumerate(members):
        by_class.setdefault(m.name.split("/")[-2], []).append(i)
    k = len(by_class)
    if limit <= 0 or limit % k:
        fail(f"{flag} {limit} must be a positive multiple of the {k} classes")
    per_class = limit // k
    if per_class > min(len(v) for v in by_class.values()):
        fail(f"{flag} {limit} exceeds the images available ({len(members)}, "
             f"{min(len(v) for v in by_class.values())} in the smallest of {k} classes)")
    return sorted(i for v in by_class.values() for i in v[:per_class]), per_class


def resize_jpeg(data: bytes, short: int, aspect: float) -> tuple[bytes, int, int]:
    width, height = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
    with Image.open(io.BytesIO(data)) as im:
        out = im.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=90, optimize=False)
    return buf.getvalue(), width, height


def plan(tar: tarfile.TarFile, limit: int, flag: str) -> tuple[list[tarfile.TarInfo], list[int], int]:
    members = sorted((m for m in tar.getmembers() if m.isfile() and "/" in m.name
                      and m.name.lower().endswith(".jpg")), key=lambda m: m.name)
    if not members:
        fail(f"{tar.name} holds no <class>/<name>.jpg members")
    return (members, *select(members, limit, flag))


def build_split(tar: tarfile.TarFile, members: list[tarfile.TarInfo], chosen: list[int], dst: Path,
                seed: int, split: int) -> dict[str, int | float]:
    rng = np.random.default_rng([seed, split])
    shorts = rng.integers(SHORT_MIN, SHORT_MAX + 1, size=len(members))
    aspects = np.exp(rng.uniform(*LOG_ASPECT, size=len(members)))
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    sides: list[int] = []
    ratios: list[float] = []
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as out:
            for n, i in enumerate(chosen, 1):
                handle = tar.extractfile(members[i])
                assert handle is not None
                data, w, h = resize_jpeg(handle.read(), int(shorts[i]), float(aspects[i]))
                info = tarfile.TarInfo(members[i].name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                out.addfile(info, io.BytesIO(data))
                sides.append(min(w, h))
                ratios.append(w / h)
                if n % PROGRESS_EVERY == 0:
                    print(f"{dst.stem}: {n}/{len(chosen)}", file=sys.stderr, flush=True)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"count": len(chosen), "bytes": dst.stat().st_size, "short_min": min(sides),
            "short_median": float(np.median(sides)), "short_max": max(sides),
            "aspect_min": round(min(ratios), 4), "aspect_max": round(max(ratios), 4)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src-train", type=Path, default=SHARED / "train.tar")
    parser.add_argument("--src-test", type=Path, default=SHARED / "test.tar")
    parser.add_argument("--out", type=Path, default=Path("data/varsize"))
    parser.add_argument("--limit-train", type=int, default=10000)
    parser.add_argument("--limit-test", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sources = {"train": args.src_train, "test": args.src_test}
    limits = {"train": args.limit_train, "test": args.limit_test}
    for src in sources.values():
        if not src.is_file():
            fail(f"source tar not found: {src} (../shared must sit beside the repository)")
        if not tarfile.is_tarfile(src):
            fail(f"source is not a tar file: {src}")
    summary: dict[str, Any] = {"seed": args.seed, "pillow": Image.__version__}
    with contextlib.ExitStack() as stack:
        tars = {split: stack.enter_context(tarfile.open(sources[split])) for split in SPLITS}
        plans = {split: plan(tars[split], limits[split], f"--limit-{split}") for split in SPLITS}
        args.out.mkdir(parents=True, exist_ok=True)
        for index, split in enumerate(SPLITS):
            members, chosen, per_class = plans[split]
            stats = build_split(tars[split], members, chosen, args.out / f"{split}.tar", args.seed, index)
            summary[split] = {**stats, "limit": limits[split], "per_class": per_class,
                              "source": sources[split].name, "source_sha256": sha256(sources[split])}
    tmp = args.out / ".sizes.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, args.out / "sizes.json")
    for split in SPLITS:
        s = summary[split]
        print(f"{split}: {s['count']} images, {s['bytes']} bytes, shorter side min/median/max "
              f"{s['short_min']}/{s['short_median']:g}/{s['short_max']}")


if __name__ == "__main__":
    main()
