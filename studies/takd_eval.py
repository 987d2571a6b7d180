"""Score TAKD students against the ResNet-56 teacher of the main study, as `cifd evaluate` does.

`cifd evaluate` in the TAKD workspace compares its students with *their* teacher, the
assistant, and refuses students distilled from another cache. The study's table needs
agreement with the ResNet-56, so this reads the first workspace's cache and shards and the
second workspace's students (made by studies/takd.sh):

    uv run python studies/takd_eval.py --study ../first --takd . --seeds 0 1 2 --out docs/cifar10_study/takd.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from pipeline.cache.reader import CacheExpectation, open_cache
from pipeline.data.preprocess import Preprocess
from pipeline.data.shards import load_manifest, load_split
from pipeline.evaluate import ValSet, evaluate_classifier
from pipeline.models import load_model
from pipeline.data.held import held_images
from report.study import mean_std
from schemas import layout as L


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, required=True, help="workspace of the main study (its cache, shards)")
    parser.add_argument("--takd", type=Path, required=True, help="workspace where studies/takd.sh ran")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    manifest = load_manifest(args.study / "data/shards")
    cache = open_cache(args.study / "cache/teacher.zarr", CacheExpectation(manifest_sha256=manifest.sha256))
    val = load_split(manifest, "val")
    images = held_images(val, manifest, torch.device("cpu"))  # a batch of same-size images, else a list
    labels = torch.from_numpy(val.labels)
    cached = cache.split("val").read_all((L.LOGITS, L.VIEWS))
    teacher_logits = torch.from_numpy(cached[L.LOGITS][:, 0].astype(np.float32))
    clean = torch.from_numpy(cached[L.VIEWS][:, 0])  # (n, 5) the clean view the ResNet-56 saw
    runs = {}
    for seed in args.seeds:
        path = args.takd / f"models/students_takd_s{seed}/kd.safetensors"
        student, student_spec = load_model(path)
        # As `cifd evaluate`: the student's own input size and normalisation, on the box the teacher saw.
        preprocess = Preprocess.from_spec(student_spec, source=str(path))
        result = evaluate_classifier(student, ValSet(images, clean, labels, teacher_logits), preprocess=preprocess,
                                     batch_size=1000)
        seconds = json.loads((args.takd / f"metrics_takd_s{seed}/distill/kd.json").read_text())["seconds"]
        runs[f"takd-s{seed}"] = {"val_top1": round(result.top1, 5), "teacher_agreement": round(result.agreement, 5),
                                 "kl_teacher_student": round(result.kl, 5), "distill_seconds": seconds}
    summary = {key: mean_std(run[key] for run in runs.values())
               for key in ("val_top1", "teacher_agreement", "distill_seconds")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": runs, "mean_std": summary}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
