"""Stage one: run the frozen teacher once over every shard, V views per image, into Zarr.

The driver samples every view up front from one seeded generator, creates (or resumes) the
store, and hands each unfinished WebDataset tar to a worker as one task. A worker decodes
its tar in one read, replays the views, runs the teacher and writes exactly the rows of its
own Zarr shard, then flags the shard done. A killed run therefore resumes with the shards
whose flag is unset, and a half-written shard is never flagged.

One writer: the driver holds the store's lock (``<store>.lock``) for the whole run and
records a token in the store; a worker checks the store's fingerprint and that token before
each shard write, so a store recreated or taken over by another run is never mixed into. A
store is rebuilt only when its recorded inputs differ (the report names them); one that
cannot be read is an error, never removed. A NaN / inf teacher output or an overflow of
the stored dtype stops the run, naming the shard, row and view.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from pipeline.cache.lock import writer_lock
from pipeline.cache.logits import LogitsFormat
from pipeline.cache.provenance import build_provenance
from pipeline.cache.outputs import TeacherOutputError, checked_rows  # noqa: F401 (re-exported)
from pipeline.cache.store import (
    CacheError,
    SplitSpec,
    StoreSpec,
    claim,
    create_store,
    existing_store,
    head_digest,
    finalize,
    remove_leftovers,
    sibling,
    swap_in,
    write_rows,
)
from pipeline.data.held import held_rows
from pipeline.data.preprocess import Preprocess, render_inputs
from pipeline.data.shards import Manifest, read_shard
from pipeline.data.mixup import MIXUP_SEED_TAG, sample_mixup, unmixed
from pipeline.data.views import sample_views
from pipeline.models import (
    ImageClassifier,
    linear_head,
    load_model,
    logits_from_embedding_check,
    state_dict_sha256,
)
from pipeline.runtime import derived_seed, resolve_device
from schemas import layout as L
from schemas.base import ConfigError
from schemas.config import EmbedConfig

log = logging.getLogger(__name__)


@torch.inference_mode()
def teacher_outputs(
    model: ImageClassifier,
    images: torch.Tensor | list[torch.Tensor],
    views: torch.Tensor,
    *,
    preprocess: Preprocess,
    batch_size: int,
    mix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (n, V, D) and logits (n, V, C), float32, of uint8 ``images`` under ``views``
    (n, V, 5): a batch (n, C, H, W) of same-size images, rendered on its device, or n images
    (C, H_i, W_i) of any sizes, rendered one by one on the host. ``mix``: the partner of every
    (row, view) as an index into ``images`` (n, V) and its mix params (n, V, 6 or 10)
    (:mod:`pipeline.data.mixup`). Runs on the model's device."""
    n, v = views.shape[:2]
    device = next(model.parameters()).device
    rows = torch.arange(n).repeat_interleave(v)  # (n*V,)
    flat_views = views.reshape(n * v, -1)
    if mix is not None:
        partners, flat_mix = mix[0].reshape(n * v), mix[1].reshape(n * v, -1)
    embs, logits = [], []
    for start in range(0, n * v, batch_size):
        sel = slice(start, start + batch_size)
        x = render_inputs(held_rows(images, rows[sel]), flat_views[sel], preprocess=preprocess,
                          mix=None if mix is None else (held_rows(images, partners[sel]), flat_mix[sel]))
        e = model.embed(x.to(device, non_blocking=True))
        embs.append(e.float())
        logits.append(model.classify(e).float())
    emb = torch.cat(embs).view(n, v, -1) if embs else torch.zeros(n, v, model.embed_dim)
    lg = torch.cat(logits).view(n, v, -1) if logits else torch.zeros(n, v, model.num_classes)
    return emb, lg


def teacher_head(model: ImageClassifier, x: torch.Tensor, *, check: tuple[bool, float],
                 source: str) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's classifier head (weight (C, D), bias (C,), float32) for ``embed.logits:
    from_head``: refused unless classify(embed(x)) reproduces the teacher's logits (``check``)
    and the head is one linear map (:func:`pipeline.models.linear_head`)."""
    if not check[0]:
        raise CacheError(f"embed.logits = 'from_head' but classifier(embedding) does not reproduce the teacher's "
                         f"logits for {source} (max abs err {check[1]:.3g}); set embed.logits: stored")
    weight, bias = linear_head(model, x, source=source)
    return weight.numpy(), bias.numpy()


@functools.lru_cache(maxsize=2)
def _load_teacher(path: str, sha256: str, device: str,
                  allow_entrypoint: str | None) -> tuple[ImageClassifier, dict[str, Any]]:
    model, meta = load_model(path, allow_entrypoint=allow_entrypoint)
    return model.to(device).eval(), meta


@dataclass(frozen=True)
class ShardTask:
    """Everything one worker needs to fill one Zarr shard (picklable)."""

    store: str
    split: str
    shard_file: str
    start: int
    stop: int
    mode: str  # the colour mode images are decoded to
    same_size: bool  # one batch rendered on the device, else image by image on the host
    hashes: np.ndarray  # (stop - start, 16) uint8: the manifest content hash of every row
    views: np.ndarray  # (n, V, 5) float32
    teacher: str
    teacher_sha256: str
    allow_entrypoint: str | None  # the teacher entrypoint the user's params name (None: timm / pipeline.models)
    preprocess: Preprocess
    batch_size: int
    logits: LogitsFormat  # how the logits are stored
    device: str
    threads: int
    fingerprint: str  # of the store this task writes into
    token: str  # of the run holding the store's writer lock
    partner: np.ndarray | None = None  # (n, V) int64 global partner rows (-1: unmixed), a mixed-view cache only
    mix: np.ndarray | None = None  # (n, V, 6 or 10) float32 (lambda, partner box[, CutMix box])


@dataclass(frozen=True)
class ShardResult:
    split: str
    start: int
    stop: int
    seconds: float


def embed_shard(task: ShardTask) -> ShardResult:
    """Worker body: decode one tar, run the teacher on all its views, check and write its rows."""
    began = time.perf_counter()
    torch.set_num_threads(task.threads)
    device = resolve_device(task.device)
    model, _ = _load_teacher(task.teacher, task.teacher_sha256, str(device), task.allow_entrypoint)
    block = read_shard(task.shard_file, mode=task.mode, start=task.start, stop=task.stop,
                       expected_hashes=task.hashes)
    images: torch.Tensor | list[torch.Tensor] = [torch.from_numpy(image) for image in block.images]
    if task.same_size:
        images = torch.from_numpy(block.stacked()).to(device, non_blocking=True)
    views = torch.from_numpy(task.views)
    mix = None
    if task.partner is not None and task.mix is not None:  # partners are rows of this shard
        local = task.partner - task.start
        if local.min(initial=0) < 0 or local.max(initial=0) >= task.stop - task.start:
            raise CacheError(f"embed {task.split}: a mixed view's partner lies outside its shard "
                             f"{task.start}:{task.stop}; rerun `cifd embed`")
        mix = (torch.from_numpy(local), torch.from_numpy(task.mix))
    emb, logits = teacher_outputs(model, images, views, preprocess=task.preprocess, batch_size=task.batch_size,
                                  mix=mix)
    where = f"embed {task.split} shard {Path(task.shard_file).name} (rows {task.start}:{task.stop})"
    rows = {
        **checked_rows(emb.cpu().numpy(), logits.cpu().numpy(), fmt=task.logits, where=where, start=task.start),
        L.VIEWS: task.views.astype(np.float32),
        L.LABELS: block.labels,
        L.INDEX: block.index,
    }
    if task.partner is not None and task.mix is not None:
        rows.update({L.MIX_PARTNER: task.partner, L.MIX: task.mix})
    root = zarr.open_group(task.store, mode="r+", use_consolidated=False)
    write_rows(root, task.split, task.start, task.stop, rows, fingerprint_=task.fingerprint, token=task.token)
    return ShardResult(task.split, task.start, task.stop, time.perf_counter() - began)


@dataclass
class EmbedReport:
    resumed_shards: int = 0
    written_shards: int = 0
    written_rows: int = 0
    teacher_forwards: int = 0  # (image, view) pairs the teacher ran on in this run
    seconds: float = 0.0
    classifier_reproduces_logits: bool = False
    per_split_rows: dict[str, int] = field(default_factory=dict)
    rebuilt_because: tuple[str, ...] = ()  # the inputs that differ from an existing store's


def _run_tasks(tasks: list[ShardTask], settings: EmbedConfig, on_done: Callable[[ShardResult], None]) -> None:
    if settings.scheduler == "synchronous":
        for task in tasks:
            on_done(embed_shard(task))
        return
    import dask
    from dask.distributed import Client, LocalCluster, as_completed

    if settings.scheduler == "local":
        threads = str(settings.threads_per_worker)
        # dask's default MALLOC_TRIM_THRESHOLD_=65536 for workers makes torch re-map its
        # activation buffers every layer: measured 0.44x the forward speed of the same
        # process without it (bench/embed_local_env.py). Torch threads are set per task.
        environ = {"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                   "OPENBLAS_NUM_THREADS": threads}
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in environ.items()}):
            cluster = LocalCluster(n_workers=settings.workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=logging.ERROR)
        client = Client(cluster)
    else:
        cluster = None
        try:
            client = Client(settings.scheduler)
        except OSError as exc:
            raise ConfigError(f"embed.scheduler = {settings.scheduler!r}: cannot reach that dask scheduler ({exc}); "
                              "start it, or use 'local' or 'synchronous'") from exc
    try:
        futures = client.map(embed_shard, tasks, pure=False)
        for future in as_completed(futures):
            on_done(future.result())  # re-raises a worker's error; finished shards stay done
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


@contextmanager
def _store_io(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise CacheError(f"cannot write the teacher cache at {path} ({exc}); free space or fix permissions, "
                         "then rerun") from exc


def run_embed(
    *,
    settings: EmbedConfig,
    manifest: Manifest,
    teacher_path: Path,
    store_path: Path,
    allow_entrypoint: str | None = None,
    progress: Callable[[int, str], Any] | None = None,
    splits: Iterable[str] = L.SPLITS,
) -> EmbedReport:
    """Fill (or resume) the teacher cache at ``store_path``; returns what this run did.

    Holds the store's writer lock throughout (a second writer is refused at once). An
    existing store with the same inputs is resumed; one from other inputs is rebuilt and
    ``report.rebuilt_because`` names the inputs that differ. ``progress(num_images,
    description)`` is called once with the total and then after each shard with the number
    of images it held (wire it to a progress bar).
    """
    store_path = Path(store_path)
    with writer_lock(store_path, command="cifd embed") as token:
        with _store_io(store_path):
            remove_leftovers(store_path)
        return _fill(settings=settings, manifest=manifest, teacher_path=Path(teacher_path), store_path=store_path,
                     progress=progress, splits=list(splits), token=token, allow_entrypoint=allow_entrypoint)


def _fill(*, settings: EmbedConfig, manifest: Manifest, teacher_path: Path, store_path: Path,
          progress: Callable[[int, str], Any] | None, splits: list[str], token: str,
          allow_entrypoint: str | None) -> EmbedReport:
    began = time.perf_counter()
    device = resolve_device(settings.device)
    model, spec = load_model(str(teacher_path), allow_entrypoint=allow_entrypoint)
    model = model.eval()
    sha = state_dict_sha256(model)
    preprocess = Preprocess.from_spec(spec, source=str(teacher_path))
    same_size = manifest.image_shape is not None

    # Does classifier(embedding) reproduce the logits? Checked on a few clean views.
    first = manifest.split(splits[0])["shards"][0]
    probe = read_shard(manifest.root / first["file"], mode=manifest.mode, start=first["start"], stop=first["stop"])
    sample = [torch.from_numpy(image) for image in probe.images[:16]]
    x = render_inputs(sample, preprocess.clean_views(torch.from_numpy(probe.sizes[:16])), preprocess=preprocess)
    check = logits_from_embedding_check(model, x)
    head = teacher_head(model, x, check=check, source=str(teacher_path)) if settings.logits == "from_head" else None
    stored_dtype = settings.logits_dtype if settings.logits == "stored" else "none"
    logits_format = LogitsFormat(settings.logits, stored_dtype, settings.logits_topk, model.num_classes,
                                 *((None, None) if head is None else (torch.from_numpy(head[0]), torch.from_numpy(head[1]))))

    provenance = build_provenance(model=model, spec=spec, sha256=sha, manifest=manifest,
                                  settings=settings, check=check, device_type=device.type,
                                  head_sha256=None if head is None else head_digest(*head))
    root, changes = existing_store(store_path, provenance)
    report = EmbedReport(classifier_reproduces_logits=check[0], rebuilt_because=tuple(changes))
    if root is None:
        if changes:
            log.warning("rebuilding the teacher cache at %s: its recorded inputs differ (%s)", store_path,
                        "; ".join(changes))
        spec_ = StoreSpec(
            num_views=settings.views, embed_dim=model.embed_dim, num_classes=model.num_classes,
            shard_rows=int(manifest.data["samples_per_shard"]), chunk_rows=settings.chunk_rows,
            logits_dtype=settings.logits_dtype, logits=settings.logits, logits_topk=settings.logits_topk, head=head,
            splits=tuple(SplitSpec(name=s, num_rows=manifest.split(s)["num_samples"],
                                   shard_bounds=tuple((e["start"], e["stop"]) for e in manifest.split(s)["shards"]))
                         for s in splits),
        )
        new = sibling(store_path, "new", token)
        with _store_io(store_path):
            create_store(new, spec_, provenance=provenance)
            swap_in(new, store_path, token)
        root = zarr.open_group(store_path, mode="r+", use_consolidated=False)
    store_fingerprint = str(root.attrs[L.ATTR_FINGERPRINT])

    generator = torch.Generator().manual_seed(settings.seed)
    tasks: list[ShardTask] = []
    for split in splits:
        entry = manifest.split(split)
        hashes = manifest.sample_hashes(split)
        sizes = torch.from_numpy(manifest.sizes(split))
        views = sample_views(sizes=sizes, num_views=settings.views,
                             policy=settings.policy, image_size=preprocess.image_size, crop_pct=preprocess.crop_pct,
                             generator=generator).numpy()
        partner, mix = None, None
        if settings.mixup.views:  # train views only: the val split is scored on clean views, never mixed
            bounds = [(e["start"], e["stop"]) for e in entry["shards"]]
            cutmix = settings.mixup.cutmix
            partner, mix = (unmixed(len(sizes), settings.views, cutmix=cutmix > 0) if split != "train" else sample_mixup(
                sizes=sizes, shard_bounds=bounds, num_views=settings.views, mixed=settings.mixup.views,
                alpha=settings.mixup.alpha, policy=settings.policy, image_size=preprocess.image_size,
                crop_pct=preprocess.crop_pct, seed=derived_seed(settings.seed, MIXUP_SEED_TAG), cutmix=cutmix))
        done = np.asarray(root[split][L.DONE][:])
        report.per_split_rows[split] = entry["num_samples"]
        for i, shard in enumerate(entry["shards"]):
            if done[i]:
                report.resumed_shards += 1
                continue
            a, b = shard["start"], shard["stop"]
            tasks.append(ShardTask(
                store=str(store_path.resolve()), split=split, shard_file=str((manifest.root / shard["file"]).resolve()),
                start=a, stop=b, mode=manifest.mode, same_size=same_size, hashes=hashes[a:b],
                views=views[a:b], teacher=str(teacher_path.resolve()), teacher_sha256=sha, allow_entrypoint=allow_entrypoint,
                preprocess=preprocess,
                batch_size=settings.batch_size, logits=logits_format, device=str(device),
                threads=settings.threads_per_worker, fingerprint=store_fingerprint, token=token,
                partner=None if partner is None else partner[a:b], mix=None if mix is None else mix[a:b],
            ))
    total = sum(t.stop - t.start for t in tasks)
    if progress is not None:
        progress(total, f"embed {len(tasks)} shards ({report.resumed_shards} already done)")

    def on_done(result: ShardResult) -> None:
        rows = result.stop - result.start
        report.written_shards += 1
        report.written_rows += rows
        report.teacher_forwards += rows * settings.views
        if progress is not None:
            progress(rows, "")

    if tasks or not root.attrs.get(L.ATTR_COMPLETE):
        with _store_io(store_path):
            claim(root, token)
        if tasks:
            _run_tasks(tasks, settings, on_done)
        finalize(store_path)
    report.seconds = time.perf_counter() - began
    return report
