"""Why the ``local`` (dask LocalCluster) embed is slower than ``synchronous`` in steady state.

dask's nanny starts every worker with ``distributed.nanny.pre-spawn-environ``, which sets
``MALLOC_TRIM_THRESHOLD_=65536``. Setting it disables glibc's dynamic mmap threshold, so
every large tensor torch frees goes back to the OS and the next one page-faults again (the
teacher's activations are MBs per layer). This script runs ``run_embed`` with
``scheduler="local"`` alternately with dask's default worker environment and with that
variable unset (``dask.config`` value ``None``, and dropped from ``os.environ``, where an earlier
LocalCluster's nanny has written it), plus one ``synchronous`` run as the
reference, on the same shards and teacher; and the bare forward in this process with and
without the variable (in a subprocess, since glibc reads it at start).

    uv run python bench/embed_local_env.py
    uv run python bench/embed_local_env.py --smoke    # a tiny run, to a temp file
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dask  # noqa: E402
import distributed  # noqa: E402,F401  (registers the distributed.* config defaults)
import torch  # noqa: E402

from _common import RESULTS, machine_info, median, prepare_cifar, save_teacher, write_result  # noqa: E402
from embed_throughput import cluster_startup, run_stage  # noqa: E402

KEY = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"

BARE = """
import resource, sys, time, torch
from pipeline.models import load_model
torch.set_num_threads(int(sys.argv[2]))
model = load_model(sys.argv[1])[0].eval()
x = torch.randn(256, 3, 32, 32)
with torch.inference_mode():
    model.classify(model.embed(x))
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(3):
        model.classify(model.embed(x))
    dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
print(768 / dt, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt)
"""


def bare_subprocess(teacher: Path, threads: int, trim: str | None) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}
    if trim is not None:
        env["MALLOC_TRIM_THRESHOLD_"] = trim
    out = subprocess.run([sys.executable, "-c", BARE, str(teacher), str(threads)], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return {"images_per_s": round(float(out[0]), 2), "sys_s": round(float(out[1]), 3), "minor_faults": int(out[2])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "embed_local_env.json")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny check that the script runs (256 images, V=2, 1 repeat); writes to a "
                             "temporary file unless --out is given")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.views, args.repeats = 256, 2, 1
        if args.out == RESULTS / "embed_local_env.json":
            args.out = Path(tempfile.gettempdir()) / "cifd-bench-smoke" / "embed_local_env.json"

    from pipeline.data.shards import load_manifest

    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"benchmark": "embed_local_env", "machine": machine_info(args.threads),
                              "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                              "dask_default_worker_env": dict(dask.config.get("distributed.nanny.pre-spawn-environ"))}
    runs: dict[str, list[dict[str, Any]]] = {}
    bare: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="cifd-bench-env-") as tmp_name:
        tmp = Path(tmp_name)
        prepare_cifar(tmp / "shards", train=args.images, val=64, samples_per_shard=128)
        teacher = tmp / "teacher.pt"
        save_teacher(teacher)
        manifest = load_manifest(tmp / "shards")
        common = dict(manifest=manifest, teacher=teacher, views=args.views, threads=args.threads, batch_size=256)

        @contextlib.contextmanager
        def worker_env(unset: bool) -> Iterator[None]:
            # A LocalCluster's nannies live in this process and write their pre-spawn variables
            # into os.environ; later workers inherit them whatever the config says, so the
            # unset variant must drop the variable here too.
            saved = os.environ.pop("MALLOC_TRIM_THRESHOLD_", None) if unset else None
            try:
                with dask.config.set({KEY: None} if unset else {}):
                    yield
            finally:
                if unset:
                    os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
                    if saved is not None:
                        os.environ["MALLOC_TRIM_THRESHOLD_"] = saved

        def stage(tag: str, scheduler: str, unset: bool) -> None:
            with worker_env(unset):
                r = run_stage(store=tmp / f"{tag}.zarr", scheduler=scheduler, **common)
            runs.setdefault(tag, []).append(r)
            print(f"{tag}: {r['views_per_s']:.1f} views/s, steady {r['steady_views_per_s']:.1f} "
                  f"(wall {r['wall_s']:.1f}s)", flush=True)

        for _ in range(args.repeats):
            for name, trim in (("default_65536", "65536"), ("unset", None)):
                b = bare_subprocess(teacher, args.threads, trim)
                bare.setdefault(name, []).append(b)
                print(f"bare, MALLOC_TRIM_THRESHOLD_ {name}: {b}", flush=True)
            stage("local_default_env", "local", unset=False)
            stage("local_trim_unset", "local", unset=True)
        stage("synchronous", "synchronous", unset=False)
        env_check = {}
        for name, unset in (("default", False), ("unset", True)):
            with worker_env(unset):
                env_check[name] = cluster_startup(args.threads)["worker"]
        result["worker_env_check"] = env_check
        print(f"worker environment: {env_check}", flush=True)

    summary = {tag: {"median_wall_s": round(median([r["wall_s"] for r in rs]), 3),
                     "median_views_per_s": round(median([r["views_per_s"] for r in rs]), 2),
                     "median_steady_views_per_s": round(median([r["steady_views_per_s"] for r in rs]), 2)}
               for tag, rs in runs.items()}
    bare_summary = {k: round(median([b["images_per_s"] for b in v]), 2) for k, v in bare.items()}
    result["timings"] = {"stage_runs": runs, "stage": summary, "bare_subprocess": bare,
                         "bare_images_per_s_median": bare_summary}
    s = summary
    result["ratios"] = {
        "local_steady_default_over_synchronous_steady": round(
            s["local_default_env"]["median_steady_views_per_s"] / s["synchronous"]["median_steady_views_per_s"], 4),
        "local_steady_unset_over_synchronous_steady": round(
            s["local_trim_unset"]["median_steady_views_per_s"] / s["synchronous"]["median_steady_views_per_s"], 4),
        "local_steady_unset_over_default": round(
            s["local_trim_unset"]["median_steady_views_per_s"] / s["local_default_env"]["median_steady_views_per_s"], 4),
        "bare_default_65536_over_unset": round(bare_summary["default_65536"] / bare_summary["unset"], 4),
    }
    path = write_result(args.out, result)
    print(f"ratios: {result['ratios']}\nwrote {path}")


if __name__ == "__main__":
    main()
