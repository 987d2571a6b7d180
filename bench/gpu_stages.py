"""Stage one (``embed``) and stage three (``distill``) on a GPU, full CIFAR-10: the device check.

Three steps, each its own process and JSON file, sharing a work folder (``--work``), so that
``bench/gpu_check.sh`` can give each a hard time limit and a failed step leaves the others':

``prepare``: the ``prepare`` stage's own code (``prepare_dataset``) on the CIFAR-10 JPEG tars:
    all 50,000 train images, test.tar as val; seconds and images/s.
``embed``: the pretrained ResNet-56 saved with a ``preprocess`` spec (``save_teacher``);
    (a) bare forward (``embed`` + ``classify``, ``inference_mode``, fp32) on clean views held
    on the device, and (b) ``run_embed`` (synchronous, on the device, V views ``pad_crop``):
    images/s, views/s, the stage over the bare forward per teacher forward, peak GPU memory;
    (c) ``run_embed`` again with ``embed.logits: from_head`` (no logits stored: the head is in
    the cache), wall seconds and, for both caches, bytes per sample per view on disk.
``distill``: the ``rdm`` stage (``stages.rdm.run``, ``--rdm-epochs``), then a ResNet-8 student
    through ``stages.distill.build_inputs`` + ``train_student`` (``distill.data: memory``, bf16
    autocast, channels-last): KD and CIFD for ``--epochs`` epochs each (train seconds per
    epoch from the ``on_step`` hook, epoch seconds with the val pass from ``on_epoch``,
    images/s, ``torch.cuda.max_memory_allocated``, val top-1), and in the same run one epoch
    of (c) online KD (the teacher run on every batch's views, as ``distill_throughput.py``
    does it), (d) KD in fp32 without channels-last and (e) KD from the from_head cache (the
    teacher logits made on the device from the held embeddings through the head, every
    batch); ratios cached/online, bf16+channels-last/fp32 and from_head/stored.

    python3 bench/gpu_stages.py prepare --work /tmp/cifd-gpu --out $OUT/prepare.json
    python3 bench/gpu_stages.py embed   --work /tmp/cifd-gpu --out $OUT/embed.json
    python3 bench/gpu_stages.py distill --work /tmp/cifd-gpu --out $OUT/distill.json

``--device cpu`` with small ``--train``/``--val``/``--epochs`` is the CPU smoke test
(``bash bench/gpu_check.sh --smoke``, run by ``tests/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from _common import CIFAR_TEST, machine_info, median, prepare_cifar, save_teacher, write_result  # noqa: E402

pc = time.perf_counter
STUDENT = "pipeline.models.cifar_resnet:resnet8"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def _paths(work: Path) -> Any:
    from schemas.config import Paths

    return Paths(shards=str(work / "shards"), teacher=str(work / "teacher.pt"), cache=str(work / "teacher.zarr"),
                 rdm_models=str(work / "rdm.pt"), rdm_cache=str(work / "rdm.zarr"),
                 students=str(work / "students"), metrics=str(work / "metrics"), plots=str(work / "plots"))


def _configs(args: argparse.Namespace) -> dict[str, Any]:
    """The stage configs of this check (the GPU preset's, shortened)."""
    from schemas.config import DistillConfig, EmbedConfig, OptimConfig, RdmConfig, ViewPolicyConfig

    policy = ViewPolicyConfig(kind="pad_crop", pad=4, flip=True)
    return {
        "embed": EmbedConfig(views=args.views, policy=policy, batch_size=args.embed_batch_size,
                             chunk_rows=args.chunk_rows,
                             scheduler="synchronous", workers=1, threads_per_worker=args.threads,
                             device=args.device),
        "rdm": RdmConfig(epochs=args.rdm_epochs, threads=args.threads, device=args.device),
        "distill": DistillConfig(methods=("ce", "kd", "dgkd", "cifd"), student=STUDENT, epochs=args.epochs,
                                 batch_size=args.batch_size,
                                 optim=OptimConfig(name="sgd", lr=0.05, weight_decay=0.0005),
                                 temperature=2.0, data="memory", amp=True, channels_last=True,
                                 device=args.device, threads=args.threads, seed=0),
    }


def _write_params(work: Path, args: argparse.Namespace) -> Path:
    cfgs = _configs(args)
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump({"paths": _paths(work).to_dict(),
                                      **{k: v.to_dict() for k, v in cfgs.items()}}, sort_keys=False))
    return params


def _result(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    machine = machine_info(args.threads, device)
    machine["cpus_usable"] = len(os.sched_getaffinity(0))
    return {"benchmark": f"gpu_stages.{name}", "machine": machine,
            "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}


# ------------------------------------------------------------------ prepare

def step_prepare(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cpu")
    result = _result("prepare", args, device)
    shutil.rmtree(args.work / "shards", ignore_errors=True)
    report, seconds = prepare_cifar(args.work / "shards", train=args.train, val=args.val,
                                    samples_per_shard=args.shard_size, val_source=CIFAR_TEST)
    n = sum(report["num_samples"].values())
    result["prepare"] = {**report, "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1)}
    print(f"prepare: {report['num_samples']} in {seconds:.1f}s ({n / seconds:.0f} images/s)", flush=True)
    return result


# ------------------------------------------------------------------ embed

def step_embed(args: argparse.Namespace) -> dict[str, Any]:
    import pipeline.cache.embed as E
    from pipeline.data.preprocess import Preprocess, render_inputs
    from pipeline.evaluate import sizes_of
    from pipeline.data.shards import load_manifest, read_shard
    from pipeline.models import load_model
    from pipeline.runtime import resolve_device

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    result = _result("embed", args, device)
    cfg = _configs(args)["embed"]
    result["embed_config"] = cfg.to_dict()
    teacher_path = args.work / "teacher.pt"
    save_teacher(teacher_path)
    _write_params(args.work, args)
    manifest = load_manifest(args.work / "shards")

    # (a) bare forward, fp32, on clean views already on the device (the stage's ceiling)
    model, spec = load_model(str(teacher_path))
    model = model.to(device).eval()
    preprocess = Preprocess.from_spec(spec, source=str(teacher_path))
    blocks = []  # the first shards only: decoding all 50,000 images here would double the decode time
    for shard in manifest.split("train")["shards"]:
        if sum(len(b) for b in blocks) >= args.bare_images:
            break
        blocks.append(read_shard(manifest.root / shard["file"], mode=manifest.mode,
                                 start=shard["start"], stop=shard["stop"]).stacked())  # CIFAR: one size
    images = torch.from_numpy(np.concatenate(blocks)[:args.bare_images]).to(device)
    n = len(images)
    x = render_inputs(images, preprocess.clean_views(sizes_of(images)).to(device), preprocess=preprocess)
    bs = cfg.batch_size
    runs = []
    with torch.inference_mode():
        model.classify(model.embed(x[:bs]))  # warm-up (cuDNN algorithm choice)
        for _ in range(3):
            _sync(device)
            began = pc()
            for start in range(0, n, bs):
                model.classify(model.embed(x[start:start + bs]))
            _sync(device)
            runs.append(pc() - began)
    bare_rate = n / median(runs)
    result["bare_forward"] = {"images": n, "batch_size": bs, "seconds": [round(r, 4) for r in runs],
                              "images_per_s": round(bare_rate, 1)}
    print(f"bare forward: {bare_rate:.0f} images/s (fp32, batch {bs})", flush=True)
    del model, x, images

    # (b) the stage
    shutil.rmtree(args.work / "teacher.zarr", ignore_errors=True)
    marks: list[float] = []
    E._load_teacher.cache_clear()
    _reset_memory(device)
    began = pc()
    report = E.run_embed(settings=cfg, manifest=manifest, teacher_path=teacher_path,
                         store_path=args.work / "teacher.zarr", progress=lambda count, desc: marks.append(pc()))
    wall = pc() - began
    rows = report.written_rows
    steady = (marks[-1] - marks[1]) if len(marks) > 2 else float("nan")
    steady_rows = rows - manifest.split("train")["shards"][0]["stop"] if len(marks) > 2 else 0
    result["stage"] = {
        "rows (train + val)": rows, "views": cfg.views, "teacher_forwards": report.teacher_forwards,
        "shards": report.written_shards, "wall_s": round(wall, 2),
        "setup_s": round(marks[0] - began, 2) if marks else None,
        "images_per_s": round(rows / wall, 1), "views_per_s": round(report.teacher_forwards / wall, 1),
        # Shards 2..k: without set-up and the first shard (teacher load, cuDNN warm-up).
        "steady_views_per_s": round(steady_rows * cfg.views / steady, 1) if steady_rows else None,
        "peak_gpu_mib": _peak_mib(device),
    }
    result["ratios"] = {"stage_views_per_s_over_bare": round(report.teacher_forwards / wall / bare_rate, 4)}
    if steady_rows:
        result["ratios"]["stage_steady_over_bare"] = round(steady_rows * cfg.views / steady / bare_rate, 4)
    print(f"embed stage: {rows} rows x V={cfg.views} in {wall:.1f}s ({rows / wall:.0f} images/s, "
          f"{report.teacher_forwards / wall:.0f} views/s); ratios {result['ratios']}", flush=True)

    # (c) the same stage writing a compact cache: logits: from_head (issue 12, item 3)
    from pipeline.cache.inspect import cache_info

    shutil.rmtree(args.work / "teacher_from_head.zarr", ignore_errors=True)
    E._load_teacher.cache_clear()
    _reset_memory(device)
    began = pc()
    compact = E.run_embed(settings=dataclasses.replace(cfg, logits="from_head"), manifest=manifest,
                          teacher_path=teacher_path, store_path=args.work / "teacher_from_head.zarr")
    wall_c = pc() - began
    sizes = {name: cache_info(args.work / name)["splits"]["train"]
             for name in ("teacher.zarr", "teacher_from_head.zarr")}
    result["stage_from_head"] = {
        "wall_s": round(wall_c, 2), "views_per_s": round(compact.teacher_forwards / wall_c, 1),
        "peak_gpu_mib": _peak_mib(device),
        "bytes_per_sample_view_on_disk": {
            f"stored_{cfg.logits_dtype}": sizes["teacher.zarr"]["bytes_per_sample_view_stored"],
            "from_head": sizes["teacher_from_head.zarr"]["bytes_per_sample_view_stored"]},
        "bytes_per_sample_view_by_choice": sizes["teacher.zarr"]["bytes_per_sample_view_by_choice"],
    }
    print(f"embed stage, from_head: {wall_c:.1f}s; bytes/sample/view on disk "
          f"{result['stage_from_head']['bytes_per_sample_view_on_disk']}", flush=True)
    return result


# ------------------------------------------------------------------ distill

def _train(inputs: Any, *, epochs: int, source: Any = None) -> dict[str, Any]:
    """``train_student`` for ``epochs`` epochs; per-epoch train seconds (to the last step's
    ``on_step``, synced) and epoch seconds (to ``on_epoch``, with the val pass)."""
    from pipeline.train.distill import train_student

    run = dataclasses.replace(inputs.run, checkpoint=None,
                              loop=dataclasses.replace(inputs.run.loop, epochs=epochs))
    device = run.device
    batches = source if source is not None else inputs.batches
    steps = batches.steps
    train_s: list[float] = []
    epoch_s: list[float] = []
    rows = [0]
    began = [0.0]

    def on_step(info: Any) -> None:
        rows[0] += len(info.rows)
        if info.step == steps - 1:
            _sync(device)
            train_s.append(pc() - began[0])

    def on_epoch(log: Any) -> None:
        epoch_s.append(pc() - began[0])
        print(f"  epoch {log.epoch}: train {train_s[-1]:.2f}s, epoch {epoch_s[-1]:.2f}s, loss {log.train_loss:.3f}, "
              f"val top-1 {log.val_top1:.4f}", flush=True)
        began[0] = pc()

    _reset_memory(device)
    _sync(device)
    began[0] = pc()
    history = train_student(inputs.student, run=run, info=inputs.info, batches=batches, val=inputs.val,
                            on_epoch=on_epoch, on_step=on_step)
    per_epoch = rows[0] / len(train_s)
    later = train_s[1:] or train_s  # epoch 1 includes cuDNN's algorithm search
    return {
        "epochs": epochs, "steps_per_epoch": steps, "images_per_epoch": int(per_epoch),
        "train_s_per_epoch": [round(t, 3) for t in train_s], "epoch_s_with_val": [round(t, 3) for t in epoch_s],
        "images_per_s": round(per_epoch / median(later), 1),
        "images_per_s_first_epoch": round(per_epoch / train_s[0], 1),
        "peak_gpu_mib": _peak_mib(device),
        "val_top1": [round(h.val_top1, 4) for h in history],
        "val_agreement": [round(h.val_agreement, 4) for h in history],
        "train_loss": [round(h.train_loss, 4) for h in history],
    }


def step_distill(args: argparse.Namespace) -> dict[str, Any]:
    import stages.rdm as stage_rdm
    from distill_throughput import OnlineTeacher, RunState
    from pipeline.data.preprocess import Preprocess
    from pipeline.models import load_model
    from pipeline.runtime import resolve_device
    from stages.distill import build_inputs

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    result = _result("distill", args, device)
    params = _write_params(args.work, args)
    cfgs = _configs(args)
    result["distill_config"] = cfgs["distill"].to_dict()
    result["rdm_config"] = cfgs["rdm"].to_dict()
    began = pc()
    with contextlib.redirect_stderr(open(os.devnull, "w")):  # the stage's progress bar
        stage_rdm.run(params)
    result["rdm_stage_s"] = round(pc() - began, 2)
    print(f"rdm stage ({args.rdm_epochs} epoch(s)): {result['rdm_stage_s']}s", flush=True)
    torch.set_num_threads(args.threads)
    paths = _paths(args.work)
    variants: dict[str, Any] = {}
    result["variants"] = variants

    def save() -> None:  # after every variant: a later failure keeps what was measured
        write_result(args.out, copy.deepcopy(result))

    built: dict[str, Any] = {}  # method -> (inputs, initial student state): decoding 60k JPEGs is slow
    from_head = dataclasses.replace(paths, cache=str(args.work / "teacher_from_head.zarr"))

    def inputs_for(method: str, cache_paths: Any = paths) -> Any:
        key = f"{method}@{cache_paths.cache}"
        if key not in built:
            began = pc()
            inputs = build_inputs(cache_paths, cfgs["distill"], method, device=device)
            built[key] = (inputs, copy.deepcopy(inputs.student.state_dict()), round(pc() - began, 2))
        inputs, init, _ = built[key]
        inputs.student.load_state_dict(init)
        return inputs

    def run_variant(name: str, method: str, *, epochs: int, fp32: bool = False, online: bool = False,
                    cache_paths: Any = paths) -> None:
        try:
            inputs = inputs_for(method, cache_paths)
            source = None
            if fp32:  # the same inputs, without bf16 autocast and channels-last
                inputs = copy.copy(inputs)
                inputs.run = dataclasses.replace(inputs.run, loop=dataclasses.replace(
                    inputs.run.loop, amp=False, channels_last=False))
                inputs.student.to(memory_format=torch.contiguous_format)
            elif inputs.run.loop.channels_last:
                inputs.student.to(memory_format=torch.channels_last)
            if online:
                teacher, teacher_spec = load_model(paths.teacher)
                teacher = teacher.to(device).eval().requires_grad_(False)
                if inputs.run.loop.channels_last:
                    teacher = teacher.to(memory_format=torch.channels_last)
                state = RunState(name=name, device=device, check={})
                cached = inputs.targets.teacher_logits.clone()
                source = OnlineTeacher(inputs.batches, teacher=teacher, cached=cached,
                                       run=inputs.run, state=state,
                                       teacher_preprocess=Preprocess.from_spec(teacher_spec, source=paths.teacher))
            loop = inputs.run.loop
            print(f"{name} ({method}, amp {loop.amp}, channels_last {loop.channels_last}):", flush=True)
            out = _train(inputs, epochs=epochs, source=source)
            out["build_inputs_s"] = built[f"{method}@{cache_paths.cache}"][2]
            if online:
                out["checks"] = state.check
            variants[name] = out
            print(f"{name}: {out['images_per_s']} images/s, peak {out['peak_gpu_mib']} MiB", flush=True)
        except Exception as exc:  # one variant's failure is recorded; the others still run
            variants[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{name} FAILED: {exc!r}", flush=True)
        save()

    run_variant("kd", "kd", epochs=args.epochs)
    run_variant("online_kd", "kd", epochs=1, online=True)
    run_variant("kd_fp32", "kd", epochs=1, fp32=True)
    built.clear()  # free the device before the next inputs
    if Path(from_head.cache).is_dir():  # the embed step wrote it
        run_variant("kd_from_head", "kd", epochs=args.epochs, cache_paths=from_head)
        built.clear()
    run_variant("cifd", "cifd", epochs=args.epochs)

    def rate(name: str, first: bool = False) -> float | None:
        v = variants.get(name, {})
        return v.get("images_per_s_first_epoch" if first else "images_per_s")

    ratios: dict[str, Any] = {}
    # online_kd and kd_fp32 run one epoch: compare with KD's first epoch (both include warm-up).
    for key, a, b in (("kd_over_online_kd (first epochs)", "kd", "online_kd"),
                      ("cifd_over_online_kd (first epochs)", "cifd", "online_kd"),
                      ("bf16_channels_last_over_fp32 kd (first epochs)", "kd", "kd_fp32")):
        ra, rb = rate(a, first=True), rate(b, first=True)
        ratios[key] = round(ra / rb, 4) if ra and rb else None
    for key, a, b in (("cifd_over_kd", "cifd", "kd"), ("kd_from_head_over_kd", "kd_from_head", "kd")):
        ra, rb = rate(a), rate(b)
        ratios[key] = round(ra / rb, 4) if ra and rb else None
    result["ratios"] = ratios
    print(f"ratios: {ratios}", flush=True)
    return result


# ------------------------------------------------------------------ main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("prepare", "embed", "distill"))
    parser.add_argument("--work", type=Path, required=True, help="folder shared by the steps")
    parser.add_argument("--out", type=Path, required=True, help="JSON result file of this step")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, default=4, help="torch CPU threads")
    parser.add_argument("--train", type=int, default=50000, help="train images (default all 50,000)")
    parser.add_argument("--val", type=int, default=10000, help="val images from test.tar (default all 10,000)")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--chunk-rows", type=int, default=250, help="embed.chunk_rows (divides --shard-size)")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--embed-batch-size", type=int, default=1000)
    parser.add_argument("--bare-images", type=int, default=10000, help="images of the bare forward")
    parser.add_argument("--rdm-epochs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="KD and CIFD epochs")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    began = pc()
    result = {"prepare": step_prepare, "embed": step_embed, "distill": step_distill}[args.step](args)
    result["step_wall_s"] = round(pc() - began, 2)
    write_result(args.out, result)
    print(f"wrote {args.out} ({result['step_wall_s']}s)", flush=True)


if __name__ == "__main__":
    main()
