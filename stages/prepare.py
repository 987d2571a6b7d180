"""``cifd prepare``: the configured source → WebDataset shards + manifest."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.prepare import prepare_dataset
from schemas import metrics as M
from schemas.config import PrepareConfig, load_stage
from stages._io import write_json


def run(params: Path) -> None:
    paths, cfg = load_stage(params, "prepare", PrepareConfig)
    report = prepare_dataset(cfg, Path(paths.shards))
    write_json(Path(paths.metrics) / M.PREPARE, {
        M.NUM_TRAIN: report.num_samples["train"],
        M.NUM_VAL: report.num_samples["val"],
        M.NUM_CLASSES: report.num_classes,
        M.SKIPPED_TRAIN: report.num_skipped["train"],
        M.SKIPPED_VAL: report.num_skipped["val"],
    })
    print(f"prepare: {report.num_samples} samples, {report.num_classes} classes, "
          f"skipped {report.num_skipped}, re-encoded over max_side {report.num_reencoded}, "
          f"{'one image size' if report.same_size else 'images of many sizes'}, manifest sha256 {report.manifest_sha256[:12]}")
