"""The accuracy cost of a compact teacher cache (issue 12, item 3): KD students from the same
teacher and views, cached three ways (``embed.logits: stored`` float32, ``stored`` float16,
``from_head``), three seeds each, through the pipeline's own stages (``cifd prepare``,
``teacher``, ``embed`` once per choice, ``distill --method kd`` per seed).

The preset is ``presets/cifar10.yaml`` (the shared JPEG CIFAR-10 and ResNet-56), shortened to
fit a shared 2-core machine: ``--train`` train images, ``--val`` test images, ``--views``
cached views per image, the shared ResNet-56 frozen as is (``teacher.epochs: 0``),
``--epochs`` student epochs; everything else as the preset. Writes one params file per choice under ``--work`` and the results JSON
(``--out``), rewritten after every run::

    uv run python studies/compact_cache_kd.py --work /tmp/compact-kd --out docs/compact_cache_kd.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHOICES = {  # name -> embed overrides
    "stored_float32": {"logits": "stored", "logits_dtype": "float32"},
    "stored_float16": {"logits": "stored", "logits_dtype": "float16"},
    "from_head": {"logits": "from_head", "logits_dtype": "float32"},
}


def params_for(args: argparse.Namespace, choice: str, seed: int) -> dict[str, Any]:
    params = yaml.safe_load((ROOT / "presets" / "cifar10.yaml").read_text())
    work = args.work.resolve()
    shared = args.shared.resolve()
    params["paths"] = {
        "shards": str(work / "shards"), "teacher": str(work / "teacher.safetensors"),
        "cache": str(work / f"cache-{choice}.zarr"), "rdm_models": str(work / "rdm.safetensors"),
        "rdm_cache": str(work / "rdm.zarr"), "students": str(work / f"students-{choice}-s{seed}"),
        "checkpoints": str(work / f"checkpoints-{choice}-s{seed}"), "metrics": str(work / f"metrics-{choice}-s{seed}"),
        "plots": str(work / f"plots-{choice}-s{seed}"),
    }
    params["prepare"].update(train=str(shared / "data/cifar10-jpeg/train.tar"),
                             val=str(shared / "data/cifar10-jpeg/test.tar"),
                             limit_train=args.train, limit_val=args.val)
    params["teacher"]["weights"] = str(shared / "models/cifar10-resnet56.th")
    params["teacher"]["epochs"] = 0  # the shared checkpoint frozen as is
    params["embed"].update(CHOICES[choice], views=args.views, scheduler="synchronous", threads_per_worker=args.threads)
    params["distill"].update(methods=["kd"], epochs=args.epochs, seed=seed, threads=args.threads)
    params["evaluate"]["methods"] = ["kd"]
    return params


def cifd(stage: str, params: Path, *extra: str) -> float:
    began = time.perf_counter()
    cmd = [sys.executable, "-m", "stages.cli", stage, "--params", str(params), *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return round(time.perf_counter() - began, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--val", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--views", type=int, default=2, help="embed.views (the preset has 4)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--choices", nargs="+", default=list(CHOICES), choices=list(CHOICES))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "study": "studies/compact_cache_kd.py", "command": " ".join(["uv run python", *sys.argv]),
        "schedule": {"preset": "presets/cifar10.yaml", "train_images": args.train, "val_images": args.val,
                     "teacher": "shared ResNet-56 frozen as is (teacher.epochs 0)", "student_epochs": args.epochs,
                     "views": args.views,
                     "method": "kd", "seeds": args.seeds, "torch_threads": args.threads},
        "stage_seconds": {}, "runs": {}, "summary": {},
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    for choice in args.choices:
        for seed in args.seeds:
            path = args.work / f"params-{choice}-s{seed}.yaml"
            path.write_text(yaml.safe_dump(params_for(args, choice, seed), sort_keys=False))
    first = args.work / f"params-{args.choices[0]}-s{args.seeds[0]}.yaml"
    if not (args.work / "shards" / "manifest.json").is_file():
        result["stage_seconds"]["prepare"] = cifd("prepare", first)
    if not (args.work / "teacher.safetensors").is_file():
        result["stage_seconds"]["teacher"] = cifd("teacher", first)
    def metrics_file(choice: str, seed: int) -> Path:
        return args.work / f"metrics-{choice}-s{seed}" / "distill" / "kd.json"

    for choice in args.choices:
        # A rerun keeps the students already trained (their metrics files), and their cache.
        if not all(metrics_file(choice, s).is_file() for s in args.seeds):
            result["stage_seconds"][f"embed {choice}"] = cifd(
                "embed", args.work / f"params-{choice}-s{args.seeds[0]}.yaml")
        info = subprocess.run([sys.executable, "-m", "stages.cli", "cache", "info", "--json",
                               str(args.work / f"cache-{choice}.zarr")], cwd=ROOT, check=True, capture_output=True,
                              text=True)
        split = json.loads(info.stdout)["splits"]["train"]
        result.setdefault("cache_bytes_per_sample_view", {})[choice] = {
            "on_disk": split["bytes_per_sample_view_stored"], "uncompressed": split["bytes_per_sample_view_raw"]}
        save()
        for seed in args.seeds:
            params = args.work / f"params-{choice}-s{seed}.yaml"
            if not metrics_file(choice, seed).is_file():
                cifd("distill", params, "--method", "kd")
            result["runs"][f"{choice}/s{seed}"] = json.loads(metrics_file(choice, seed).read_text())
            save()
        tops = [result["runs"][f"{choice}/s{s}"]["val_top1"] for s in args.seeds]
        agree = [result["runs"][f"{choice}/s{s}"]["teacher_agreement"] for s in args.seeds]
        result["summary"][choice] = {
            "val_top1_mean": round(statistics.mean(tops), 5),
            "val_top1_std": round(statistics.stdev(tops), 5) if len(tops) > 1 else None,
            "teacher_agreement_mean": round(statistics.mean(agree), 5),
        }
        save()
    base = result["summary"].get("stored_float32")
    if base:
        result["top1_minus_stored_float32"] = {
            c: {f"s{s}": round(result["runs"][f"{c}/s{s}"]["val_top1"] - result["runs"][f"stored_float32/s{s}"]["val_top1"], 5)
                for s in args.seeds} for c in args.choices if c != "stored_float32"}
    save()
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
