"""The scale proof (issue 12): does memory stay flat from 20,000 to 1,000,000 rows, and does
streaming the cache cost throughput?

A synthetic but real-shaped dataset: tiny generated JPEGs (8 × 8 RGB, 1,000 classes, a
class-coloured pattern plus noise), a fixed 2,000-image val split, a teacher entrypoint with
D = 512 penultimate features and C = 1,000 classes (``bench/scale_models.py``; random
weights: nothing here is about accuracy, the shapes of what is cached and read are), V = 2
views, 3 RDMs, and a small student entrypoint from the same file. Every stage runs as the real CLI (``cifd prepare``,
``embed``, ``rdm``, ``distill --method kd|cifd``) in its own process, with a params file, and
a sampler thread reads the memory of that process and every child (loader workers, dask
workers) from ``/proc`` every 0.1 s. Per stage the JSON has the peak of the summed RSS and
of the summed PSS (RSS counts pages shared by forked workers once per process; PSS splits
them), the wall time, and the rows/s from the stage's own metrics (``seconds``: the whole
stage, cache loading to saved output, per-epoch validation included).

Claims checked in the JSON (``claims``):
- peak RSS (main process + workers) of ``rdm`` and ``distill`` (stream) at the largest N
  ≤ 1.2 × at 20k;
- stream rows/s ≥ 0.9 × memory-mode rows/s at 20k, for ``rdm`` and ``distill``.

The teacher fine-tune (``teacher.epochs > 0``; one epoch of the same teacher entrypoint, to
its own file) runs in both modes too: in every full run, and alone with ``--teacher-only``,
where the memory mode runs at every size for contrast (it holds both splits decoded).

Run (this 2-core machine: 20k ≈ 3 min, 1M ≈ 50 min)::

    uv run python bench/scale.py --rows 20000 1000000     # writes bench/results/scale.json
    uv run python bench/scale.py --smoke                    # 20k, one process set; CI runs it
    uv run python bench/scale.py --teacher-only --rows 10000 50000 --source-size 64 --repeats 1  # scale_teacher.json

Benchmarks measure; nothing here asserts (``tests/bench/test_scale.py`` runs ``--smoke``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent  # bench/: _common and scale_models
sys.path.insert(0, str(HERE))
from _common import RESULTS, machine_info, median, write_result  # noqa: E402

IMAGE_SIZE = 8
NUM_CLASSES = 1000
VAL_ROWS = 2000
SHARD_ROWS = 1000
VIEWS = 2
TEACHER = "scale_models:teacher"  # D = 512, C = 1000 (bench/scale_models.py, on PYTHONPATH)
STUDENT = "scale_models:student"
PREPROCESS = {"image_size": IMAGE_SIZE, "crop_pct": 1.0, "interpolation": "bilinear",
              "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


# Data -------------------------------------------------------------------------------------


def write_images(out: Path, *, rows: int, seed: int, split: str, side: int = IMAGE_SIZE) -> int:
    """``rows`` JPEGs of ``side`` pixels as WebDataset tars of :data:`SHARD_ROWS` (key, ``cls``,
    ``jpg``); bytes. Models see them at :data:`IMAGE_SIZE` whatever ``side`` is."""
    import webdataset as wds
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    protos = np.random.default_rng(12345).integers(0, 256, size=(NUM_CLASSES, 4, 4, 3)).astype(np.float32)
    total = 0
    for shard, start in enumerate(range(0, rows, SHARD_ROWS)):
        n = min(SHARD_ROWS, rows - start)
        labels = rng.integers(0, NUM_CLASSES, size=n)
        base = protos[labels].repeat(side // 4, axis=1).repeat(side // 4, axis=2)  # (n, side, side, 3)
        pixels = np.clip(base + rng.normal(0, 24, size=base.shape), 0, 255).astype(np.uint8)
        with open(out / f"{split}-{shard:06d}.tar", "wb") as handle:
            writer = wds.TarWriter(handle, encoder=False)
            for i in range(n):
                buffer = io.BytesIO()
                Image.fromarray(pixels[i]).save(buffer, format="JPEG", quality=90)
                writer.write({"__key__": f"{start + i:09d}", "cls": str(int(labels[i])).encode(),
                              "jpg": buffer.getvalue()})
                total += buffer.tell()
            writer.close()
    return total


def save_teacher(path: Path) -> None:
    """The teacher file: timm ``resnet10t`` with random weights and its preprocessing."""
    import torch

    from pipeline.models import build_model, save_model

    torch.manual_seed(0)
    model = build_model(TEACHER, num_classes=NUM_CLASSES, in_chans=3)
    save_model(path, model.eval(), spec={"name": TEACHER, "num_classes": NUM_CLASSES, "in_chans": 3,
                                         "model_kwargs": {}, "preprocess": dict(PREPROCESS)})


def params(work: Path, *, data: str, threads: int, logits: str = "from_head") -> dict[str, Any]:
    return {
        "paths": {"shards": str(work / "shards"), "teacher": str(work / "teacher.safetensors"),
                  "cache": str(work / "teacher.zarr"), "rdm_models": str(work / f"rdm-{data}.safetensors"),
                  "rdm_cache": str(work / f"rdm-{data}.zarr"), "students": str(work / f"students-{data}"),
                  "checkpoints": str(work / f"checkpoints-{data}"), "metrics": str(work / f"metrics-{data}"),
                  "plots": str(work / f"plots-{data}")},
        "prepare": {"source": "webdataset", "train": str(work / "src" / "train-*.tar"),
                    "val": str(work / "src" / "val-*.tar"), "classes": [str(c) for c in range(NUM_CLASSES)],
                    "samples_per_shard": SHARD_ROWS, "shuffle": False},
        "teacher": {"model": TEACHER, "in_chans": 3, "preprocess": PREPROCESS},
        "embed": {"views": VIEWS, "policy": {"kind": "rrc", "scale": [0.35, 1.0]}, "batch_size": 512, "logits": logits,
                  "chunk_rows": 500, "scheduler": "synchronous", "threads_per_worker": threads, "seed": 0},
        "rdm": {"rate_weights": [16.0, 4.0, 1.0], "hidden": 128, "epochs": 1, "batch_size": 1024,
                "data": data, "threads": threads, "seed": 0},
        "distill": {"methods": ["kd", "cifd"], "student": STUDENT, "epochs": 1, "batch_size": 256,
                    "optim": {"lr": 0.003}, "data": data, "loader_workers": 1 if data == "stream" else 0,
                    "threads": threads, "seed": 0},
    }


# Measuring --------------------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) bytes of one process, from smaps_rollup; zeros if it is gone."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss


def run_stage(argv: list[str], *, cwd: Path, log: Path) -> dict[str, Any]:
    """Run one CLI stage, sampling the summed RSS/PSS of its process tree; its peaks and wall."""
    began = time.perf_counter()
    with open(log, "w") as out:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        peak = {"rss": 0, "pss": 0, "processes": 1}
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                pids = _tree(proc.pid)
                mem = [_memory(p) for p in pids]
                peak["rss"] = max(peak["rss"], sum(m[0] for m in mem))
                peak["pss"] = max(peak["pss"], sum(m[1] for m in mem))
                peak["processes"] = max(peak["processes"], sum(1 for m in mem if m[0]))
                stop.wait(0.1)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        code = proc.wait()
        stop.set()
        thread.join()
    wall = time.perf_counter() - began
    if code != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({code}); its output: {log}\n{log.read_text()[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(peak["rss"] / 2**20, 1),
            "peak_pss_mib": round(peak["pss"] / 2**20, 1), "processes": peak["processes"]}


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def teacher_params(work: Path, params_file: Path, data: str) -> Path:
    """A params file for one epoch of teacher fine-tuning in ``data`` mode, written to its own
    teacher file and metrics folder (the frozen teacher the cache came from is left alone)."""
    import yaml

    params = yaml.safe_load(params_file.read_text())
    params["paths"].update(teacher=str(work / f"teacher-ft-{data}.safetensors"),
                           metrics=str(work / f"metrics-teacher-{data}"), plots=str(work / f"plots-teacher-{data}"))
    params["teacher"].update(epochs=1, batch_size=256, optim={"lr": 0.003}, data=data,
                             loader_workers=1 if data == "stream" else 0, augment={"kind": "rrc", "scale": [0.35, 1.0]})
    out = work / f"params-teacher-{data}.yaml"
    out.write_text(yaml.safe_dump(params, sort_keys=False))
    return out


def run_size(rows: int, *, work: Path, threads: int, modes: list[str], logits: str,
             methods: tuple[str, ...] = ("kd", "cifd"), repeats: int = 1, teacher: bool = True,
             teacher_only: bool = False, side: int = IMAGE_SIZE) -> dict[str, Any]:
    """Every stage at ``rows`` train rows; the teacher fine-tune (``teacher``: 1 epoch), rdm and
    distill (each of ``methods``) in each of ``modes``, ``repeats`` times (``teacher_only``:
    prepare and the teacher fine-tune only)."""
    import yaml

    cifd = [str(Path(sys.executable).parent / "cifd")]  # the installed CLI, as a user runs it
    env_cwd = work  # every path in the params files is absolute
    result: dict[str, Any] = {"rows": rows, "val_rows": VAL_ROWS, "stages": {}}
    began = time.perf_counter()
    src_bytes = write_images(work / "src", rows=rows, seed=1, split="train", side=side)
    src_bytes += write_images(work / "src", rows=VAL_ROWS, seed=2, split="val", side=side)
    result["generate_s"] = round(time.perf_counter() - began, 1)
    result["source_image_bytes"] = src_bytes
    save_teacher(work / "teacher.safetensors")
    files = {}
    for data in modes:
        files[data] = work / f"params-{data}.yaml"
        files[data].write_text(yaml.safe_dump(params(work, data=data, threads=threads, logits=logits),
                                              sort_keys=False))
    first = files[modes[0]]
    stages = result["stages"]
    for name in ("prepare",) if teacher_only else ("prepare", "embed"):
        stages[name] = run_stage([*cifd, name, "--params", str(first)], cwd=env_cwd, log=work / f"{name}.log")
        print(f"  {rows} {name}: {stages[name]}", flush=True)
    shutil.rmtree(work / "src")
    result["bytes_on_disk"] = {"shards": du(work / "shards")}
    if not teacher_only:
        result["bytes_on_disk"]["teacher_cache"] = du(work / "teacher.zarr")
        result["embed_metrics"] = json.loads((work / f"metrics-{modes[0]}" / "embed.json").read_text())
    runs: dict[str, list[dict[str, Any]]] = {}
    for rep in range(repeats if teacher else 0):  # the teacher fine-tune: 1 epoch, its own output file
        for data in (modes if rep % 2 == 0 else modes[::-1]):
            key = f"teacher_{data}"
            run = run_stage([*cifd, "teacher", "--params", str(teacher_params(work, files[data], data))], cwd=env_cwd,
                            log=work / f"{key}.log")
            seconds = json.loads((work / f"metrics-teacher-{data}" / "teacher.json").read_text())["seconds"]
            run.update(stage_seconds=seconds, rows_per_s=round(rows / seconds, 1), loadavg=os.getloadavg()[0])
            runs.setdefault(key, []).append(run)
            print(f"  {rows} {key}: {run}", flush=True)
    for rep in range(0 if teacher_only else repeats):  # modes alternate in order: load changes hit both alike
        for data in (modes if rep % 2 == 0 else modes[::-1]):
            key = f"rdm_{data}"
            run = run_stage([*cifd, "rdm", "--params", str(files[data])], cwd=env_cwd, log=work / f"{key}.log")
            seconds = json.loads((work / f"metrics-{data}" / "rdm.json").read_text())["seconds"]
            run.update(stage_seconds=seconds, rows_per_s=round(rows * VIEWS / seconds, 1), loadavg=os.getloadavg()[0])
            runs.setdefault(key, []).append(run)
            print(f"  {rows} {key}: {run}", flush=True)
            result["bytes_on_disk"][f"rdm_cache_{data}"] = du(work / f"rdm-{data}.zarr")
            for method in methods:
                key = f"distill_{method}_{data}"
                shutil.rmtree(work / f"checkpoints-{data}", ignore_errors=True)  # a repeat must train, not resume
                run = run_stage([*cifd, "distill", "--method", method, "--params", str(files[data])],
                                cwd=env_cwd, log=work / f"{key}.log")
                seconds = json.loads((work / f"metrics-{data}" / "distill" / f"{method}.json").read_text())["seconds"]
                run.update(stage_seconds=seconds, rows_per_s=round(rows / seconds, 1), loadavg=os.getloadavg()[0])
                runs.setdefault(key, []).append(run)
                print(f"  {rows} {key}: {run}", flush=True)
    for key, done in runs.items():  # median throughput, largest memory, every run kept
        stages[key] = {"rows_per_s": median([r["rows_per_s"] for r in done]),
                       "stage_seconds": median([r["stage_seconds"] for r in done]),
                       "wall_s": median([r["wall_s"] for r in done]),
                       "peak_rss_mib": max(r["peak_rss_mib"] for r in done),
                       "peak_pss_mib": max(r["peak_pss_mib"] for r in done),
                       "processes": max(r["processes"] for r in done), "runs": done}
    if teacher_only:
        return result
    views = (rows + VAL_ROWS) * VIEWS
    disk = result["bytes_on_disk"]  # one pipeline's outputs (the memory-mode RDM store is the same again)
    disk["total"] = disk["shards"] + disk["teacher_cache"] + disk["rdm_cache_stream"]
    result["bytes_per_sample_view"] = {name: round(size / views, 1) for name, size in result["bytes_on_disk"].items()
                                       if name != "shards"}
    return result


def claims(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    small = next((s for s in sizes if s["rows"] == min(x["rows"] for x in sizes)), None)
    large = max(sizes, key=lambda s: s["rows"])
    assert small is not None
    out: dict[str, Any] = {}
    # Stream stages (the claim), and the memory-mode fine-tune where both sizes ran it (the contrast).
    keys = [k for k in ("teacher_stream", "rdm_stream", "distill_kd_stream", "distill_cifd_stream", "teacher_memory")
            if k in small["stages"] and k in large["stages"]]
    if large is not small:
        ratios = {k: round(large["stages"][k]["peak_rss_mib"] / small["stages"][k]["peak_rss_mib"], 3) for k in keys}
        pss = {k: round(large["stages"][k]["peak_pss_mib"] / small["stages"][k]["peak_pss_mib"], 3) for k in keys}
        out["peak_rss_ratio_large_over_20k"] = {
            "rows": [small["rows"], large["rows"]], "rss": ratios, "pss": pss,
            "holds (<= 1.2)": all(r <= 1.2 for k, r in ratios.items() if k.endswith("_stream"))}
    if any(k.endswith("_memory") for k in small["stages"]):
        speed = {name: round(small["stages"][f"{name}_stream"]["rows_per_s"]
                             / small["stages"][f"{name}_memory"]["rows_per_s"], 3)
                 for name in ("teacher", "rdm", "distill_kd", "distill_cifd") if f"{name}_memory" in small["stages"]}
        out["stream_over_memory_rows_per_s_at_small"] = {"rows": small["rows"], "ratio": speed,
                                                         "holds (>= 0.9)": all(r >= 0.9 for r in speed.values())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20000, 1000000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of rdm and distill per mode where stream and memory are compared")
    parser.add_argument("--logits", choices=["from_head", "stored"], default="from_head",
                        help="embed.logits (from_head: the teacher's head in the cache, no logits array)")
    parser.add_argument("--smoke", action="store_true",
                        help="the CI smoke test: 20k rows, stream mode, rdm and distill kd (no claims)")
    parser.add_argument("--teacher-only", action="store_true",
                        help="prepare and one epoch of teacher fine-tuning, stream and memory mode at every size "
                             "(default out: bench/results/scale_teacher.json)")
    parser.add_argument("--source-size", type=int, default=IMAGE_SIZE,
                        help=f"side of the generated JPEGs (models still see {IMAGE_SIZE} x {IMAGE_SIZE}): larger "
                             "sources make a held split cost what photos cost")
    args = parser.parse_args()
    if args.teacher_only and args.out == RESULTS / "scale.json":
        args.out = RESULTS / "scale_teacher.json"
    if args.smoke:
        args.rows = [20000]
        if args.out == RESULTS / "scale.json":
            args.out = Path(tempfile.gettempdir()) / "cifd-bench-smoke" / "scale.json"
    result: dict[str, Any] = {"benchmark": "scale", "machine": machine_info(args.threads),
                              "params": {"rows": args.rows, "val_rows": VAL_ROWS, "image_size": IMAGE_SIZE,
                                         "source_size": args.source_size,
                                         "classes": NUM_CLASSES, "views": VIEWS, "teacher": TEACHER,
                                         "student": STUDENT, "shard_rows": SHARD_ROWS,
                                         "stage_params": params(Path("WORK"), data="stream", threads=args.threads,
                                                                logits=args.logits)},
                              "sizes": []}
    small = min(args.rows)
    for rows in sorted(args.rows):
        modes = ["stream", "memory"] if (rows == small or args.teacher_only) and not args.smoke else ["stream"]
        methods = ("kd",) if args.smoke else ("kd", "cifd")
        with tempfile.TemporaryDirectory(prefix=f"cifd-scale-{rows}-", dir=args.work) as tmp:
            print(f"N = {rows}: {modes}", flush=True)
            result["sizes"].append(run_size(rows, work=Path(tmp), threads=args.threads, modes=modes,
                                            methods=methods, logits=args.logits, teacher=not args.smoke,
                                            teacher_only=args.teacher_only, side=args.source_size,
                                            repeats=args.repeats if len(modes) > 1 else 1))
        result["claims"] = claims(result["sizes"])
        write_result(args.out, result)  # after every size: a killed 1M run keeps the 20k figures
    print(json.dumps(result["claims"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
