"""``studies/varsize_cifar.py``: CIFAR-layout JPEG tars → variable-size ImageFolder tars.

Runs the script's ``main`` on tiny fake sources (2 classes × 3 random 32×32 JPEGs per split) and
checks sizes, byte-stability, layout and the refusal of bad input (exit 2, one line).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[2] / "studies" / "varsize_cifar.py"
CLASSES = ("cat", "dog")
PER_CLASS = 3


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("varsize_cifar", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_source(path: Path, split: str, seed: int) -> list[str]:
    """A CIFAR-layout tar ``<split>/<class>/<NNNN>.jpg``; returns its member names."""
    rng = np.random.default_rng(seed)
    names = [f"{split}/{c}/{i:04d}.jpg" for c in CLASSES for i in range(PER_CLASS)]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in names:
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
            info = tarfile.TarInfo(name)
            info.size = buf.tell()
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    return names


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    paths = {split: tmp_path / f"src_{split}.tar" for split in ("train", "test")}
    for i, (split, path) in enumerate(paths.items()):
        fake_source(path, split, seed=i)
    return paths


def argv(sources: dict[str, Path], out: Path, limit_train: int = 4, limit_test: int = 6) -> list[str]:
    return ["--src-train", str(sources["train"]), "--src-test", str(sources["test"]), "--out", str(out),
            "--limit-train", str(limit_train), "--limit-test", str(limit_test), "--seed", "3"]


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        out = {}
        for m in tar.getmembers():
            handle = tar.extractfile(m)
            assert handle is not None
            out[m.name] = handle.read()
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sizes_layout_and_summary(sources: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    load_script().main(argv(sources, out))
    limits = {"train": 4, "test": 6}
    summary = json.loads((out / "sizes.json").read_text())
    for split, limit in limits.items():
        members = read_tar(out / f"{split}.tar")
        per_class = limit // len(CLASSES)
        expected = [f"{split}/{c}/{i:04d}.jpg" for c in CLASSES for i in range(per_class)]
        assert list(members) == expected  # sorted, class folders and names kept, first per class
        sides = []
        for data in members.values():
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                assert im.format == "JPEG" and im.mode == "RGB"
                w, h = im.size
            assert 40 <= min(w, h) <= 400
            assert 3 / 4 - 1 / min(w, h) <= w / h <= 4 / 3 + 1 / min(w, h)  # up to rounding
            sides.append(min(w, h))
        s = summary[split]
        assert (s["count"], s["limit"], s["per_class"]) == (limit, limit, per_class)
        assert (s["short_min"], s["short_max"]) == (min(sides), max(sides))
        assert s["bytes"] == (out / f"{split}.tar").stat().st_size
        assert s["source_sha256"] == sha256(sources[split])
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_byte_identical_and_independent_of_other_limit(sources: dict[str, Path], tmp_path: Path) -> None:
    main = load_script().main
    main(argv(sources, tmp_path / "a"))
    main(argv(sources, tmp_path / "b"))
    main(argv(sources, tmp_path / "c", limit_train=6, limit_test=6))
    for name in ("train.tar", "test.tar", "sizes.json"):
        assert sha256(tmp_path / "a" / name) == sha256(tmp_path / "b" / name)
    assert sha256(tmp_path / "a" / "test.tar") == sha256(tmp_path / "c" / "test.tar")
    # a larger limit keeps the images a smaller one chose, byte for byte
    small, large = read_tar(tmp_path / "a" / "train.tar"), read_tar(tmp_path / "c" / "train.tar")
    assert all(large[name] == data for name, data in small.items())
    with tarfile.open(tmp_path / "a" / "train.tar") as tar:
        assert all((m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
                   for m in tar.getmembers())


@pytest.mark.parametrize(("change", "needle"), [
    ({"limit_train": 3}, "multiple of the 2 classes"),
    ({"limit_test": 0}, "multiple of the 2 classes"),
    ({"limit_test": 8}, "exceeds the images available"),
    ({"missing": True}, "../shared must sit beside the repository"),
])
def test_bad_input_exits_2_with_one_line(sources: dict[str, Path], tmp_path: Path,
                                         change: dict[str, int], needle: str) -> None:
    limits = {k: v for k, v in change.items() if k != "missing"}
    if change.get("missing"):
        sources = {**sources, "train": tmp_path / "absent.tar"}
    result = subprocess.run([sys.executable, str(SCRIPT), *argv(sources, tmp_path / "out", **limits)],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "train.tar").exists()
