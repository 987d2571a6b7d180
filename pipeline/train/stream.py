"""Stream mode of stage three: images and targets read shard by shard, never a whole split.

Each epoch:

1. the split's shard list is permuted, seeded by ``(seed, epoch)`` (the same on every
   rank), so ranks and workers get other shards every epoch;
2. ``wds.WebDataset`` splits that list across DDP ranks (``wds.split_by_node``: disjoint
   whole shards per rank) and DataLoader workers (``wds.split_by_worker``);
3. each worker decodes its samples (:func:`pipeline.data.shards.decode_image`) and joins
   each to the cache by its row index: it reads the Zarr block of the tar it is streaming,
   once per tar and array (teacher views, labels, logits, embeddings and RDM outputs as the
   method needs: :func:`pipeline.train.targets.target_fields`; every block is checked on
   read), checks the join (the label in the tar must be the cached label at that row),
   takes the row's chosen view (``choice[row]``) and its targets, shuffles the samples in a
   buffer and hands chunks to the main process. Images of many sizes are rendered in the
   worker, one by one (the row's view box at the student's input size); same-size images
   travel as uint8 and are rendered as one batch on the device, from host boxes;
4. the main process moves the chunks to the device (pinned memory and non-blocking copies
   on CUDA) and re-cuts them into batches of exactly ``batch_size``, so the step count does
   not depend on how the workers' streams end.

Memory is a few blocks per worker plus the shuffle buffer and the epoch's view choice
(N int16): it does not grow with the split otherwise. Worker order interleaves, so nothing
assumes an order: every sample carries its global row index (its ``__key__``). The
``choice`` tensor comes from the training loop's seeded generator, as in memory mode, so
both modes train on the same (row, view) pairs, in a different order (``order`` is unused).

Under DDP every rank yields the same number of full batches, :attr:`StreamBatches.steps`:
the rows of the ``num_shards // world`` smallest shards (the fewest a rank can be given),
divided by the batch size. The rest of a rank's stream is dropped that epoch.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from torch import Tensor

from pipeline.cache.logits import LogitsFormat
from pipeline.cache.rdm_store import RdmHead
from pipeline.cache.reader import ShardedSplit
from pipeline.cache.store import CacheError
from pipeline.data.mixup import label_lambda
from pipeline.data.preprocess import Preprocess, render_inputs
from pipeline.data.shards import Manifest, decode_image, read_shard
from pipeline.data.streaming import check_rows_seen, exact_batches, sample_row, shard_stream
from pipeline.runtime import derived_seed
from pipeline.train.batches import steps_per_epoch
from pipeline.train.targets import Batch
from schemas import layout as L
from schemas.layout import LABEL_EXT

__all__ = ["StreamBatches"]

# One streamed sample: row, image (uint8 (C, H, W), or rendered float (C, S, S)), view box
# (5,), label, teacher logits (C,) or their packed arrays (top-k) | None (from_head: made from
# the embedding), teacher embedding (D,) | None, RDM logits (always None: made from x̂ on the
# device by RdmHead), RDM x̂ (M, D) | None; then for a cache with mixed views (else None):
# the partner's uint8 image (None when the worker rendered the mix), the mix params (6,) or (10,)
# and the partner's label.
Sample = tuple[int, np.ndarray | Tensor, np.ndarray, int, np.ndarray | None, np.ndarray | None, np.ndarray | None,
               np.ndarray | None, np.ndarray | None, np.ndarray | None, int | None]


class _Join:
    """A worker's join of streamed samples to the cache: holds the cache block of the tar it
    is reading (one read per tar and array) and picks each row's chosen view."""

    def __init__(self, teacher: ShardedSplit, rdm: ShardedSplit | None, fields: tuple[tuple[str, ...], tuple[str, ...]],
                 choice: np.ndarray, mode: str, render: Preprocess | None, urls: Sequence[str]) -> None:
        self.teacher, self.rdm, (self.fields, self.rdm_fields) = teacher, rdm, fields
        self.choice, self.mode, self.render, self.urls = choice, mode, render, list(urls)
        self.mixed = L.MIX in self.fields  # mixed views: the partners are rows of the same tar
        self.partners: list[np.ndarray] = []
        self.logits: LogitsFormat | None = getattr(teacher, "logits_format", None)
        if self.logits is not None and L.LOGITS in fields[0]:  # dense logits asked for: the reader makes them
            self.logits = None
        self.starts = [a for a, _ in teacher.shard_bounds]
        self.start, self.stop = 0, 0
        self.block: dict[str, np.ndarray] = {}
        self.rdm_block: dict[str, np.ndarray] = {}  # its own dict: the RDM cache's "logits" is not the teacher's

    def _load(self, row: int) -> None:
        shard = bisect.bisect_right(self.starts, row) - 1
        self.start, self.stop = self.teacher.shard_bounds[shard]
        self.block = self.teacher.read(self.start, self.stop, self.fields)
        if self.mixed:  # the tar's images, decoded once more: a mixed view's partner may come later in it
            self.partners = read_shard(self.urls[shard], mode=self.mode, start=self.start, stop=self.stop).images
        if self.rdm is not None and self.rdm_fields:
            self.rdm_block = self.rdm.read(self.start, self.stop, self.rdm_fields)

    def __call__(self, sample: dict) -> Sample:
        row, shard, where, ext = sample_row(sample)
        if row >= self.teacher.num_rows:
            raise CacheError(f"cache and shards disagree at row {row} ({shard}): the cache has only "
                             f"{self.teacher.num_rows} rows; rerun `cifd embed`")
        if not self.start <= row < self.stop:
            self._load(row)
        i, v = row - self.start, int(self.choice[row])
        label, cached = int(sample[LABEL_EXT]), int(self.block[L.LABELS][i])
        if label != cached:
            raise CacheError(f"cache and shards disagree at row {row} ({shard}): label {label} in the tar, "
                             f"{cached} in the cache; rerun `cifd embed`")
        image: np.ndarray | Tensor = decode_image(sample[ext], mode=self.mode, where=where)
        box = self.block[L.VIEWS][i, v]
        partner: np.ndarray | None = None
        params: np.ndarray | None = None
        partner_label: int | None = None
        if self.mixed:
            p = int(self.block[L.MIX_PARTNER][i, v]) - self.start
            if not 0 <= p < self.stop - self.start:
                raise CacheError(f"cache row {row} view {v}: its mixed view's partner lies outside its shard "
                                 f"({shard}); rerun `cifd embed`")
            partner, params, partner_label = self.partners[p], self.block[L.MIX][i, v], int(self.block[L.LABELS][p])
        if self.render is not None:  # images of many sizes: rendered here, one by one
            mix = None if partner is None else ([torch.from_numpy(partner)], torch.from_numpy(params)[None])
            image = render_inputs([torch.from_numpy(image)], torch.from_numpy(box)[None], preprocess=self.render,
                                  mix=mix)[0]
            partner = None
        emb = self.block[L.EMBEDDINGS][i, v] if L.EMBEDDINGS in self.block else None
        rdm_logits = None  # made from x̂ on the device (RdmHead), not read
        rdm_emb = self.rdm_block[L.RDM_X_HAT][i, v] if L.RDM_X_HAT in self.rdm_block else None
        if self.logits is None:
            logits = self.block[L.LOGITS][i, v]
        elif self.logits.kind == "from_head":  # the embedding travels once, in its own slot
            logits = None
        else:
            logits = self.logits.pack({f: self.block[f][i, v] for f in self.logits.fields})
        return row, image, box, label, logits, emb, rdm_logits, rdm_emb, partner, params, partner_label


class StreamBatches:
    """A :class:`~pipeline.train.batches.BatchSource` streaming one split of the shards and
    of the caches.

    Args:
        manifest: the shard manifest (its split must hold the cache's rows, same shards).
        split: ``"train"``.
        teacher: the teacher cache's split; ``rdm``: the RDM cache's split, or None.
        fields: the (teacher, RDM) arrays the method learns from
            (:func:`pipeline.train.targets.target_fields`).
        preprocess: the student's input (size, filter, normalisation).
        batch_size: rows per batch.
        workers: DataLoader worker processes (0: decode in this process).
        device: where batches go.
        rank, world: this process's DDP rank and world size (checked against what
            webdataset sees: ``RANK``/``WORLD_SIZE`` or the initialised process group).
        seed: base of the per-epoch shard permutation and shuffle-buffer seeds.
        shuffle_buffer: samples held per worker to shuffle across shard boundaries.
    """

    def __init__(self, manifest: Manifest, split: str, *, teacher: ShardedSplit, rdm: ShardedSplit | None,
                 fields: tuple[tuple[str, ...], tuple[str, ...]], preprocess: Preprocess, batch_size: int,
                 workers: int, device: torch.device, rank: int, world: int, seed: int, shuffle_buffer: int,
                 rdm_head: RdmHead | None = None) -> None:
        entry = manifest.split(split)
        if rdm is not None and fields[1] and rdm_head is None:
            raise ValueError("streaming RDM targets needs the RDM cache's heads (rdm_head=RdmCache.head)")
        if entry["num_samples"] != teacher.num_rows:
            raise CacheError(f"the {split} shards hold {entry['num_samples']} rows but the cache holds "
                             f"{teacher.num_rows}; the cache was made from other shards: rerun `cifd embed`")
        self.urls = [str(manifest.root / s["file"]) for s in entry["shards"]]
        sizes = sorted(s["stop"] - s["start"] for s in entry["shards"])
        if world > 1 and len(self.urls) < world:
            raise ValueError(f"stream mode gives each of the {world} ranks whole shards, but the {split} split has "
                             f"only {len(self.urls)}; use distill.data: memory, or prepare smaller shards")
        self.num_rows = teacher.num_rows
        self.rows: Tensor | None = None  # every row: the stream reads whole shards
        self.teacher, self.rdm, self.fields = teacher, rdm, fields
        self.rdm_head = rdm_head.to(device) if rdm_head is not None else None  # RDM logits: made in _yield
        fmt: LogitsFormat | None = getattr(teacher, "logits_format", None)
        # Packed teacher logits (from_head, top-k) are made on the device, in _yield.
        self.logits = fmt.to(device) if fmt is not None and fmt.packed and L.LOGITS not in fields[0] else None
        self.mode, self.preprocess = manifest.mode, preprocess
        self.same_size = manifest.image_shape is not None  # one uint8 batch, rendered on the device
        self.batch_size, self.workers, self.device = batch_size, workers, device
        self.rank, self.world, self.seed, self.shuffle_buffer = rank, world, seed, shuffle_buffer
        fewest = sum(sizes[:len(sizes) // world]) if world > 1 else self.num_rows
        self.steps = steps_per_epoch(fewest, batch_size, world)

    def dataset(self, epoch: int, choice: Tensor) -> wds.WebDataset:
        """This rank's sample pipeline for ``epoch`` under the view ``choice`` (N,) of each row
        (iterate it for chunks, lists of batched tensors)."""
        seen = wds.utils.pytorch_worker_info()[:2]
        if seen != (self.rank, self.world):
            raise RuntimeError(f"webdataset sees rank {seen[0]} of {seen[1]} but training runs as rank {self.rank} "
                               f"of {self.world}; launch with torchrun (it sets RANK and WORLD_SIZE) or "
                               "initialise the process group before streaming")
        join = _Join(self.teacher, self.rdm, self.fields, choice.cpu().to(torch.int16).numpy(), self.mode,
                     None if self.same_size else self.preprocess, self.urls)
        return shard_stream(self.urls, seed=derived_seed(self.seed, epoch), join=join,
                            shuffle_buffer=self.shuffle_buffer, batch_size=self.batch_size)

    def _yield(self, parts: Sequence[Tensor | None], choice: Tensor,
               seen: Tensor) -> tuple[Tensor, Tensor, Tensor, Batch]:
        """One batch on the device from a host chunk: same-size uint8 images are rendered here,
        on the device, from host view boxes (no device synchronisation); images of many sizes
        arrive rendered."""
        rows, images, boxes, labels, logits, emb, rdm_logits, rdm_emb, partners, params, partner_labels = parts
        assert rows is not None and images is not None and boxes is not None and labels is not None
        seen[rows] += 1

        def dev(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(self.device, non_blocking=True)

        images = images.to(self.device, non_blocking=True)
        mix = None if partners is None or params is None else (partners.to(self.device, non_blocking=True), params)
        x = images if not self.same_size else render_inputs(images, boxes, preprocess=self.preprocess, mix=mix)
        mix_labels = None
        if params is not None and partner_labels is not None:
            mix_labels = (partner_labels.to(self.device, non_blocking=True), label_lambda(params, self.preprocess.image_size).to(self.device))
        rdm_emb = None if rdm_emb is None else dev(rdm_emb).transpose(0, 1)  # type: ignore[union-attr]  # (M, B, D)
        rdm_logits = None if rdm_emb is None or self.rdm_head is None else self.rdm_head(rdm_emb)  # (M, B, C)
        if self.logits is None:
            teacher_logits, kept = dev(logits).float(), None  # type: ignore[union-attr]
        else:  # packed (from_head: the embedding slot), made into logits here, on the device
            packed = dev(emb if self.logits.kind == "from_head" else logits)
            teacher_logits, kept = self.logits.unpack(packed)  # type: ignore[arg-type]
        batch = Batch(labels=dev(labels), teacher_logits=teacher_logits, teacher_emb=dev(emb),  # type: ignore[arg-type]
                      rdm_logits=rdm_logits, rdm_emb=rdm_emb,
                      teacher_kept=kept, mix_labels=mix_labels)
        return dev(rows), dev(choice[rows]), x, batch  # type: ignore[return-value]

    def __call__(self, epoch: int, order: Tensor, choice: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor, Batch]]:
        cuda = self.device.type == "cuda"
        choice = choice.cpu()
        loader = wds.WebLoader(self.dataset(epoch, choice), batch_size=None, shuffle=False, num_workers=self.workers,
                               pin_memory=cuda, persistent_workers=False)
        seen = torch.zeros(self.num_rows, dtype=torch.int32)  # host bookkeeping: no device sync
        done = 0
        for parts in exact_batches(loader, batch_size=self.batch_size, steps=self.steps,
                                   partial_last=self.world == 1):
            done += 1
            yield self._yield(parts, choice, seen)
        check_rows_seen(seen, batches=done, steps=self.steps, batch_size=self.batch_size, world=self.world,
                        rank=self.rank, epoch=epoch)
