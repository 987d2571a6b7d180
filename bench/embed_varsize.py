"""Stage one (``embed``) on images of many sizes against the bare teacher forward, in one run.

Data: the real CIFAR-10 photos upscaled to a seeded random size each (shorter side 40–400 px,
aspect 3:4–4:3, JPEG q90) by ``studies/varsize_cifar.py``, made into shards by the ``prepare``
stage's own ``prepare_dataset`` (ImageFolder tars: train.tar → train, test.tar → val; the
manifest's ``image_shape`` is None, so the stage renders image by image on the host). Teacher:
the pretrained CIFAR-10 ResNet-56 frozen with ``save_model`` and a ``preprocess`` spec (32×32,
``crop_pct`` 1, bilinear, ImageNet mean/std), as the other benchmarks do. On the same images
and the same view boxes, each round measures:

(a) stage: ``run_embed`` (``scheduler="synchronous"``, one process, V views of the
    ``EmbedConfig`` default policy, random-resized crop + flip), wall time from the call to its
    return (setup, every shard, finalize), images/s and views/s; "steady" counts shards 2..k;
(b) parts, timed directly around the functions the stage calls, shard by shard, in the
    stage's order and batching (``teacher_outputs``): the tar read
    (``pipeline.data.sources.iter_tar_samples``), the sha256 check (``content_hash``), the JPEG
    decode (``pipeline.data.shards.decode_image``, PIL), the crop/resize/normalise
    (``render_inputs`` on the list of decoded images of each batch, with the view boxes the
    stage stored), and the teacher forward (``model.embed`` + ``model.classify`` under
    ``inference_mode``) on those pre-decoded, pre-rendered inputs: the bare forward, the
    network alone.

Ratios: stage over bare per teacher forward (stage views/s over bare forwards/s; 1.0 means
the stage costs nothing beyond the network; this equals the forward's share of the stage's
wall time), and each part's share of the stage's wall time (decode, crop/resize; the rest is
setup, teacher load, write_rows and bookkeeping). ``paired``
ratios divide within a round. The same measurement runs on the same-size 32×32 CIFAR-10 set
(``prepare_cifar``, as many train images; rendered as one batch) for reference, unless
``--no-same-size``. A check compares the stage's stored logits with the bare forward's.

    uv run python bench/embed_varsize.py            # 2,000 train images, about 3.5 min on a 2-core CPU
    uv run python bench/embed_varsize.py --smoke    # a tiny run (about 30 s), to a temp file
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import ROOT, RESULTS, machine_info, median, prepare_cifar, save_teacher, write_result  # noqa: E402

pc = time.perf_counter
VARSIZE_SCRIPT = ROOT / "studies" / "varsize_cifar.py"


# ------------------------------------------------------------------ data

def make_varsize(out: Path, *, train: int, val: int, seed: int) -> tuple[dict[str, Any], float]:
    """The variable-size ImageFolder tars (``studies/varsize_cifar.py``); its sizes.json."""
    import json

    began = pc()
    subprocess.run([sys.executable, str(VARSIZE_SCRIPT), "--out", str(out), "--limit-train", str(train),
                    "--limit-test", str(val), "--seed", str(seed)], check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "sizes.json").read_text()), pc() - began


def prepare_varsize(src: Path, out: Path, *, samples_per_shard: int) -> tuple[dict[str, Any], float]:
    from pipeline.data.prepare import prepare_dataset
    from schemas.config import PrepareConfig

    cfg = PrepareConfig(source="imagefolder", train=str(src / "train.tar"), val=str(src / "test.tar"),
                        samples_per_shard=samples_per_shard)
    began = pc()
    report = prepare_dataset(cfg, out)
    return {"num_samples": report.num_samples, "num_classes": report.num_classes, "same_size": report.same_size,
            "num_reencoded": report.num_reencoded, "manifest_sha256": report.manifest_sha256}, pc() - began


def size_summary(manifest: Any, split: str) -> dict[str, Any]:
    sizes = manifest.sizes(split)
    short, long = sizes.min(1), sizes.max(1)
    pixels = sizes.prod(1)
    shard_bytes = sum((manifest.root / s["file"]).stat().st_size for s in manifest.split(split)["shards"])
    return {
        "image_shape (manifest)": manifest.image_shape,
        "images": len(sizes),
        "distinct_sizes": len({tuple(s) for s in sizes.tolist()}),
        "shorter_side_min_median_max": [int(short.min()), float(np.median(short)), int(short.max())],
        "longer_side_min_median_max": [int(long.min()), float(np.median(long)), int(long.max())],
        "megapixels_mean": round(float(pixels.mean()) / 1e6, 4),
        "shard_bytes": shard_bytes,
        "shard_bytes_per_image": round(shard_bytes / max(len(sizes), 1), 1),
    }


# ------------------------------------------------------------------ (b) the parts, timed directly

@torch.inference_mode()
def parts(manifest: Any, *, views: np.ndarray, model: Any, preprocess: Any, batch_size: int) -> dict[str, Any]:
    """Time what the stage's worker does to every shard of ``train``, function by function,
    with the stage's batching (``pipeline.cache.embed.teacher_outputs``: the shard's n·V
    (image, view) pairs in order, ``batch_size`` at a time; same-size images rendered as one
    batch, others as a list). ``views`` (N, V, 5): the boxes the stage stored. Returns
    seconds per part and the bare forward's logits (N, V, C)."""
    from pipeline.data.preprocess import render_inputs
    from pipeline.data.shards import content_hash, decode_image
    from pipeline.data.sources import iter_tar_samples
    from schemas.layout import IMAGE_EXTS

    same_size = manifest.image_shape is not None
    seconds = dict.fromkeys(("tar_read", "hash", "decode", "render", "forward"), 0.0)
    logits = []
    n_forwards = 0
    warm = False
    for shard in manifest.split("train")["shards"]:
        a, b = shard["start"], shard["stop"]
        t0 = pc()
        samples = list(iter_tar_samples(manifest.root / shard["file"]))
        t1 = pc()
        data = [next(s[e] for e in IMAGE_EXTS if e in s) for s in samples]
        for d in data:
            content_hash(d)
        t2 = pc()
        images = [decode_image(d, mode=manifest.mode, where=f"{shard['file']} {i}") for i, d in enumerate(data)]
        t3 = pc()
        seconds["tar_read"] += t1 - t0
        seconds["hash"] += t2 - t1
        seconds["decode"] += t3 - t2
        # As embed_shard + teacher_outputs: a list of host images, or one stacked batch.
        held: torch.Tensor | list[torch.Tensor] = [torch.from_numpy(im) for im in images]
        if same_size:
            held = torch.from_numpy(np.stack(images))
        v = views[a:b]
        n, nv = v.shape[:2]
        rows = torch.arange(n).repeat_interleave(nv)
        flat = torch.from_numpy(np.ascontiguousarray(v.reshape(n * nv, -1)))
        xs = []
        t0 = pc()
        for start in range(0, n * nv, batch_size):
            sel = slice(start, start + batch_size)
            batch = held[rows[sel]] if same_size else [held[r] for r in rows[sel].tolist()]
            xs.append(render_inputs(batch, flat[sel], preprocess=preprocess))
        seconds["render"] += pc() - t0
        if not warm:  # oneDNN primitives, as the stage's probe warms them
            model.classify(model.embed(xs[0]))
            warm = True
        out = []
        t0 = pc()
        for x in xs:
            out.append(model.classify(model.embed(x)).float())
        seconds["forward"] += pc() - t0
        n_forwards += n * nv
        logits.append(torch.cat(out).view(n, nv, -1))
    return {"seconds": seconds, "forwards": n_forwards, "logits": torch.cat(logits)}


# ------------------------------------------------------------------ one data set

class DataSet:
    """One data set's shards, its teacher and the raw timings of its rounds."""

    def __init__(self, tag: str, *, manifest: Any, teacher: Path, store: Path) -> None:
        from pipeline.data.preprocess import Preprocess
        from pipeline.models import load_model

        self.tag, self.manifest, self.teacher, self.store = tag, manifest, teacher, store
        model, spec = load_model(str(teacher))
        self.model = model.eval()
        self.preprocess = Preprocess.from_spec(spec, source=str(teacher))
        self.n = manifest.split("train")["num_samples"]
        self.stage_runs: list[dict[str, Any]] = []
        self.part_runs: list[dict[str, float]] = []
        self.check: float | None = None

    def round(self, args: argparse.Namespace, label: str) -> None:
        """The stage, then its parts on the same images and the view boxes it stored."""
        import zarr

        from embed_throughput import run_stage

        s = run_stage(manifest=self.manifest, teacher=self.teacher, store=self.store, views=args.views,
                      scheduler="synchronous", threads=args.threads, batch_size=args.batch_size)
        torch.set_num_threads(args.threads)
        group = zarr.open_group(self.store, mode="r")["train"]
        p = parts(self.manifest, views=np.asarray(group["views"][:]), model=self.model, preprocess=self.preprocess,
                  batch_size=args.batch_size)
        if self.check is None:
            cached = torch.from_numpy(np.asarray(group["logits"][:]).astype(np.float32))
            self.check = float((cached - p["logits"]).abs().max())
        sec = p["seconds"]
        self.stage_runs.append(s)
        self.part_runs.append({k: round(v, 4) for k, v in sec.items()})
        print(f"[{self.tag} {label}] stage {s['images_per_s']:.1f} img/s ({s['views_per_s']:.1f} views/s, "
              f"wall {s['wall_s']:.1f}s); bare forward {p['forwards'] / sec['forward']:.1f} forwards/s; "
              f"decode {sec['decode']:.2f}s, render {sec['render']:.2f}s, forward {sec['forward']:.2f}s "
              f"(load {os.getloadavg()[0]:.2f})", flush=True)

    def summary(self, views: int) -> dict[str, Any]:
        return summarize(self.tag, n=self.n, views=views, stage_runs=self.stage_runs, part_runs=self.part_runs,
                         check=self.check)


def summarize(tag: str, *, n: int, views: int, stage_runs: list[dict[str, Any]], part_runs: list[dict[str, float]],
              check: float | None) -> dict[str, Any]:
    forwards = n * views
    wall = median([s["wall_s"] for s in stage_runs])
    steady = [s["steady_views_per_s"] for s in stage_runs if s["steady_views_per_s"]]
    med = {k: median([p[k] for p in part_runs]) for k in part_runs[0]}
    bare_rate = forwards / med["forward"]  # teacher forwards/s on pre-decoded, pre-rendered inputs
    stage_views = forwards / wall
    shares = {f"{k}_share_of_stage": round(v / wall, 4) for k, v in med.items()}
    shares["rest_share_of_stage (setup, load, write_rows, checks, bookkeeping)"] = round(
        1.0 - sum(med.values()) / wall, 4)
    paired = [p["forward"] / s["wall_s"] for s, p in zip(stage_runs, part_runs)]
    return {
        "dataset": tag, "images": n, "views": views, "teacher_forwards_per_run": forwards,
        "raw": {"stage_runs": stage_runs, "parts_s": part_runs},
        "stage": {"median_wall_s": round(wall, 3), "images_per_s": round(n / wall, 2),
                  "views_per_s": round(stage_views, 2),
                  "steady_views_per_s": round(median(steady), 2) if steady else None},
        "bare_forward": {"median_s": round(med["forward"], 3), "forwards_per_s": round(bare_rate, 2),
                         f"images_per_s_at_V{views}": round(bare_rate / views, 2)},
        "parts_median_s": {k: round(v, 4) for k, v in med.items()},
        "parts_per_image_view_ms": {"decode (per image)": round(1e3 * med["decode"] / n, 4),
                                    "render (per image-view)": round(1e3 * med["render"] / forwards, 4),
                                    "forward (per image-view)": round(1e3 * med["forward"] / forwards, 4)},
        "shares": shares,
        "ratios": {
            "stage_over_bare (views/s over forwards/s)": round(stage_views / bare_rate, 4),
            "stage_over_bare_paired": {"each": [round(x, 4) for x in paired], "median": round(median(paired), 4)},
            **({"stage_steady_over_bare": round(median(steady) / bare_rate, 4)} if steady else {}),
            "decode_over_forward": round(med["decode"] / med["forward"], 4),
            "render_over_forward": round(med["render"] / med["forward"], 4),
            "decode_plus_render_over_forward": round((med["decode"] + med["render"]) / med["forward"], 4),
        },
        "checks": {"max_abs_logit_diff_stage_cache_vs_bare": check},
    }


# ------------------------------------------------------------------ main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=2000, help="train images, a multiple of 10 (default 2000)")
    parser.add_argument("--val", type=int, default=100,
                        help="val images (test.tar), a multiple of 10; prepared, not embedded (default 100)")
    parser.add_argument("--views", type=int, default=2, help="V, views per image (default 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core CPU, 2 threads wait at barriers)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of (stage, parts) per data set (default 2)")
    parser.add_argument("--batch-size", type=int, default=256, help="embed.batch_size (default 256)")
    parser.add_argument("--shard-size", type=int, default=256,
                        help="prepare.samples_per_shard, a multiple of embed.chunk_rows 64 (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="varsize_cifar.py's size seed (default 0)")
    parser.add_argument("--no-same-size", action="store_true",
                        help="skip the reference run on the same-size 32x32 CIFAR-10 set")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny check that the script runs (200 images, 1 repeat); writes to a temporary "
                             "file unless --out is given")
    parser.add_argument("--out", type=Path, default=RESULTS / "embed_varsize.json")
    args = parser.parse_args()
    command = shlex.join(["uv", "run", "python", "bench/embed_varsize.py", *sys.argv[1:]])
    if args.smoke:
        args.train, args.val, args.repeats, args.shard_size, args.batch_size = 200, 20, 1, 64, 64
        if args.out == RESULTS / "embed_varsize.json":
            args.out = Path(tempfile.gettempdir()) / "cifd-bench-smoke" / "embed_varsize.json"

    from distill_throughput import code_version
    from pipeline.data.shards import load_manifest
    from schemas.config import EmbedConfig

    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "benchmark": "embed_varsize", "command": command, "machine": machine_info(args.threads),
        "code": code_version(),
        "params": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "teacher": "cifar10-resnet56 (pipeline.models.cifar_resnet:resnet56), preprocess 32x32, "
                              "crop_pct 1.0, bilinear, ImageNet mean/std",
                   "scheduler": "synchronous (1 process)",
                   "view_policy": EmbedConfig().policy.to_dict(),
                   "varsize_data": "studies/varsize_cifar.py: CIFAR-10 photos upscaled bicubic, shorter side "
                                   "U[40, 400], aspect exp(U(log 3/4, log 4/3)), JPEG q90"},
    }
    with tempfile.TemporaryDirectory(prefix="cifd-bench-varsize-") as tmp_name:
        tmp = Path(tmp_name)
        teacher = tmp / "teacher.pt"
        save_teacher(teacher)
        sizes_json, make_s = make_varsize(tmp / "src", train=args.train, val=args.val, seed=args.seed)
        prep, prep_s = prepare_varsize(tmp / "src", tmp / "shards", samples_per_shard=args.shard_size)
        manifest = load_manifest(tmp / "shards")
        if manifest.image_shape is not None:
            raise SystemExit(f"the varsize set came out with one image shape {manifest.image_shape}")
        result["setup"] = {"varsize_cifar_s": round(make_s, 2), "varsize_sizes_json": sizes_json,
                           "prepare_s": round(prep_s, 2), "prepare": prep,
                           "train_images": size_summary(manifest, "train")}
        print(f"varsize set: {args.train} train images made in {make_s:.1f}s, prepared in {prep_s:.1f}s; "
              f"{result['setup']['train_images']}", flush=True)
        sets = [DataSet("varsize", manifest=manifest, teacher=teacher, store=tmp / "varsize.zarr")]
        if not args.no_same_size:
            prep_c, prep_c_s = prepare_cifar(tmp / "cifar", train=args.train, val=args.val,
                                             samples_per_shard=args.shard_size)
            cifar = load_manifest(tmp / "cifar")
            result["setup"]["same_size_cifar"] = {"prepare_s": round(prep_c_s, 2), "prepare": prep_c,
                                                  "train_images": size_summary(cifar, "train")}
            sets.append(DataSet("cifar32", manifest=cifar, teacher=teacher, store=tmp / "cifar32.zarr"))
        # Rounds alternate the data sets, so slow drifts of a shared machine's load hit both alike.
        for r in range(args.repeats):
            for d in sets:
                d.round(args, f"{r + 1}/{args.repeats}")
        datasets = {d.tag: d.summary(args.views) for d in sets}
    result["datasets"] = datasets
    v = datasets["varsize"]
    headline: dict[str, Any] = {
        "varsize_stage_images_per_s": v["stage"]["images_per_s"],
        "varsize_stage_views_per_s": v["stage"]["views_per_s"],
        "varsize_bare_forward_forwards_per_s": v["bare_forward"]["forwards_per_s"],
        "varsize_stage_over_bare": v["ratios"]["stage_over_bare (views/s over forwards/s)"],
        "varsize_stage_over_bare_paired": v["ratios"]["stage_over_bare_paired"]["median"],
        "varsize_decode_share_of_stage": v["shares"]["decode_share_of_stage"],
        "varsize_render_share_of_stage": v["shares"]["render_share_of_stage"],
    }
    if "cifar32" in datasets:
        c = datasets["cifar32"]
        headline.update({
            "cifar32_stage_over_bare": c["ratios"]["stage_over_bare (views/s over forwards/s)"],
            "cifar32_decode_share_of_stage": c["shares"]["decode_share_of_stage"],
            "cifar32_render_share_of_stage": c["shares"]["render_share_of_stage"],
            "varsize_stage_over_cifar32_stage (views/s)": round(v["stage"]["views_per_s"]
                                                                 / c["stage"]["views_per_s"], 4),
            "varsize_bare_over_cifar32_bare (forwards/s; same network and inputs size)": round(
                v["bare_forward"]["forwards_per_s"] / c["bare_forward"]["forwards_per_s"], 4),
        })
    result["headline"] = headline
    path = write_result(args.out, result)
    print("\n".join(f"{k}: {x}" for k, x in headline.items()) + f"\nwrote {path}", flush=True)


if __name__ == "__main__":
    main()
