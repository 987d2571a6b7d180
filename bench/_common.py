"""Shared helpers of the benchmark scripts: machine description, data and teacher set-up,
JSON output. Benchmarks are measurements, not tests; nothing here asserts."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# The shared data and models sit beside the repository (``../shared``); CIFD_SHARED overrides.
SHARED = Path(os.environ.get("CIFD_SHARED") or ROOT.parent / "shared")
CIFAR_TRAIN = SHARED / "data" / "cifar10-jpeg" / "train.tar"
CIFAR_TEST = SHARED / "data" / "cifar10-jpeg" / "test.tar"
RESNET56 = SHARED / "models" / "cifar10-resnet56.th"
TEACHER_NAME = "pipeline.models.cifar_resnet:resnet56"
# The teacher's input as its model file records it (``Preprocess.to_spec``): 32×32, the clean
# view is the whole image (crop_pct 1), bilinear resampling, ImageNet mean/std (the weights').
CIFAR_PREPROCESS = {"image_size": 32, "crop_pct": 1.0, "interpolation": "bilinear",
                    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int, device: str | torch.device = "cpu") -> dict[str, Any]:
    """What the numbers were measured on. ``loadavg`` shows other work sharing the CPU."""
    import dask
    import numpy as np
    import zarr

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    device = torch.device(device)
    info = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "torch_threads": threads,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "cuda_available": torch.cuda.is_available(),
        "torch": str(torch.__version__),
        "numpy": np.__version__,
        "zarr": zarr.__version__,
        "dask": dask.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "loadavg_at_start": list(os.getloadavg()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def write_result(path: Path, data: dict[str, Any]) -> Path:
    data["machine"]["loadavg_at_end"] = list(os.getloadavg())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def save_teacher(path: Path) -> str:
    """The pretrained CIFAR-10 ResNet-56 as a model file with a ``preprocess`` spec."""
    from pipeline.models import build_model, save_model

    model = build_model(TEACHER_NAME, num_classes=10, in_chans=3, weights=str(RESNET56))  # weights_only=True reads it
    spec = {"name": TEACHER_NAME, "num_classes": 10, "in_chans": 3, "model_kwargs": {},
            "preprocess": dict(CIFAR_PREPROCESS)}
    return save_model(path, model.eval(), spec=spec)


def prepare_cifar(out_dir: Path, *, train: int, val: int, samples_per_shard: int,
                  val_source: Path | None = None) -> tuple[dict[str, Any], float]:
    """A stratified CIFAR-10 subset as shards; returns the report and the seconds it took."""
    from pipeline.data.prepare import prepare_dataset
    from schemas.config import PrepareConfig

    cfg = PrepareConfig(source="imagefolder", train=str(CIFAR_TRAIN),
                        val=str(val_source) if val_source is not None else None,
                        limit_train=train, limit_val=val, samples_per_shard=samples_per_shard)
    began = time.perf_counter()
    report = prepare_dataset(cfg, out_dir)
    return {"num_samples": report.num_samples, "num_classes": report.num_classes,
            "manifest_sha256": report.manifest_sha256}, time.perf_counter() - began


class Timer:
    """Accumulates seconds and calls under named keys."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def add(self, key: str, seconds: float, calls: int = 1) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds
        self.calls[key] = self.calls.get(key, 0) + calls

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {k: {"seconds": round(v, 4), "calls": self.calls[k]} for k, v in self.seconds.items()}
