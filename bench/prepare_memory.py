"""Does ``prepare`` hold the dataset's bytes? Peak memory of ``cifd prepare`` on one set of
photo-sized JPEGs stored two ways, in the same run:

- an uncompressed ImageFolder tar: the source lists where each image is (offset, size) and
  reads it when it checks it and when it writes it (what ``prepare`` does now);
- the same tar gzip-compressed: a gzip stream has no offsets, so its members are read into
  memory first (what ``prepare`` did for every source before, the obvious alternative).

The images are seeded noise-textured JPEGs (``--side`` pixels square, quality 90, about
0.1 MB each at 320 px), ``--images`` of them in 10 class folders; the val split is carved
(20 %). Peak RSS of the stage's process is sampled from /proc every 0.1 s (``scale.run_stage``).

    uv run python bench/prepare_memory.py                 # 3,000 images: bench/results/prepare_memory.json
    uv run python bench/prepare_memory.py --smoke         # 200 images
"""

from __future__ import annotations

import argparse
import gzip
import io
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import RESULTS, machine_info, write_result  # noqa: E402
from scale import run_stage  # noqa: E402


def write_source(path: Path, *, images: int, side: int, seed: int = 0) -> int:
    """An ImageFolder tar of ``images`` JPEGs (``<class>/<i>.jpg``, 10 classes); its size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        for i in range(images):
            base = rng.integers(0, 256, size=(side // 8, side // 8, 3)).astype(np.uint8)
            pixels = np.clip(base.repeat(8, 0).repeat(8, 1) + rng.normal(0, 20, (side, side, 3)), 0, 255)
            buffer = io.BytesIO()
            Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
            info = tarfile.TarInfo(f"c{i % 10}/{i:07d}.jpg")
            info.size, info.mtime = buffer.tell(), 0
            buffer.seek(0)
            tar.addfile(info, buffer)
    return path.stat().st_size


def main() -> None:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--side", type=int, default=320)
    parser.add_argument("--out", type=Path, default=RESULTS / "prepare_memory.json")
    parser.add_argument("--smoke", action="store_true", help="200 images, nothing written to bench/results")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.out = 200, Path(tempfile.gettempdir()) / "prepare_memory_smoke.json"
    cifd = [str(Path(sys.executable).parent / "cifd")]
    result: dict = {"benchmark": "prepare_memory", "machine": machine_info(threads=1),
                    "params": {"images": args.images, "side": args.side, "val_fraction": 0.2}, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="cifd-prepare-memory-") as tmp:
        work = Path(tmp)
        result["source_bytes"] = write_source(work / "src.tar", images=args.images, side=args.side)
        with open(work / "src.tar", "rb") as src, gzip.open(work / "src.tar.gz", "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst)
        for name, source in (("by_offset", "src.tar"), ("in_memory", "src.tar.gz")):
            params = {"paths": {"shards": str(work / f"shards-{name}"), "metrics": str(work / f"metrics-{name}")},
                      "prepare": {"source": "imagefolder", "train": str(work / source), "val_fraction": 0.2,
                                  "samples_per_shard": 500}}
            (work / f"{name}.yaml").write_text(yaml.safe_dump(params))
            began = time.perf_counter()
            run = run_stage([*cifd, "prepare", "--params", str(work / f"{name}.yaml")], cwd=work,
                            log=work / f"{name}.log")
            run["wall_s"] = round(time.perf_counter() - began, 2)
            result["runs"][name] = run
            print(f"{name}: {run}", flush=True)
        same = all((work / "shards-by_offset" / f.name).read_bytes() == f.read_bytes()
                   for f in sorted((work / "shards-in_memory").glob("*.tar")))
    by, mem = result["runs"]["by_offset"], result["runs"]["in_memory"]
    result["claims"] = {
        "same_shards": same,
        "peak_rss_mib_in_memory_minus_by_offset": round(mem["peak_rss_mib"] - by["peak_rss_mib"], 1),
        "source_mib": round(result["source_bytes"] / 2**20, 1),
        "peak_rss_ratio_in_memory_over_by_offset": round(mem["peak_rss_mib"] / by["peak_rss_mib"], 3),
    }
    print(result["claims"])
    write_result(args.out, result)


if __name__ == "__main__":
    main()
