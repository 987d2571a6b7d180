"""Cost of CIFD's teacher assistants (the ``rdm`` stage) against a TAKD assistant, in one run.

On one CIFAR-10 subset (train from train.tar, val from test.tar, V views) and the pretrained
ResNet-56 teacher, measures wall time of:

(a) the ``rdm`` stage itself (``stages.rdm.run``: read the cache, ``train_bank`` for E epochs,
    checkpoint, run every RDM over every cached view into ``rdm.zarr``, metrics, plot), then
    its parts again through the same library calls made by this script, with per-epoch
    times from ``train_bank``'s ``on_epoch`` hook;
(b) the ``embed`` stage (``stages.embed.run``) that builds the cache the RDMs train on;
(c) a TAKD teacher assistant: CIFAR ResNet-20 trained with Hinton KD from the ResNet-56 for
    the same E epochs, the teacher forward computed online at every step (no cache), on the
    images already decoded in memory (its cheapest form), augmented with the CIFAR
    pad-and-crop + flip through ``sample_views`` / ``render_inputs``.

Every part runs with the same torch thread count. The claim tested: the RDM stage costs well
under 1% of training an assistant. Ratios rdm/assistant (per epoch and total) and
rdm/embed go to the JSON, with a multiply-accumulate count of each network per sample.

    uv run python bench/rdm_cost.py            # defaults sized for a 2-core CPU
    uv run python bench/rdm_cost.py --smoke    # a tiny run (about 1 min), to a temp file
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import yaml  # noqa: E402

from _common import (  # noqa: E402
    CIFAR_TEST,
    RESULTS,
    Timer,
    machine_info,
    median,
    prepare_cifar,
    save_teacher,
    write_result,
)

pc = time.perf_counter
ASSISTANT = "pipeline.models.cifar_resnet:resnet20"


# ------------------------------------------------------------------ MAC counts

def conv_net_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward per sample (conv and linear layers)."""
    total = 0

    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += output[0].numel() * k
        elif isinstance(module, torch.nn.Linear):
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model.eval()(x[:1])
    for h in handles:
        h.remove()
    return total


def rdm_bank_macs(bank: torch.nn.Module) -> int:
    """Multiply-accumulates of the bank's linear layers per sample (all M RDMs together);
    the entropy model's per-channel elementwise work is not counted."""
    total = 0
    for name, p in bank.named_parameters():
        if name.endswith("weight") and not name.startswith("bottleneck."):
            total += p.numel()  # (M, out, in) stacked or (out, in): one MAC per weight per sample
    return total


# ------------------------------------------------------------------ (c) TAKD assistant

def train_assistant(*, teacher_path: Path, train: Any, val: Any, epochs: int, batch_size: int,
                    temperature: float, alpha: float, lr: float, seed: int) -> dict[str, Any]:
    from pipeline.data.preprocess import Preprocess, render_inputs
    from pipeline.data.views import sample_views
    from pipeline.evaluate import predict, sizes_of, top1
    from pipeline.losses import hinton_kd
    from pipeline.models import build_model, load_model
    from schemas.config import ViewPolicyConfig

    teacher, spec = load_model(str(teacher_path))
    teacher = teacher.eval()
    preprocess = Preprocess.from_spec(spec, source=str(teacher_path))
    torch.manual_seed(seed)
    student = build_model(ASSISTANT, num_classes=teacher.num_classes, in_chans=3)
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    policy = ViewPolicyConfig(kind="pad_crop", pad=4, flip=True)  # the CIFAR recipe TAKD uses
    generator = torch.Generator().manual_seed(seed)
    images, labels = torch.from_numpy(train.stacked()), torch.from_numpy(train.labels)  # CIFAR: one size
    val_images, val_labels = torch.from_numpy(val.stacked()), torch.from_numpy(val.labels)
    n, sizes = len(images), sizes_of(images)
    draw = dict(policy=policy, image_size=preprocess.image_size, crop_pct=preprocess.crop_pct, generator=generator)
    epochs_out = []
    for epoch in range(epochs):
        timer = Timer()
        began = pc()
        student.train()
        views = sample_views(sizes=sizes, num_views=2, **draw)[:, 1]
        order = torch.randperm(n, generator=generator)
        total, count = 0.0, 0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            t0 = pc()
            x = render_inputs(images[idx], views[idx], preprocess=preprocess)
            t1 = pc()
            with torch.no_grad():  # the teacher forward TAKD pays at every step
                z_t = teacher.classify(teacher.embed(x))
            t2 = pc()
            loss = hinton_kd(student_logits=student(x), teacher_logits=z_t, labels=labels[idx],
                             temperature=temperature, alpha=alpha).total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            t3 = pc()
            timer.add("render_inputs", t1 - t0)
            timer.add("teacher_forward", t2 - t1)
            timer.add("student_forward_backward_step", t3 - t2)
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        train_s = pc() - began
        t0 = pc()
        val_top1 = top1(predict(student, val_images, preprocess=preprocess, batch_size=512), val_labels)
        eval_s = pc() - t0
        epochs_out.append({"epoch": epoch + 1, "seconds": round(train_s + eval_s, 3), "train_s": round(train_s, 3),
                           "val_eval_s": round(eval_s, 3), "loss": round(total / max(count, 1), 4),
                           "val_top1": round(val_top1, 4), "parts": timer.as_dict()})
        print(f"assistant epoch {epoch + 1}: {train_s + eval_s:.1f}s (train {train_s:.1f}s), "
              f"loss {total / max(count, 1):.3f}, val top-1 {val_top1:.3f}", flush=True)
    x = render_inputs(images[:1], sample_views(sizes=sizes[:1], num_views=1, **draw)[:, 0], preprocess=preprocess)
    macs = {"teacher_forward": conv_net_macs(teacher.backbone, x),
            "assistant_forward": conv_net_macs(student.backbone, x)}
    return {"epochs": epochs_out, "macs_per_image": macs}


# ------------------------------------------------------------------ (a) rdm stage, and its parts

def run_rdm_stage(params: Path, *, scratch: Path) -> dict[str, Any]:
    """``stages.rdm.run`` as the CLI runs it (wall time), then its parts timed one by one
    through the same public library calls the stage makes, made here (``open_cache`` and
    ``embedding_set``; ``train_bank`` with its ``on_epoch`` hook for per-epoch times;
    ``evaluate_bank`` and ``cache_bank_outputs`` into a scratch store). The part run trains
    the same bank (same config and seed) a second time."""
    import contextlib

    import stages.rdm as R
    from pipeline.cache.rdm_store import cache_bank_outputs
    from pipeline.cache.reader import CacheExpectation, open_cache
    from pipeline.rd import RDMBank
    from pipeline.runtime import resolve_device
    from pipeline.train.rdm import RdmTrainSettings, embedding_set, evaluate_bank, train_bank
    from schemas import layout as L
    from schemas.config import RdmConfig, load_stage

    began = pc()
    with contextlib.redirect_stderr(open(os.devnull, "w")):  # the stage's progress bar
        R.run(params)
    wall = pc() - began

    paths, cfg = load_stage(params, "rdm", RdmConfig)
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    t0 = pc()
    cache = open_cache(paths.cache, CacheExpectation(teacher_sha256=None, manifest_sha256=None))
    train_split, val_split = cache.split("train"), cache.split("val")
    train_set = embedding_set(train_split, views=slice(None), device=device)
    val_set = embedding_set(val_split, views=slice(0, 1), device=device)
    scale = max(train_split.rms(L.EMBEDDINGS), 1e-12) if cfg.scale_embeddings else 1.0
    settings = RdmTrainSettings(
        rate_weights=cfg.rate_weights, ce_weight=cfg.ce_weight, kl_weight=cfg.kl_weight,
        temperature=cfg.temperature, distortion=cfg.distortion, epochs=cfg.epochs, batch_size=cfg.batch_size,
        eval_batch_size=cfg.eval_batch_size, lr=cfg.lr, pct_start=cfg.pct_start,
        density_lr_factor=cfg.density_lr_factor, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    bank = RDMBank(num_rdms=len(cfg.rate_weights), in_dim=train_split.embed_dim, hidden=cfg.hidden,
                   num_classes=train_split.num_classes, init_scale=cfg.init_scale,
                   generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    t1 = last = pc()
    epochs: list[dict[str, Any]] = []

    def on_epoch(log: Any) -> None:
        nonlocal last
        now = pc()
        epochs.append({"epoch": log.epoch, "seconds": round(now - last, 3), "loss": round(log.loss, 4),
                       "val_top1": [round(t, 4) for t in log.val.top1],
                       "val_rate_bits": [round(b, 2) for b in log.val.rate_bits]})
        last = now

    train_bank(bank, train=train_set, val=val_set, cfg=settings, scale=scale, on_epoch=on_epoch)
    t2 = pc()
    evaluate_bank(bank, val_set, scale=scale, batch_size=cfg.eval_batch_size)
    t3 = pc()
    cache_bank_outputs(bank, teacher=cache, path=scratch, scale=scale, attrs={"benchmark": True},
                       batch_size=cfg.eval_batch_size)
    t4 = pc()
    return {
        "wall_s": round(wall, 3),
        "phases_s": {
            "open_cache_and_read (embeddings, logits, labels)": round(t1 - t0, 3),
            "train_bank (E epochs, val eval each epoch)": round(t2 - t1, 3),
            "evaluate_bank (final val eval)": round(t3 - t2, 3),
            "cache_bank_outputs (every cached view into rdm.zarr)": round(t4 - t3, 3),
            "rest of the stage (teacher sha256, checkpoint, metrics, plot; by difference)":
                round(wall - (t4 - t0), 3),
        },
        "phases_source": "wall_s is the stage run; the phases are a second run of its parts, timed one by one",
        "epochs": epochs,
        "macs_per_row": rdm_bank_macs(bank),
    }


# ------------------------------------------------------------------ where an RDM step's time goes

def rdm_step_profile(*, cfg: Any, dim: int, num_classes: int, steps: int = 3) -> dict[str, Any]:
    """One ``train_bank`` step (stage shapes: batch, M, h, D) against its entropy bottleneck
    alone (forward + backward on the (B, M*h) latent), plus the profiler's top operators."""
    from torch.profiler import ProfilerActivity, profile

    from pipeline.rd import RDMBank, rdm_loss

    torch.manual_seed(cfg.seed)
    b, m = cfg.batch_size, len(cfg.rate_weights)
    bank = RDMBank(num_rdms=m, in_dim=dim, hidden=cfg.hidden, num_classes=num_classes, init_scale=cfg.init_scale)
    opt = torch.optim.Adam(bank.parameters(), lr=cfg.lr)
    x, z_t = torch.randn(b, dim), torch.randn(b, num_classes)
    y = torch.randint(0, num_classes, (b,))
    weights = torch.tensor(cfg.rate_weights) * dim
    latent = torch.randn(b, m * cfg.hidden, requires_grad=True)

    def step() -> None:
        out = bank(x)
        loss = rdm_loss(output=out, embeddings=x, teacher_logits=z_t, labels=y, rate_weights=weights,
                        ce_weight=cfg.ce_weight, kl_weight=cfg.kl_weight, temperature=cfg.temperature,
                        distortion=cfg.distortion)
        opt.zero_grad(set_to_none=True)
        loss.total.backward()
        opt.step()

    def bottleneck_only() -> None:
        bank.bottleneck(latent).bits.sum().backward()

    def timed(fn: Any) -> float:
        fn()
        times = []
        for _ in range(steps):
            began = pc()
            fn()
            times.append(pc() - began)
        return median(times)

    bank.train()
    step_s, bottleneck_s = timed(step), timed(bottleneck_only)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return {
        "batch": b, "rdms": m, "hidden": cfg.hidden, "dim": dim,
        "step_s": round(step_s, 4), "rows_per_s": round(b / step_s, 1),
        "bottleneck_forward_backward_s": round(bottleneck_s, 4),
        "bottleneck_share_of_step": round(bottleneck_s / step_s, 3),
        "profiler_top_ops_self_cpu": [{"op": e.key, "calls_per_step": e.count // steps,
                                       "self_cpu_share": round(e.self_cpu_time_total / total, 3)} for e in ops],
    }


# ------------------------------------------------------------------ main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=4096, help="CIFAR-10 train images (default 4096)")
    parser.add_argument("--val", type=int, default=1000, help="val images from test.tar (default 1000)")
    parser.add_argument("--views", type=int, default=2, help="V, views per image in the cache (default 2)")
    parser.add_argument("--epochs", type=int, default=2, help="E, for the RDMs and the assistant (default 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for every part (default 1, rdm.threads' default)")
    parser.add_argument("--embed-scheduler", default="synchronous",
                        help="embed.scheduler (default synchronous: no cluster start in the embed time)")
    parser.add_argument("--batch-size", type=int, default=128, help="assistant batch size (default 128)")
    parser.add_argument("--out", type=Path, default=RESULTS / "rdm_cost.json")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny check that the script runs (256 train, 64 val, 1 epoch); writes to a "
                             "temporary file unless --out is given")
    args = parser.parse_args()
    if args.smoke:
        args.train, args.val, args.epochs = 256, 64, 1
        if args.out == RESULTS / "rdm_cost.json":
            args.out = Path(tempfile.gettempdir()) / "cifd-bench-smoke" / "rdm_cost.json"

    import stages.embed as stage_embed
    from pipeline.data.shards import load_manifest, load_split
    from schemas.config import EmbedConfig, RdmConfig

    logging.getLogger("distributed").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    embed_cfg = EmbedConfig(views=args.views, scheduler=args.embed_scheduler, workers=1,
                            threads_per_worker=args.threads, device="cpu")
    rdm_cfg = RdmConfig(epochs=args.epochs, threads=args.threads, device="cpu")
    kd = {"temperature": 4.0, "alpha": 0.9, "lr": 0.05, "seed": 0}
    result: dict[str, Any] = {
        "benchmark": "rdm_cost",
        "machine": machine_info(args.threads),
        "params": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "teacher": "cifar10-resnet56", "assistant": ASSISTANT,
                   "embed_config": embed_cfg.to_dict(), "rdm_config": rdm_cfg.to_dict(),
                   "assistant_kd": {**kd, "optimizer": "SGD momentum 0.9 nesterov, wd 5e-4",
                                    "augment": "pad_crop pad 4 + flip", "teacher_forward": "online, per step"}},
    }
    with tempfile.TemporaryDirectory(prefix="cifd-bench-rdm-") as tmp_name:
        tmp = Path(tmp_name)
        prep, prep_s = prepare_cifar(tmp / "shards", train=args.train, val=args.val, samples_per_shard=256,
                                     val_source=CIFAR_TEST)
        teacher = tmp / "teacher.pt"
        save_teacher(teacher)
        paths = {"shards": str(tmp / "shards"), "teacher": str(teacher), "cache": str(tmp / "teacher.zarr"),
                 "rdm_models": str(tmp / "rdm.pt"), "rdm_cache": str(tmp / "rdm.zarr"),
                 "students": str(tmp / "students"), "metrics": str(tmp / "metrics"), "plots": str(tmp / "plots")}
        params = tmp / "params.yaml"
        params.write_text(yaml.safe_dump({"paths": paths, "embed": embed_cfg.to_dict(), "rdm": rdm_cfg.to_dict()},
                                         sort_keys=False))
        print(f"prepared {prep['num_samples']} in {prep_s:.1f}s; load average {os.getloadavg()}", flush=True)

        # (b) embed stage
        began = pc()
        stage_embed.run(params)
        embed_s = pc() - began
        torch.set_num_threads(args.threads)
        print(f"embed stage: {embed_s:.1f}s", flush=True)

        # (a) rdm stage
        rdm = run_rdm_stage(params, scratch=tmp / "rdm_parts.zarr")
        torch.set_num_threads(args.threads)
        print(f"rdm stage: {rdm['wall_s']:.1f}s, epochs {[e['seconds'] for e in rdm['epochs']]}", flush=True)

        # (c) TAKD assistant, on images decoded once (decode time reported apart)
        began = pc()
        manifest = load_manifest(tmp / "shards")
        train_block, val_block = load_split(manifest, "train"), load_split(manifest, "val")
        decode_s = pc() - began
        began = pc()
        assistant = train_assistant(teacher_path=teacher, train=train_block, val=val_block, epochs=args.epochs,
                                    batch_size=args.batch_size, **kd)
        assistant_s = pc() - began
        profile_rdm = rdm_step_profile(cfg=rdm_cfg, dim=64, num_classes=10)
        print(f"rdm step profile: {profile_rdm['step_s']}s/step, bottleneck share "
              f"{profile_rdm['bottleneck_share_of_step']}", flush=True)

    rdm_epoch = median([e["seconds"] for e in rdm["epochs"]])
    asst_epoch = median([e["seconds"] for e in assistant["epochs"]])
    asst_train_epoch = median([e["train_s"] for e in assistant["epochs"]])
    macs = assistant["macs_per_image"]
    rdm_macs_row = rdm["macs_per_row"]
    # Training MACs per epoch, forward+backward ≈ 3× forward; the teacher forward only once.
    asst_epoch_macs = args.train * (macs["teacher_forward"] + 3 * macs["assistant_forward"])
    rdm_epoch_macs = args.train * args.views * 3 * rdm_macs_row
    result["timings"] = {
        "prepare_s": round(prep_s, 2),
        "embed_stage_s": round(embed_s, 3),
        "rdm_stage": rdm,
        "assistant": {"total_s": round(assistant_s, 3), "decode_images_once_s": round(decode_s, 3), **assistant},
        "rdm_step_profile": profile_rdm,
        "median_epoch_s": {"rdm_train_bank": round(rdm_epoch, 4), "assistant": round(asst_epoch, 4),
                           "assistant_train_only": round(asst_train_epoch, 4)},
    }
    result["macs"] = {
        "teacher_forward_per_image": macs["teacher_forward"],
        "assistant_forward_per_image": macs["assistant_forward"],
        "rdm_bank_forward_per_row (all M, linear layers)": rdm_macs_row,
        "assistant_epoch_train (teacher fwd + 3x assistant fwd) x N": asst_epoch_macs,
        "rdm_epoch_train (3x bank fwd) x N x V": rdm_epoch_macs,
        "ratio_rdm_over_assistant_epoch": round(rdm_epoch_macs / asst_epoch_macs, 5),
    }
    result["ratios"] = {
        "rdm_epoch_over_assistant_epoch": round(rdm_epoch / asst_epoch, 5),
        "rdm_stage_over_assistant_total": round(rdm["wall_s"] / assistant_s, 5),
        "rdm_stage_over_embed_stage": round(rdm["wall_s"] / embed_s, 5),
        "rdm_train_over_assistant_train (E epochs each)":
            round(sum(e["seconds"] for e in rdm["epochs"]) / sum(e["seconds"] for e in assistant["epochs"]), 5),
        "embed_plus_rdm_over_assistant_total": round((embed_s + rdm["wall_s"]) / assistant_s, 5),
    }
    result["claim"] = {
        "statement": "the rdm stage costs well under 1% of training a TAKD teacher assistant",
        "threshold": 0.01,
        "rdm_epoch_over_assistant_epoch": result["ratios"]["rdm_epoch_over_assistant_epoch"],
        "rdm_stage_over_assistant_total": result["ratios"]["rdm_stage_over_assistant_total"],
        "holds_per_epoch": result["ratios"]["rdm_epoch_over_assistant_epoch"] < 0.01,
        "holds_total": result["ratios"]["rdm_stage_over_assistant_total"] < 0.01,
    }
    path = write_result(args.out, result)
    print(f"ratios: {result['ratios']}\nmacs: {result['macs']}\nwrote {path}")


if __name__ == "__main__":
    main()
