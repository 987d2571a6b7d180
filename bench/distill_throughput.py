"""Stage three (``distill``) throughput: cached targets against CE only and online KD, in one run.

On one CIFAR-10 subset (shards made with ``prepare_dataset``), one teacher file (the
pretrained ResNet-56 saved with ``save_model`` and a ``preprocess`` spec), one teacher cache
(``run_embed``, V views, ``pad_crop`` policy, synchronous scheduler) and one RDM cache
(``stages.rdm.run``, 1 epoch), measures training images/s of a ResNet-8 student, every
variant through the real ``stages.distill.build_inputs`` + ``pipeline.train.distill.train_student``
(memory mode, the CIFAR preset's optimizer and loss settings), on the same replayed views:

(a) ``ce``: method ``ce`` (labels only), the limit for any distillation loop;
(b) cached distillation: methods ``kd`` and ``cifd`` with targets gathered from the teacher
    cache and the RDM cache, exactly as stage three runs them;
(c) ``online_kd``: method ``kd`` with the cached teacher logits replaced by the frozen
    ResNet-56 run (eval, ``inference_mode``) on every batch's rendered views at every step:
    the same loop plus the teacher forward, i.e. what KD costs without a cache.

Each timed run is one epoch of ``train_student`` after ``--warmup`` warm-up steps, in this
process's main thread as the stage runs it; a batch source wrapper announces warm-up + epoch
steps, and ``train_student``'s ``on_step`` hook ends every timed step (the end-of-epoch val
evaluation is not timed). Online KD is a batch source too (:class:`OnlineTeacher`): nothing
of the library is patched. Variants run one epoch after another, interleaved per repeat with
the order rotated, so slow drifts of a shared machine's load hit them alike; ratios are given
from medians and paired per round, and the median step gives a burst-robust "steady" rate.
A separate pass of ``--profile-steps`` steps per variant runs under ``torch.profiler`` with
ranges around the student's and the IBM's forward (module forward hooks) and the online
teacher, plus torch's own optimizer ranges and autograd events, so the JSON says where the
time goes (``step_breakdown``). A dispatch-mode counter gives the aten ops of one step
per method, and ``FlopCounterMode`` counts the teacher's forward FLOPs per image against the
student's forward+backward FLOPs per image, so the expected speed-up of cached over online
KD (FLOP-proportional) can be set against the measured one.

Threads: the default is 1 torch thread (``distill.threads`` defaults to 2). On the shared
2-core machine this was written on, with another process busy on one core, every OpenMP
parallel region of a 2-thread pool intermittently cost ~8 ms (``x + 1`` on 2M floats: 8 ms
with 2 threads, 0.6 ms with 1), so a 2-thread run swung between two regimes ~15x apart
within one run (the CE student at 105 and at 1650 images/s), and methods with many
mid-sized ops (cifd's entropy model) suffered most. With 1 thread no parallel region is
opened and the numbers measure compute; ``--threads 2`` measures the stage's default.

    uv run python bench/distill_throughput.py            # defaults sized for a 2-core CPU
    uv run python bench/distill_throughput.py --smoke    # a tiny run (about 1 min), to a temp file
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import yaml  # noqa: E402

from _common import (  # noqa: E402
    CIFAR_TEST,
    RESULTS,
    machine_info,
    median,
    prepare_cifar,
    save_teacher,
    write_result,
)

pc = time.perf_counter
STUDENT = "pipeline.models.cifar_resnet:resnet8"
CACHED = ("ce", "kd", "cifd")  # through the cache (ce reads no target but runs the same loop)
VARIANTS = (*CACHED, "online_kd")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ run state and hooks

@dataclasses.dataclass
class RunState:
    """What the hooks need to know about the training run in progress."""

    name: str
    device: torch.device
    step_s: list[float] = dataclasses.field(default_factory=list)  # timed steps (from on_step)
    rows: int = 0
    began: float = 0.0  # start of the timed epoch, or end of the previous timed step
    epoch_s: float = 0.0
    timed: bool = False  # inside the timed steps (not warm-up, not evaluation)
    check: dict[str, float] | None = None
    profiler: Any = None  # a torch.profiler.profile, started and stopped around the timed steps


class TimedBatches:
    """A ``BatchSource`` that yields ``warmup`` batches, then the wrapped source's full epoch
    (or ``limit`` batches of it), announcing ``warmup + timed steps`` so ``train_student``'s
    step check and LR schedule agree.

    The timed epoch starts when its first batch is requested (on CUDA after a sync); each
    step ends at the loop's ``on_step`` hook (after ``optimizer.step()``), so a step is the
    whole step body of ``train_student``. The epoch ends at the last step's hook (on CUDA
    with a sync; none in between, so the GPU queue stays full as in the stage). The
    end-of-epoch val evaluation comes after and is not timed.
    """

    def __init__(self, inner: Any, *, warmup: int, state: RunState, limit: int | None = None) -> None:
        self.inner, self.warmup, self.state = inner, warmup, state
        self.timed_steps = inner.steps if limit is None else min(limit, inner.steps)
        self.steps = warmup + self.timed_steps
        self.rows = inner.rows

    def __call__(self, epoch: int, order: torch.Tensor, choice: torch.Tensor) -> Iterator[Any]:
        st = self.state
        it: Iterator[Any] = iter(())
        for k in range(self.steps):
            if k in (0, self.warmup):  # the warm-up and the timed epoch both start at the epoch's first batch
                it = iter(self.inner(epoch, order, choice))
            if k == self.warmup:
                _sync(st.device)
                if st.profiler is not None:
                    st.profiler.start()
                st.timed, st.began = True, pc()
            yield next(it)

    def on_step(self, info: Any) -> None:
        """``train_student``'s per-step hook: books the step that just ended."""
        st = self.state
        if not st.timed:
            return
        last = info.step == self.steps - 1
        if last:
            _sync(st.device)
        now = pc()
        st.step_s.append(now - st.began)
        st.rows += len(info.rows)
        st.began = now
        if last:
            st.timed = False
            st.epoch_s = sum(st.step_s)
            if st.profiler is not None:
                st.profiler.stop()


class OnlineTeacher:
    """Online KD as a batch source: for every batch the wrapped source yields, run the frozen
    teacher (``teacher.classify(teacher.embed(x))``, eval, ``inference_mode``, the loop's
    bf16 autocast and channels-last on CUDA) on the batch's inputs ``x``, which the source
    has already rendered (``render_inputs``) at the student's input, and put its logits in
    the batch's targets in place of the cached ones, so the unchanged ``train_student``
    trains on live teacher logits. The views are rendered
    once, by the source, for both networks; that is exact only when the student's input is
    the teacher's (``distill.preprocess`` null), which ``teacher_preprocess`` checks.
    ``check`` gets the largest |live - cached| logit difference (the cache holds this
    teacher on these views: ~0).
    """

    def __init__(self, inner: Any, *, teacher: Any, cached: torch.Tensor, run: Any,
                 state: RunState, teacher_preprocess: Any = None) -> None:
        if teacher_preprocess is not None and teacher_preprocess != run.preprocess:
            raise ValueError(f"online KD runs the teacher on the student's inputs, but the student's preprocess "
                             f"{run.preprocess} differs from the teacher's {teacher_preprocess}")
        self.inner, self.teacher, self.run, self.state = inner, teacher, run, state
        self.cached = cached  # (N, V, C) the cached logits, as read: the check's reference
        self.steps = inner.steps
        self.rows = inner.rows

    def __call__(self, epoch: int, order: torch.Tensor, choice: torch.Tensor) -> Iterator[Any]:
        run = self.run
        use_amp = run.loop.amp and run.device.type == "cuda"
        for rows, views, x, batch in self.inner(epoch, order, choice):
            autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_amp
                        else contextlib.nullcontext())
            with torch.inference_mode(), autocast, torch.profiler.record_function("teacher_forward (online)"):
                xt = x.contiguous(memory_format=torch.channels_last) if run.loop.channels_last else x
                z = self.teacher.classify(self.teacher.embed(xt)).float()
            if self.state.check is not None:
                key = "max_abs_logit_diff_online_teacher_vs_cache"
                diff = float((z - self.cached[rows, views]).abs().max())
                self.state.check[key] = max(self.state.check.get(key, 0.0), diff)
            yield rows, views, x, dataclasses.replace(batch, teacher_logits=z)


@contextlib.contextmanager
def forward_ranges(student: Any) -> Iterator[None]:
    """``torch.profiler.record_function`` ranges around the student's forward and its IBM's,
    opened and closed by the modules' own forward hooks (``register_forward_pre_hook`` /
    ``register_forward_hook``), removed on exit."""
    handles = []
    for name, module in (("student_forward", student), ("ibm_forward (inside student_forward)", student.ibm)):
        if module is None:
            continue
        open_ranges: list[Any] = []

        def pre(mod: Any, args: Any, name: str = name, open_ranges: list[Any] = open_ranges) -> None:
            r = torch.profiler.record_function(name)
            r.__enter__()
            open_ranges.append(r)

        def post(mod: Any, args: Any, out: Any, open_ranges: list[Any] = open_ranges) -> None:
            open_ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# Ranges of a profiled step, by the profiler event names that carry them: our own ranges
# (forward hooks, the online teacher), torch.optim's built-in "Optimizer.step#SGD.step" /
# "Optimizer.zero_grad#SGD.zero_grad", and the autograd engine's per-node events.
PART_KEYS = {
    "teacher_forward (online)": lambda k: k == "teacher_forward (online)",
    "student_forward": lambda k: k == "student_forward",
    "ibm_forward (inside student_forward)": lambda k: k == "ibm_forward (inside student_forward)",
    "backward": lambda k: k.startswith("autograd::engine::evaluate_function"),
    "optimizer_step": lambda k: k.startswith("Optimizer.step#"),
    "optimizer_zero_grad": lambda k: k.startswith("Optimizer.zero_grad#"),
}


def profiled_parts(prof: Any) -> dict[str, float]:
    """Seconds booked under each of ``PART_KEYS`` (CPU time of the range, children included)."""
    out = dict.fromkeys(PART_KEYS, 0.0)
    for e in prof.key_averages():
        for part, match in PART_KEYS.items():
            if match(e.key):
                out[part] += e.cpu_time_total / 1e6
    return out


# ------------------------------------------------------------------ timed epochs

@dataclasses.dataclass
class Variant:
    name: str
    inputs: Any  # stages.distill.DistillInputs
    init_state: dict[str, torch.Tensor]
    teacher: Any = None  # online_kd only: the frozen ImageClassifier
    teacher_preprocess: Any = None  # online_kd only: its Preprocess (must be the student's)
    cached_logits: torch.Tensor | None = None  # online_kd only: the cache's teacher logits (N, V, C)


def _train(v: Variant, state: RunState, *, warmup: int, limit: int | None) -> dict[str, Any]:
    """One ``train_student`` call (1 epoch: warm-up + timed steps) from the initial weights."""
    from pipeline.train.distill import train_student

    inp = v.inputs
    inp.student.load_state_dict(v.init_state)
    batches = TimedBatches(inp.batches, warmup=warmup, state=state, limit=limit)
    source: Any = batches
    if v.teacher is not None:
        source = OnlineTeacher(batches, teacher=v.teacher, cached=v.cached_logits,
                               run=inp.run, state=state, teacher_preprocess=v.teacher_preprocess)

    history = train_student(inp.student, run=inp.run, info=inp.info, batches=source, val=inp.val,
                            on_step=batches.on_step)
    steps = state.step_s
    return {
        "images": state.rows, "timed_steps": len(steps), "seconds": round(state.epoch_s, 4),
        "images_per_s": state.rows / state.epoch_s,
        "median_step_s": round(median(steps), 5),
        # The median step: robust to load bursts, and a full batch (no partial last one).
        "steady_images_per_s": inp.batches.batch_size / median(steps),
        "train_loss": round(history[-1].train_loss, 4),
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def run_round(variants: dict[str, Variant], *, warmup: int, check: dict[str, float] | None,
              limit: int | None = None, rotate: int = 0) -> dict[str, dict[str, Any]]:
    """One timed epoch of every variant, one after another, in the order rotated by
    ``rotate`` (per repeat, so no variant always follows the same one)."""
    names = list(variants)
    names = names[rotate % len(names):] + names[:rotate % len(names)]
    out: dict[str, Any] = {}
    for name in names:
        v = variants[name]
        state = RunState(name=name, device=v.inputs.run.device, check=check if v.teacher is not None else None)
        out[name] = _train(v, state, warmup=warmup, limit=limit)
    return out


def profile_round(variants: dict[str, Variant], *, warmup: int, steps: int) -> dict[str, Any]:
    """A separate pass of ``steps`` steps per variant under ``torch.profiler`` (CPU activity),
    with the ranges of ``PART_KEYS``; ``other`` is the residual of the step (the batch
    source's render_inputs, gather_targets, method_loss, the LR scheduler, the loop's bookkeeping) plus the
    profiler's own overhead."""
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, Any] = {}
    for name, v in variants.items():
        prof = profile(activities=[ProfilerActivity.CPU])
        state = RunState(name=name, device=v.inputs.run.device, profiler=prof)
        with forward_ranges(v.inputs.student):
            r = _train(v, state, warmup=warmup, limit=steps)
        parts = {k: s / r["timed_steps"] for k, s in profiled_parts(prof).items()}
        if v.teacher is None:
            parts.pop("teacher_forward (online)")
        if v.inputs.student.ibm is None:
            parts.pop("ibm_forward (inside student_forward)")
        step = r["seconds"] / r["timed_steps"]
        parts["other (render, gather, method_loss, scheduler, loop, profiler)"] = step - sum(
            x for k, x in parts.items() if "(inside" not in k)
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1.0
        out[name] = {"steps": r["timed_steps"], "step_s": round(step, 5),
                     "images_per_s": round(r["images"] / r["seconds"], 2),
                     "parts_ms_per_step": {k: round(1e3 * x, 3) for k, x in parts.items()},
                     "parts_share": {k: round(x / step, 4) for k, x in parts.items()},
                     "top_ops_self_cpu": [{"op": e.key, "self_cpu_share": round(e.self_cpu_time_total / total, 3)}
                                          for e in ops]}
    return out


# ------------------------------------------------------------------ FLOPs

def count_ops(fn: Callable[[], Any]) -> int:
    """The aten ops ``fn`` sends to the kernels (forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.count += 1
            return func(*args, **(kwargs or {}))

    with Counter() as counter:
        fn()
    return counter.count


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def flops_per_image(variants: dict[str, Variant]) -> dict[str, Any]:
    """Teacher forward vs student forward+backward FLOPs per image (FlopCounterMode: matmul,
    conv and their backward; elementwise ops, BatchNorm and the entropy model are not counted),
    and the number of aten ops of one student step per method."""
    from pipeline.train.objective import method_loss, rdm_weight_tensor
    from pipeline.train.targets import gather_targets

    out: dict[str, Any] = {}
    ref = variants["kd"].inputs
    n = ref.info.num_rows
    rows, views, x, _ = next(iter(ref.batches(0, torch.arange(n), torch.ones(n, dtype=torch.long))))  # rendered
    b = len(rows)
    if ref.run.loop.channels_last:  # as train_student hands it to the student
        x = x.contiguous(memory_format=torch.channels_last)
    teacher = variants["online_kd"].teacher
    assert teacher is not None

    def teacher_fwd() -> None:
        with torch.inference_mode():
            teacher.classify(teacher.embed(x))

    out["teacher_forward"] = count_flops(teacher_fwd) / b
    for method in CACHED:
        inp = variants[method].inputs
        student = copy.deepcopy(inp.student).train()
        batch = gather_targets(inp.targets, rows, views)
        rdm_weights = rdm_weight_tensor(inp.run.weights, inp.info.num_rdms, x.device)

        def step(student: Any = student, batch: Any = batch, inp: Any = inp, method: str = method,
                 rdm_weights: torch.Tensor = rdm_weights) -> None:
            o = student(x, generator=torch.Generator(device=x.device).manual_seed(0))
            loss = method_loss(method, out=o, batch=batch, weights=inp.run.weights, rdm_weights=rdm_weights,
                               emb_scale=inp.info.emb_scale, generator=torch.Generator().manual_seed(0))
            loss.backward()

        def fwd(student: Any = student) -> None:
            with torch.no_grad():
                student(x, generator=torch.Generator(device=x.device).manual_seed(0))

        out[f"student_{method}_forward"] = count_flops(fwd) / b
        out[f"student_{method}_forward_backward"] = count_flops(step) / b
        # Kernel-level ops of one training step (forward, loss, backward; not the optimizer):
        # small ops each pay a fixed cost (thread barrier on CPU, launch on GPU).
        out[f"aten_ops_per_step_{method}"] = count_ops(step)
    s = out["student_kd_forward_backward"]
    t = out["teacher_forward"]
    out["teacher_share_of_online_kd_step"] = round(t / (t + s), 4)
    out["teacher_over_student_fwd_bwd"] = round(t / s, 3)
    # If time were proportional to FLOPs: cached KD images/s over online KD images/s.
    out["expected_speedup_cached_kd_over_online_kd"] = round((t + s) / s, 3)
    out["batch"] = b
    return out


def ibm_cost(v: Variant, *, reps: int) -> dict[str, Any]:
    """The cifd student's IBM (entropy model + noise + projection) alone on a (B, dim) batch:
    median forward and forward+backward time, and how many aten ops one fwd+bwd launches
    (many tiny ops: on a CPU each pays the intra-op thread barrier, so its time swings with
    the machine's load far more than a convolution's; on a GPU each pays a launch)."""
    student = copy.deepcopy(v.inputs.student).train()
    ibm = student.ibm
    assert ibm is not None
    device = v.inputs.run.device
    w = torch.randn(v.inputs.batches.batch_size, ibm.dim, device=device, requires_grad=True)
    noise = torch.Generator(device=device).manual_seed(0)

    def fwd() -> Any:
        return ibm(w, generator=noise)

    def fwd_bwd() -> None:
        o = fwd()
        (o.bits.mean() + o.projected.float().square().mean()).backward()

    times: dict[str, list[float]] = {"f": [], "fb": []}
    for i in range(reps + 2):
        for key, fn in (("f", fwd), ("fb", fwd_bwd)):
            _sync(device)
            began = pc()
            fn()
            _sync(device)
            if i >= 2:
                times[key].append(pc() - began)
    ops = count_ops(fwd_bwd)
    return {"batch": int(w.shape[0]), "dim": ibm.dim, "out_dim": ibm.out_dim,
            "ibm_forward_ms": round(1e3 * median(times["f"]), 3),
            "ibm_forward_backward_ms": round(1e3 * median(times["fb"]), 3),
            "aten_ops_forward_backward": ops}


# ------------------------------------------------------------------ summary

def summarize(result: dict[str, Any]) -> None:
    """Medians, ratios (of medians and paired per round) and the claims, from the raw runs
    in ``result`` (also usable on a stored JSON: ``--resummarize``)."""
    runs: dict[str, list[dict[str, Any]]] = result["timings"]["runs"]
    med = {k: median([r["images_per_s"] for r in rs]) for k, rs in runs.items()}
    steady = {k: median([r["steady_images_per_s"] for r in rs]) for k, rs in runs.items()}
    result["timings"]["images_per_s"] = {k: round(v, 2) for k, v in med.items()}
    result["timings"]["steady_images_per_s"] = {k: round(v, 2) for k, v in steady.items()}
    result["timings"]["median_epoch_s"] = {k: round(median([r["seconds"] for r in rs]), 3) for k, rs in runs.items()}

    def paired(a: str, b: str) -> dict[str, Any]:
        each = [x["images_per_s"] / y["images_per_s"] for x, y in zip(runs[a], runs[b])]
        return {"each": [round(e, 4) for e in each], "median": round(median(each), 4)}

    pairs = [(m, "ce") for m in ("kd", "cifd", "online_kd")] + [(m, "online_kd") for m in ("kd", "cifd")]
    result["ratios"] = {f"{a}_over_{b}": round(med[a] / med[b], 4) for a, b in pairs}
    result["ratios_steady"] = {f"{a}_over_{b}": round(steady[a] / steady[b], 4) for a, b in pairs}
    result["paired_ratios"] = {f"{a}_over_{b}": paired(a, b) for a, b in pairs}
    flops = result.get("flops_per_image")
    if flops:
        result["speedup_cached_over_online_kd"] = {
            "expected_from_flops": flops["expected_speedup_cached_kd_over_online_kd"],
            "measured_kd": result["ratios"]["kd_over_online_kd"],
            "measured_kd_paired": result["paired_ratios"]["kd_over_online_kd"]["median"],
            "measured_cifd": result["ratios"]["cifd_over_online_kd"],
            "teacher_flop_share_of_online_kd_step": flops["teacher_share_of_online_kd_step"],
            # Achieved GFLOP/s: the small student runs its FLOPs less efficiently than the teacher.
            "achieved_gflops_per_s": {
                "ce (student fwd+bwd)": round(med["ce"] * flops["student_ce_forward_backward"] / 1e9, 2),
                "kd (student fwd+bwd)": round(med["kd"] * flops["student_kd_forward_backward"] / 1e9, 2),
                "online_kd (teacher fwd + student fwd+bwd)": round(
                    med["online_kd"] * (flops["teacher_forward"] + flops["student_kd_forward_backward"]) / 1e9, 2),
            },
        }
        online = result.get("step_breakdown", {}).get("online_kd")
        if online:
            key = "teacher_forward (online)"
            sp = result["speedup_cached_over_online_kd"]
            sp["teacher_time_share_of_online_kd_step (measured)"] = online["parts_share"][key]
            sp["achieved_gflops_per_s"]["teacher forward alone, in the online loop"] = round(
                flops["teacher_forward"] * flops["batch"] / (online["parts_ms_per_step"][key] / 1e3) / 1e9, 2)
    threshold = 0.9

    def verdict(a: float, b: float) -> str:
        return "holds" if a >= threshold and b >= threshold else "fails" if a < threshold and b < threshold \
            else "mixed"

    result["claim"] = {
        "statement": "cached distillation (stage three, memory mode) trains at >= 0.9 of CE-only images/s",
        "threshold": threshold,
        **{f"{m}_over_ce": result["ratios"][f"{m}_over_ce"] for m in ("kd", "cifd")},
        **{f"{m}_over_ce_paired": result["paired_ratios"][f"{m}_over_ce"]["median"] for m in ("kd", "cifd")},
        # "holds" / "fails" when the median and the paired ratio agree, else "mixed".
        **{m: verdict(result["ratios"][f"{m}_over_ce"], result["paired_ratios"][f"{m}_over_ce"]["median"])
           for m in ("kd", "cifd")},
    }


# ------------------------------------------------------------------ main

def code_version() -> dict[str, Any]:
    """The commit measured, and whether the library (pipeline/, stages/, schemas/) differs from it."""
    import subprocess

    root = Path(__file__).resolve().parents[1]

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    return {"git_head": git("rev-parse", "HEAD"),
            "library_changes_vs_head": git("status", "--porcelain", "--", "pipeline", "stages", "schemas")
            .splitlines()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2048, help="CIFAR-10 train images (default 2048)")
    parser.add_argument("--val", type=int, default=128, help="val images from test.tar (default 128)")
    parser.add_argument("--views", type=int, default=2, help="V, views per image in the cache (default 2)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads everywhere (default 1; see the module docstring: with 2 on a shared "
                             "2-core machine the results swing ~15x with the other work)")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per variant (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each timed epoch (default 2)")
    parser.add_argument("--profile-steps", type=int, default=4,
                        help="steps of a separate torch.profiler pass per variant, for step_breakdown "
                             "(default 4; 0: none)")
    parser.add_argument("--micro-reps", type=int, default=10, help="repetitions of the IBM micro-timing")
    parser.add_argument("--shard-size", type=int, default=512, help="prepare.samples_per_shard (default 512)")
    parser.add_argument("--rdm-epochs", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="distill/embed/rdm device (default cpu)")
    parser.add_argument("--out", type=Path, default=RESULTS / "distill_throughput.json")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny check that the script runs (256 images, 1 repeat, 2 profiled steps); "
                             "writes to a temporary file unless --out is given")
    parser.add_argument("--resummarize", type=Path, default=None,
                        help="recompute medians/ratios of a stored result JSON in place (no measuring)")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.val, args.repeats, args.warmup, args.profile_steps = 256, 32, 1, 1, 2
        args.micro_reps, args.shard_size, args.batch_size = 2, 128, 64
        if args.out == RESULTS / "distill_throughput.json":
            args.out = Path(tempfile.gettempdir()) / "cifd-bench-smoke" / "distill_throughput.json"
    if args.resummarize is not None:
        import json

        stored = json.loads(args.resummarize.read_text())
        summarize(stored)
        args.resummarize.write_text(json.dumps(stored, indent=2) + "\n")
        print(f"ratios: {stored['ratios']}\npaired: {stored['paired_ratios']}\nclaim: {stored['claim']}")
        return

    import pipeline.cache.embed as E
    import stages.rdm as stage_rdm
    from pipeline.data.preprocess import Preprocess
    from pipeline.data.shards import load_manifest
    from pipeline.models import load_model
    from pipeline.runtime import resolve_device
    from schemas.config import DistillConfig, EmbedConfig, OptimConfig, Paths, RdmConfig, ViewPolicyConfig
    from stages.distill import build_inputs

    logging.getLogger("distributed").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    policy = ViewPolicyConfig(kind="pad_crop", pad=4, flip=True)
    embed_cfg = EmbedConfig(views=args.views, policy=policy, batch_size=256, scheduler="synchronous", workers=1,
                            threads_per_worker=args.threads, device=args.device)
    rdm_cfg = RdmConfig(epochs=args.rdm_epochs, threads=args.threads, device=args.device)
    # The CIFAR preset's stage-three settings (presets/cifar10.yaml), one epoch.
    distill_cfg = DistillConfig(methods=("ce", "kd", "cifd"), student=STUDENT, epochs=1, batch_size=args.batch_size,
                                optim=OptimConfig(name="sgd", lr=0.05, weight_decay=0.0005), temperature=2.0,
                                data="memory", device=args.device, threads=args.threads, seed=0)
    machine = machine_info(args.threads, device)
    machine["note"] = "shared 2-core machine, loaded by other work during the run (see loadavg)"
    result: dict[str, Any] = {
        "benchmark": "distill_throughput",
        "machine": machine,
        "code": code_version(),
        "params": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "teacher": "cifar10-resnet56 (pipeline.models.cifar_resnet:resnet56)", "student": STUDENT,
                   "dataset": "CIFAR-10 JPEG train.tar, stratified subset; val from test.tar",
                   "embed_config": embed_cfg.to_dict(), "rdm_config": rdm_cfg.to_dict(),
                   "distill_config": distill_cfg.to_dict(),
                   "online_kd": "method kd, cached teacher logits replaced by teacher.classify(teacher.embed(x)) on "
                                "the batch source's rendered views of every step (eval, inference_mode, channels_last as the "
                                "student, bf16 autocast on CUDA as the student), computed by a batch source "
                                "wrapper that puts them in each batch's targets"},
    }
    with tempfile.TemporaryDirectory(prefix="cifd-bench-distill-") as tmp_name:
        tmp = Path(tmp_name)
        setup: dict[str, Any] = {}
        prep, setup["prepare_s"] = prepare_cifar(tmp / "shards", train=args.images, val=args.val,
                                                 samples_per_shard=args.shard_size, val_source=CIFAR_TEST)
        teacher_path = tmp / "teacher.pt"
        save_teacher(teacher_path)
        paths = Paths(shards=str(tmp / "shards"), teacher=str(teacher_path), cache=str(tmp / "teacher.zarr"),
                      rdm_models=str(tmp / "rdm.pt"), rdm_cache=str(tmp / "rdm.zarr"),
                      students=str(tmp / "students"), metrics=str(tmp / "metrics"), plots=str(tmp / "plots"))
        params = tmp / "params.yaml"
        params.write_text(yaml.safe_dump({"paths": paths.to_dict(), "embed": embed_cfg.to_dict(),
                                          "rdm": rdm_cfg.to_dict(), "distill": distill_cfg.to_dict()},
                                         sort_keys=False))
        print(f"prepared {prep['num_samples']} in {setup['prepare_s']:.1f}s; load average {os.getloadavg()}",
              flush=True)
        began = pc()
        report = E.run_embed(settings=embed_cfg, manifest=load_manifest(tmp / "shards"), teacher_path=teacher_path,
                             store_path=Path(paths.cache))
        setup["embed_s"] = pc() - began
        setup["embed_teacher_forwards"] = report.teacher_forwards
        print(f"embed (V={args.views}): {setup['embed_s']:.1f}s, {report.teacher_forwards} teacher forwards",
              flush=True)
        began = pc()
        with contextlib.redirect_stderr(open(os.devnull, "w")):  # the stage's progress bar
            stage_rdm.run(params)
        setup["rdm_stage_s"] = pc() - began
        torch.set_num_threads(args.threads)
        print(f"rdm stage ({args.rdm_epochs} epoch): {setup['rdm_stage_s']:.1f}s", flush=True)

        began = pc()
        variants: dict[str, Variant] = {}
        for name in VARIANTS:
            method = "kd" if name == "online_kd" else name
            inp = build_inputs(paths, distill_cfg, method, device=device)
            inp.run.checkpoint = None  # a stored checkpoint would resume (skip) the epoch
            variants[name] = Variant(name, inp, copy.deepcopy(inp.student.state_dict()))
        teacher, teacher_spec = load_model(str(teacher_path))
        teacher = teacher.to(device).eval().requires_grad_(False)
        if distill_cfg.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        variants["online_kd"].teacher = teacher
        variants["online_kd"].teacher_preprocess = Preprocess.from_spec(teacher_spec, source=str(teacher_path))
        variants["online_kd"].cached_logits = variants["online_kd"].inputs.targets.teacher_logits.clone()
        setup["build_inputs_s (4 variants)"] = pc() - began
        setup["prepare"] = prep
        setup["rows"] = variants["ce"].inputs.info.num_rows
        setup["steps_per_epoch"] = variants["ce"].inputs.batches.steps
        setup["num_rdms"] = variants["cifd"].inputs.info.num_rdms
        setup["teacher_embed_dim"] = int(variants["cifd"].inputs.targets.teacher_emb.shape[-1])
        result["setup"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in setup.items()}

        flops = flops_per_image(variants)
        result["flops_per_image"] = flops
        print(f"FLOPs/image: teacher fwd {flops['teacher_forward'] / 1e6:.1f}M, student kd fwd+bwd "
              f"{flops['student_kd_forward_backward'] / 1e6:.1f}M, cifd fwd+bwd "
              f"{flops['student_cifd_forward_backward'] / 1e6:.1f}M; teacher share "
              f"{flops['teacher_share_of_online_kd_step']}", flush=True)

        def micro(when: str) -> None:
            ibm = {**ibm_cost(variants["cifd"], reps=args.micro_reps), "loadavg": list(os.getloadavg())}
            result.setdefault("ibm_micro", {})[when] = ibm
            print(f"IBM alone ({when}, B={args.batch_size}): forward {ibm['ibm_forward_ms']} ms, forward+backward "
                  f"{ibm['ibm_forward_backward_ms']} ms, {ibm['aten_ops_forward_backward']} aten ops", flush=True)

        micro("before_rounds")

        runs: dict[str, list[dict[str, Any]]] = {}
        check: dict[str, float] = {}
        for repeat in range(args.repeats):
            began = pc()
            out = run_round(variants, warmup=args.warmup, check=check, rotate=repeat)
            for name in VARIANTS:
                runs.setdefault(name, []).append(out[name])
            print(f"[{repeat + 1}/{args.repeats}] ({pc() - began:.0f}s, load {out['ce']['loadavg_after']}) "
                  + ", ".join(f"{n} {out[n]['images_per_s']:.1f} img/s (steady {out[n]['steady_images_per_s']:.1f})"
                              for n in VARIANTS), flush=True)
        profile: dict[str, Any] = {}
        if args.profile_steps > 0:
            profile = {"source": f"a separate torch.profiler pass of {args.profile_steps} steps per variant after "
                                 "warm-up (the timed runs are not instrumented)",
                       **profile_round(variants, warmup=args.warmup, steps=args.profile_steps)}
            for name in VARIANTS:
                print(f"step parts {name} (ms): {profile[name]['parts_ms_per_step']}", flush=True)
        micro("after_rounds")

    result["timings"] = {"runs": runs}
    result["step_breakdown"] = profile
    result["checks"] = check
    summarize(result)
    path = write_result(args.out, result)
    print(f"images/s: {result['timings']['images_per_s']}\nratios: {result['ratios']}\n"
          f"paired: {result['paired_ratios']}\nspeedup: {result.get('speedup_cached_over_online_kd')}\n"
          f"claim: {result['claim']}\nwrote {path}")


if __name__ == "__main__":
    main()
