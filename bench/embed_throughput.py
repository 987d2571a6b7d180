"""Stage one (``embed``) throughput against the bare teacher forward, in one run.

On one CIFAR-10 subset (shards made with ``prepare_dataset``) and one teacher file (the
pretrained ResNet-56 saved with ``save_model`` and a ``preprocess`` spec), measures:

(a) bare: images/s of ``model.embed`` + ``model.classify`` under ``torch.inference_mode``,
    same batch size and threads, over the clean views already decoded, rendered and
    normalised in memory (the ceiling for the stage);
(b) the full ``run_embed`` at V=1 (decode, views, teacher, Zarr write, setup, finalize) with
    ``scheduler="synchronous"`` and with ``scheduler="local"`` (dask LocalCluster, 1 worker,
    ``threads_per_worker`` torch threads; cluster start included, and reported on its own);
(c) the same at V=``--views`` (images/s and views/s).

Ratios stage/bare (per teacher forward) are the claim: at V=1 the stage should reach 0.8 of
the bare forward. One more synchronous V=1 run goes under cProfile, and the cumulative times
of the stage's own functions (load, tar read, hash, JPEG decode, render_inputs,
embed/classify, write_rows) say where the time goes (``breakdown_v1_synchronous``); the
timed runs themselves are not instrumented. ``--cprofile`` adds that run's top functions.

    uv run python bench/embed_throughput.py            # defaults sized for a 2-core CPU
    uv run python bench/embed_throughput.py --smoke    # a tiny run (about 2 min), to a temp file
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import RESULTS, machine_info, median, prepare_cifar, save_teacher, write_result  # noqa: E402

pc = time.perf_counter


# ------------------------------------------------------------------ where the time goes

def _cum(stats: pstats.Stats, file_suffix: str, func: str, *, caller: str | None = None) -> tuple[float, int]:
    """Cumulative seconds and calls of ``func`` (defined in a file ending in ``file_suffix``),
    all calls or only those made by the function named ``caller``."""
    seconds, calls = 0.0, 0
    for (file, _, name), (_, nc, _, ct, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if name != func or not file.endswith(file_suffix):
            continue
        if caller is None:
            seconds, calls = seconds + ct, calls + nc
            continue
        for (_, _, caller_name), entry in callers.items():
            if caller_name == caller:
                seconds, calls = seconds + entry[3], calls + entry[1]
    return seconds, calls


def breakdown(stats: pstats.Stats, *, wall: float, phases: dict[str, float]) -> dict[str, Any]:
    """Seconds and share of a cProfile'd synchronous ``run_embed`` per part, from the
    profiler's cumulative times of the stage's own functions (the caller is named where the
    set-up's probe calls the same function; read_shard's parts are scaled to the shards' share
    of its time); ``other`` parts are residuals. cProfile adds a
    cost per Python call, so shares, not absolute times, are the point."""
    get = lambda *a, **k: _cum(stats, *a, **k)[0]  # noqa: E731
    shard = get("cache/embed.py", "embed_shard")
    load = get("cache/embed.py", "_load_teacher", caller="embed_shard")
    read = get("data/shards.py", "read_shard", caller="embed_shard")
    # read_shard's parts include the set-up probe's read of the first shard: keep the shards' share.
    share = read / max(get("data/shards.py", "read_shard"), 1e-12)
    tar = share * (get("data/shards.py", "iter_tar_samples", caller="read_shard") or get(
        "data/sources.py", "iter_tar_samples", caller="read_shard"))
    hashing = share * get("data/shards.py", "content_hash", caller="read_shard")
    decode = share * get("data/shards.py", "decode_image", caller="read_shard")
    render = get("data/preprocess.py", "render_inputs", caller="teacher_outputs")
    forward = get("models/cifar_resnet.py", "embed", caller="teacher_outputs") + get(
        "models/cifar_resnet.py", "classify", caller="teacher_outputs") + get(
        "models/classifier.py", "embed", caller="teacher_outputs") + get(
        "models/classifier.py", "classify", caller="teacher_outputs")
    write = get("cache/store.py", "write_rows", caller="embed_shard")
    outputs = get("cache/embed.py", "teacher_outputs")  # called by embed_shard only (via inference_mode)
    parts = {
        "run_embed_setup (load_model, sha256, probe, create_store, sample_views)": phases["setup_s"],
        "load_teacher (in embed_shard, first shard)": load,
        "read_shard.tar_read": tar,
        "read_shard.hash (sha256 per image)": hashing,
        "read_shard.decode_jpeg (PIL)": decode,
        "read_shard.other (key checks, lists)": read - tar - hashing - decode,
        "render_inputs (crop/flip/resize + normalise)": render,
        "forward (embed + classify)": forward,
        "teacher_outputs.other (indexing, cat)": outputs - render - forward,
        "write_rows (zarr, 5 arrays + done flag)": write,
        "embed_shard.other (block.stacked, to numpy, astype, open_group)": shard - load - read - outputs - write,
        "finalize + teardown": phases["teardown_s"],
    }
    accounted = sum(parts.values())
    parts["unaccounted (driver loop, progress)"] = wall - accounted
    return {
        "source": "cProfile of one more synchronous V=1 run (not of the timed runs)",
        "wall_s_with_profiler": round(wall, 3),
        "parts_s": {k: round(v, 3) for k, v in parts.items()},
        "parts_share": {k: round(v / wall, 4) for k, v in parts.items()},
    }


# ------------------------------------------------------------------ measurements

def bare_forward(model: Any, inputs: torch.Tensor, *, batch_size: int) -> tuple[float, torch.Tensor]:
    """Seconds for embed + classify over in-memory normalised inputs; also the logits."""
    with torch.inference_mode():
        model.classify(model.embed(inputs[:batch_size]))  # warm-up (oneDNN primitives)
        logits = []
        began = pc()
        for start in range(0, len(inputs), batch_size):
            e = model.embed(inputs[start:start + batch_size])
            logits.append(model.classify(e).float())
        seconds = pc() - began
    return seconds, torch.cat(logits)


def forward_by_batch(model: Any, inputs: torch.Tensor, *, sizes: tuple[int, ...]) -> dict[str, float]:
    out = {}
    with torch.inference_mode():
        for size in sizes:
            x = inputs[:size]
            model.classify(model.embed(x))
            times = []
            for _ in range(3):
                began = pc()
                model.classify(model.embed(x))
                times.append(pc() - began)
            out[str(size)] = round(median(times), 4)
    return out


def run_stage(*, manifest: Any, teacher: Path, store: Path, views: int, scheduler: str, threads: int,
              batch_size: int, profiler: cProfile.Profile | None = None) -> dict[str, Any]:
    import pipeline.cache.embed as E
    from schemas.config import EmbedConfig

    shutil.rmtree(store, ignore_errors=True)  # a finished store would be resumed, not recomputed
    settings = EmbedConfig(views=views, batch_size=batch_size, scheduler=scheduler, workers=1,
                           threads_per_worker=threads, device="cpu")
    marks: list[tuple[float, int]] = []

    def progress(count: int, description: str) -> None:
        marks.append((pc(), count))

    E._load_teacher.cache_clear()  # as in a fresh stage process: the shard loads the teacher
    began = pc()
    if profiler is not None:
        profiler.enable()
    try:
        report = E.run_embed(settings=settings, manifest=manifest, teacher_path=teacher, store_path=store,
                             progress=progress, splits=("train",))
    finally:
        if profiler is not None:
            profiler.disable()
    wall = pc() - began
    torch.set_num_threads(threads)  # run_embed's synchronous path sets it; keep ours explicit
    n = report.written_rows
    tasks_at, _ = marks[0]
    done = [t for t, _ in marks[1:]]
    rows = [c for _, c in marks[1:]]
    steady_s = done[-1] - done[0] if len(done) > 1 else float("nan")
    steady_rows = sum(rows[1:])
    phases = {"setup_s": tasks_at - began, "first_shard_s": done[0] - tasks_at,
              "steady_s": steady_s, "teardown_s": began + wall - done[-1]}
    out: dict[str, Any] = {
        "scheduler": scheduler,
        "views": views,
        "images": n,
        "teacher_forwards": report.teacher_forwards,
        "shards": report.written_shards,
        "wall_s": round(wall, 3),
        "images_per_s": n / wall,
        "views_per_s": n * views / wall,
        "phases_s": {k: round(v, 3) for k, v in phases.items()},
        # Shards 2..k only: excludes set-up, worker start and the first shard (model load).
        "steady_views_per_s": steady_rows * views / steady_s if len(done) > 1 else None,
    }
    if profiler is not None:
        out["breakdown"] = breakdown(pstats.Stats(profiler), wall=wall, phases=phases)
    return out


def _worker_probe(threads: int) -> dict[str, Any]:
    began = time.perf_counter()
    import torch as t

    import pipeline.cache.embed  # noqa: F401  (what a worker imports to run embed_shard)

    imported = time.perf_counter() - began
    t.set_num_threads(threads)
    return {"import_s": round(imported, 3), "torch_threads_after_set": t.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
            "MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_")}


def cluster_startup(threads: int) -> dict[str, Any]:
    """LocalCluster start, as ``_run_tasks`` makes it, the worker's first import, and close."""
    from dask.distributed import Client, LocalCluster

    t0 = pc()
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR)
    client = Client(cluster)
    t1 = pc()
    probe = client.submit(_worker_probe, threads, pure=False).result()
    t2 = pc()
    client.close()
    cluster.close()
    t3 = pc()
    return {"cluster_and_client_start_s": round(t1 - t0, 3), "first_task_with_imports_s": round(t2 - t1, 3),
            "close_s": round(t3 - t2, 3), "total_s": round(t3 - t0, 3), "worker": probe}


def cprofile_run(*, top: bool, **kwargs: Any) -> dict[str, Any]:
    """One more synchronous run under cProfile: its breakdown by the stage's functions, and
    (``top``) the 25 functions with the most own and cumulative time."""
    profiler = cProfile.Profile()
    result = run_stage(profiler=profiler, **kwargs)
    out = {"images_per_s_with_profiler": result["images_per_s"], **result["breakdown"]}
    if top:
        stats = pstats.Stats(profiler, stream=io.StringIO())
        rows = []
        for (file, line, func), (cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
            rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": nc, "tottime_s": round(tt, 3),
                         "cumtime_s": round(ct, 3)})
        out["top_tottime"] = sorted(rows, key=lambda r: -r["tottime_s"])[:25]
        out["top_cumtime"] = sorted(rows, key=lambda r: -r["cumtime_s"])[:25]
    return out


# ------------------------------------------------------------------ summary

def _verdict(a: float, b: float, threshold: float) -> str:
    if a >= threshold and b >= threshold:
        return "holds"
    if a < threshold and b < threshold:
        return "fails"
    return "mixed"


def summarize(result: dict[str, Any], *, images: int, repeats: int) -> None:
    """Medians, ratios and the claim, from the raw timings in ``result`` (also usable on a
    stored JSON: ``--resummarize``).

    ``ratios`` divide medians; ``paired_ratios`` divide each stage run by the bare run made
    right before it (rounds of bare, V=1 synchronous, V=1 local; the V>1 runs pair with the
    bare run made right after them), which cancels slow drifts of a shared machine's load.
    Both are per teacher forward: stage views/s over bare images/s (= images/s at V=1).
    """
    n = images
    bare_s = result["timings"]["bare_forward"]["seconds"]
    runs = result["timings"]["stage_runs"]
    bare_med = median(bare_s)
    bare_rate = n / bare_med
    result["timings"]["bare_forward"].update({"median_s": round(bare_med, 3), "images_per_s": round(bare_rate, 2)})
    stage_summary, ratios, paired = {}, {}, {}
    for tag, rs in runs.items():
        views = rs[0]["views"]
        med_wall = median([r["wall_s"] for r in rs])
        steady = [r["steady_views_per_s"] for r in rs if r["steady_views_per_s"]]
        stage_summary[tag] = {
            "views": views, "repeats": len(rs), "median_wall_s": round(med_wall, 3),
            "images_per_s": round(n / med_wall, 2), "views_per_s": round(n * views / med_wall, 2),
            "steady_views_per_s": round(median(steady), 2) if steady else None,
            "median_phases_s": {k: round(median([r["phases_s"][k] for r in rs]), 3) for k in rs[0]["phases_s"]},
        }
        ratios[f"{tag}_over_bare"] = round(n * views / med_wall / bare_rate, 4)
        if steady:
            ratios[f"{tag}_steady_over_bare"] = round(median(steady) / bare_rate, 4)
        partners = bare_s[:repeats] if views == 1 else [bare_s[-1]] * len(rs)
        each = [views * b / r["wall_s"] for b, r in zip(partners, rs)]
        each_steady = [r["steady_views_per_s"] * b / n for b, r in zip(partners, rs) if r["steady_views_per_s"]]
        paired[f"{tag}_over_bare"] = {"each": [round(x, 4) for x in each], "median": round(median(each), 4)}
        if each_steady:
            paired[f"{tag}_steady_over_bare"] = {"each": [round(x, 4) for x in each_steady],
                                                 "median": round(median(each_steady), 4)}
    threshold = 0.8
    result["timings"]["stage"] = stage_summary
    result["ratios"] = ratios
    result["paired_ratios"] = paired
    result["claim"] = {
        "statement": "on CPU, run_embed at V=1 reaches >= 0.8 of the bare teacher forward (images/s)",
        "threshold": threshold,
        "v1_synchronous": ratios["v1_synchronous_over_bare"],
        "v1_synchronous_paired": paired["v1_synchronous_over_bare"]["median"],
        "v1_local": ratios["v1_local_over_bare"],
        "v1_local_paired": paired["v1_local_over_bare"]["median"],
        # "holds" / "fails" when the median and the paired ratio agree, else "mixed".
        "synchronous": _verdict(ratios["v1_synchronous_over_bare"], paired["v1_synchronous_over_bare"]["median"],
                                threshold),
        "local": _verdict(ratios["v1_local_over_bare"], paired["v1_local_over_bare"]["median"], threshold),
    }


# ------------------------------------------------------------------ main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1024, help="CIFAR-10 train images (default 1024)")
    parser.add_argument("--views", type=int, default=4, help="V of part (c) (default 4)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, bare and stage (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="repeats of the V=1 runs (default 2)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=256, help="prepare.samples_per_shard")
    parser.add_argument("--cprofile", action="store_true",
                        help="add the top functions of the cProfile'd run to the JSON")
    parser.add_argument("--no-breakdown", action="store_true",
                        help="skip the extra cProfile'd synchronous V=1 run that gives the breakdown")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny check that the script runs (128 images, 1 repeat, V=2); writes to a "
                             "temporary file unless --out is given")
    parser.add_argument("--out", type=Path, default=RESULTS / "embed_throughput.json")
    parser.add_argument("--resummarize", type=Path, default=None,
                        help="recompute medians/ratios of a stored result JSON in place (no measuring)")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.views, args.repeats, args.batch_size, args.shard_size = 128, 2, 1, 64, 64
        if args.out == RESULTS / "embed_throughput.json":
            args.out = Path(tempfile.gettempdir()) / "cifd-bench-smoke" / "embed_throughput.json"
    if args.resummarize is not None:
        import json

        stored = json.loads(args.resummarize.read_text())
        summarize(stored, images=stored["setup"]["inputs_shape"][0], repeats=stored["params"]["repeats"])
        args.resummarize.write_text(json.dumps(stored, indent=2) + "\n")
        print(f"ratios: {stored['ratios']}\npaired: {stored['paired_ratios']}\nclaim: {stored['claim']}")
        return

    from pipeline.cache.inspect import cache_info
    from pipeline.data.shards import load_manifest, load_split
    from pipeline.data.preprocess import Preprocess, render_inputs
    from pipeline.models import load_model

    logging.getLogger("distributed").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"benchmark": "embed_throughput", "machine": machine_info(args.threads),
                              "params": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                         "teacher": "cifar10-resnet56 (pipeline.models.cifar_resnet:resnet56)",
                                         "dataset": "CIFAR-10 JPEG train.tar, stratified subset",
                                         "view_policy": "EmbedConfig default (rrc, scale 0.35-1, flip)",
                                         "logits_dtype": "float32", "chunk_rows": 64}}
    with tempfile.TemporaryDirectory(prefix="cifd-bench-embed-") as tmp_name:
        tmp = Path(tmp_name)
        prep, prep_s = prepare_cifar(tmp / "shards", train=args.images, val=64, samples_per_shard=args.shard_size)
        teacher = tmp / "teacher.pt"
        save_teacher(teacher)
        manifest = load_manifest(tmp / "shards")
        model, spec = load_model(str(teacher))
        model = model.eval()
        preprocess = Preprocess.from_spec(spec, source=str(teacher))
        block = load_split(manifest, "train")
        n = len(block.images)
        inputs = render_inputs(torch.from_numpy(block.stacked()),
                               preprocess.clean_views(torch.from_numpy(block.sizes)), preprocess=preprocess)
        # Kept as render_inputs returns them (channels-last strides for exact-copy views), which
        # is what the stage feeds the teacher.
        result["setup"] = {"prepare_s": round(prep_s, 2), "prepare": prep, "inputs_shape": list(inputs.shape),
                           "inputs_channels_last": inputs.is_contiguous(memory_format=torch.channels_last)}
        print(f"prepared {n} images in {prep_s:.1f}s; load average {os.getloadavg()}", flush=True)

        common = dict(manifest=manifest, teacher=teacher, threads=args.threads, batch_size=args.batch_size)
        bare_s: list[float] = []
        runs: dict[str, list[dict[str, Any]]] = {}
        bare_logits = None

        def bare() -> None:
            nonlocal bare_logits
            seconds, bare_logits = bare_forward(model, inputs, batch_size=args.batch_size)
            bare_s.append(seconds)
            print(f"bare forward: {n / seconds:.1f} img/s", flush=True)

        def stage(tag: str, views: int, scheduler: str) -> None:
            r = run_stage(store=tmp / f"{tag}.zarr", views=views, scheduler=scheduler, **common)
            runs.setdefault(tag, []).append(r)
            print(f"{tag}: {r['images_per_s']:.1f} img/s, {r['views_per_s']:.1f} views/s "
                  f"(wall {r['wall_s']:.1f}s, phases {r['phases_s']})", flush=True)

        # Interleaved, so slow drifts of the shared machine's load hit every variant alike.
        for _ in range(args.repeats):
            bare()
            stage("v1_synchronous", 1, "synchronous")
            stage("v1_local", 1, "local")
        stage(f"v{args.views}_synchronous", args.views, "synchronous")
        stage(f"v{args.views}_local", args.views, "local")
        bare()
        small = forward_by_batch(model, inputs, sizes=(16, args.batch_size))
        print(f"seconds per forward call by batch size: {small}", flush=True)
        startup = cluster_startup(args.threads)
        print(f"cluster startup: {startup}", flush=True)
        profile = None
        if not args.no_breakdown:
            profile = cprofile_run(top=args.cprofile, store=tmp / "profile.zarr", views=1, scheduler="synchronous",
                                   **common)
            print(f"breakdown (cProfile'd V=1 synchronous run): {profile['parts_share']}", flush=True)

        # Outputs agree with the bare forward (same computation), and bytes per sample per view.
        import zarr
        checks, sizes = {}, {}
        for tag in ("v1_synchronous", f"v{args.views}_synchronous"):
            store = tmp / f"{tag}.zarr"
            cached = np.asarray(zarr.open_group(store, mode="r")["train"]["logits"][:, 0])
            checks[tag] = float((torch.from_numpy(cached) - bare_logits).abs().max())
            info = cache_info(store)["splits"]["train"]
            sizes[tag] = {"bytes_per_sample_view_raw": info["bytes_per_sample_view_raw"],
                          "bytes_per_sample_view_stored": info["bytes_per_sample_view_stored"],
                          "compression_ratio": round(info["bytes_per_sample_view_raw"]
                                                     / info["bytes_per_sample_view_stored"], 3)}

    result["timings"] = {
        "bare_forward": {"seconds": [round(x, 3) for x in bare_s]},
        "stage_runs": runs,
        "cluster_startup": startup,
        # Seconds of one embed+classify call (median of 3) per batch size. On a CPU shared with
        # other work, more torch threads than idle cores add a fixed cost per call (every op
        # waits at a thread barrier), which makes small calls (the probe) expensive.
        "forward_call_s_by_batch": small,
    }
    summarize(result, images=n, repeats=args.repeats)
    result["bytes_per_sample_view"] = sizes
    result["checks"] = {"max_abs_logit_diff_cache_view0_vs_bare": checks}
    if profile is not None:
        result["breakdown_v1_synchronous"] = profile
    path = write_result(args.out, result)
    print(f"ratios: {result['ratios']}\npaired: {result['paired_ratios']}\nwrote {path}")


if __name__ == "__main__":
    main()
