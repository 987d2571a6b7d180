"""``prepare``: a source becomes byte-stable WebDataset shards plus a manifest."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.shards import channels_of, write_manifest, write_split
from pipeline.data.validate import validate_samples
from pipeline.runtime import derived_seed
from pipeline.data.sources import (
    RawSample,
    SourceSplit,
    digits_source,
    imagefolder_source,
    webdataset_source,
)
from schemas.config import PrepareConfig
from schemas.layout import SPLITS


@dataclass(frozen=True)
class PrepareReport:
    manifest_sha256: str
    num_samples: dict[str, int]
    num_skipped: dict[str, int]
    num_classes: int
    num_reencoded: dict[str, int]
    same_size: bool  # every image of every split has one size


def _load(cfg: PrepareConfig, path: str) -> SourceSplit:
    if cfg.source == "imagefolder":
        return imagefolder_source(path, cfg.classes)
    return webdataset_source(path, cfg.classes)


def stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of the validation rows: ``fraction`` of every class, seeded."""
    mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        take = int(round(fraction * len(rows)))
        mask[rng.permutation(rows)[:take]] = True
    return mask


def _subset(samples: list[RawSample], limit: int | None, rng: np.random.Generator) -> list[RawSample]:
    if limit is None or limit >= len(samples):
        return samples
    # Exactly ``limit`` rows, stratified: per-class quotas by largest remainder (rounding each
    # class on its own could give more or fewer rows than the limit, even none).
    labels = np.asarray([s.label for s in samples])
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (limit / len(samples))
    take = np.floor(quota).astype(np.int64)
    take[np.argsort(take - quota, kind="stable")[: limit - int(take.sum())]] += 1
    keep = np.zeros(len(labels), dtype=bool)
    for label, count in zip(classes, take):
        keep[rng.permutation(np.flatnonzero(labels == label))[:count]] = True
    return [s for s, k in zip(samples, keep) if k]


def split_source(cfg: PrepareConfig) -> tuple[dict[str, list[RawSample]], list[str]]:
    """Resolve the configured source into train/val sample lists and class names."""
    rng = np.random.default_rng(cfg.seed)
    if cfg.source == "digits":
        train = digits_source()
        val = None
    else:
        assert cfg.train is not None  # checked by PrepareConfig.check
        train = _load(cfg, cfg.train)
        val = _load(cfg, cfg.val) if cfg.val is not None else None
    classes = list(cfg.classes) if cfg.classes is not None else train.classes
    if val is None:
        labels = np.asarray([s.label for s in train.samples])
        is_val = stratified_split(labels, cfg.val_fraction, rng)
        splits = {
            "train": [s for s, v in zip(train.samples, is_val) if not v],
            "val": [s for s, v in zip(train.samples, is_val) if v],
        }
    else:
        if val.classes != classes and cfg.source == "imagefolder":
            raise ValueError(
                f"validation source classes {val.classes} differ from train classes {classes}; "
                "set prepare.classes to fix the order"
            )
        splits = {"train": train.samples, "val": val.samples}
    splits["train"] = _subset(splits["train"], cfg.limit_train, rng)
    splits["val"] = _subset(splits["val"], cfg.limit_val, rng)
    return splits, classes


SHUFFLE_RULE = "numpy.random.default_rng(derived_seed(seed, split_index)).permutation(rows)"


def shuffled(samples: list[RawSample], *, seed: int, split: str) -> list[RawSample]:
    """``samples`` in a seeded random order (:data:`SHUFFLE_RULE`), independent of the other
    draws of ``prepare`` (the val split and the subsets keep their rows)."""
    order = np.random.default_rng(derived_seed(seed, SPLITS.index(split))).permutation(len(samples))
    return [samples[i] for i in order]


def _swap_in(built: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by the finished ``built`` directory: the old shards are moved aside
    and removed only after the new ones are in place."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        os.rmdir(old)
        os.rename(out_dir, old)
    os.rename(built, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare_dataset(cfg: PrepareConfig, out_dir: Path) -> PrepareReport:
    """Validate every image, write the shards of each split and the manifest.

    Everything is built in a temporary directory beside ``out_dir`` and swapped in only when
    complete: a failed or killed run leaves the previous shards and manifest as they were.
    """
    splits, classes = split_source(cfg)
    if cfg.shuffle:
        splits = {split: shuffled(rows, seed=cfg.seed, split=split) for split, rows in splits.items()}
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.build-"))
    os.chmod(build, 0o755)  # mkdtemp makes it private; the shards are not
    try:
        report = _write_all(cfg, splits, classes, build)
        _swap_in(build, out_dir)
    finally:
        shutil.rmtree(build, ignore_errors=True)  # gone already after a successful swap
    return report


def _write_all(cfg: PrepareConfig, splits: dict[str, list[RawSample]], classes: list[str],
               out_dir: Path) -> PrepareReport:
    entries, skipped, shapes = {}, {}, set()
    mode = cfg.colour_mode()
    for split in SPLITS:
        checked = validate_samples(splits[split], on_corrupt=cfg.on_corrupt, mode=mode, max_side=cfg.max_side,
                                   max_corrupt_fraction=cfg.max_corrupt_fraction, split=split)
        shapes |= set(checked.sizes)
        entries[split] = write_split(out_dir, split, checked.samples, samples_per_shard=cfg.samples_per_shard,
                                     sizes=checked.sizes)
        entries[split]["skipped"] = checked.skipped
        entries[split]["reencoded"] = checked.reencoded
        skipped[split] = len(checked.skipped)
    (height, width), = shapes if len(shapes) == 1 else ((None, None),)
    sha = write_manifest(out_dir, {
        "source": cfg.to_dict(),
        "row_order": {"shuffled": cfg.shuffle, "seed": cfg.seed,
                      "rule": SHUFFLE_RULE if cfg.shuffle else "source order"},
        "classes": classes,
        "mode": mode,
        "image_shape": [channels_of(mode), height, width] if height is not None else None,
        "samples_per_shard": cfg.samples_per_shard,
        "splits": entries,
    })
    return PrepareReport(
        manifest_sha256=sha,
        num_samples={k: v["num_samples"] for k, v in entries.items()},
        num_skipped=skipped,
        num_classes=len(classes),
        num_reencoded={k: len(v["reencoded"]) for k, v in entries.items()},
        same_size=height is not None,
    )
