"""Stream mode of stage three: images read from the WebDataset shards, never all in memory.

Each epoch:

1. the split's shard list is permuted, seeded by ``(seed, epoch)`` (the same on every
   rank), so ranks and workers get other shards every epoch;
2. ``wds.WebDataset`` splits that list across DDP ranks (``wds.split_by_node``: disjoint
   whole shards per rank) and DataLoader workers (``wds.split_by_worker``);
3. each worker decodes its samples (:func:`pipeline.data.shards.decode_image`), checks the
   join (the label in the tar must be the cached label at that row), shuffles them in a
   buffer and hands chunks of ``(rows, images)`` to the main process. Images of many sizes
   are rendered in the worker, one by one (the row's chosen cached view box at the student's
   input size), so a chunk is a float batch; same-size images travel as uint8 and are
   rendered as one batch on the device;
4. the main process moves the chunks to the device (pinned memory and non-blocking copies
   on CUDA) and re-cuts them into batches of exactly ``batch_size``, so the step count does
   not depend on how the workers' streams end.

Worker order interleaves, so nothing assumes an order: every sample carries its global row
index (its ``__key__``), and its view (``choice[row]``) and targets are looked up by it. The
``choice`` tensor comes from the training loop's seeded generator, as in memory mode, so
both modes train on the same (row, view) pairs, in a different order (``order`` is unused).

Under DDP every rank yields the same number of full batches, :attr:`StreamBatches.steps`:
the rows of the ``num_shards // world`` smallest shards (the fewest a rank can be given),
divided by the batch size. The rest of a rank's stream is dropped that epoch.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds
from torch import Tensor

from pipeline.cache.store import CacheError
from pipeline.data.preprocess import Preprocess, render_inputs
from pipeline.data.shards import CorruptSampleError, Manifest, decode_image
from pipeline.runtime import derived_seed
from pipeline.train.batches import steps_per_epoch
from schemas.layout import IMAGE_EXTS, KEY_DIGITS, LABEL_EXT

__all__ = ["StreamBatches"]


def _decode(sample: dict, *, labels: np.ndarray, mode: str) -> tuple[int, np.ndarray]:
    """One WebDataset sample → (global row, uint8 image (C, H, W)), after the join check."""
    key = str(sample["__key__"])
    shard = str(sample.get("__url__", "?")).rsplit("/", 1)[-1]
    where = f"shard {shard} sample {key}"
    if len(key) != KEY_DIGITS or not key.isdigit():
        raise CorruptSampleError(f"{where}: key is not a {KEY_DIGITS}-digit row index; rerun `cifd prepare`")
    row = int(key)
    if row >= len(labels):
        raise CacheError(f"cache and shards disagree at row {row} ({shard}): the cache has only {len(labels)} "
                         "rows; rerun `cifd embed`")
    exts = [e for e in IMAGE_EXTS if e in sample]
    if len(exts) != 1 or LABEL_EXT not in sample:
        raise CorruptSampleError(f"{where}: expected one image and a '.{LABEL_EXT}' member, got "
                                 f"{sorted(k for k in sample if not k.startswith('__'))}")
    label = int(sample[LABEL_EXT])
    if label != labels[row]:
        raise CacheError(f"cache and shards disagree at row {row} ({shard}): label {label} in the tar, "
                         f"{int(labels[row])} in the cache; rerun `cifd embed`")
    return row, decode_image(sample[exts[0]], mode=mode, where=where)


def _render(item: tuple[int, np.ndarray], *, boxes: Tensor, preprocess: Preprocess) -> tuple[int, Tensor]:
    """(row, uint8 image (C, H, W)) → (row, its chosen view at the model's input, (C, S, S))."""
    row, image = item
    return row, render_inputs([torch.from_numpy(image)], boxes[row:row + 1], preprocess=preprocess)[0]


def _collate(samples: list[tuple[int, np.ndarray | Tensor]]) -> tuple[Tensor, Tensor]:
    rows = torch.tensor([s[0] for s in samples], dtype=torch.int64)  # (n,)
    images = torch.stack([torch.as_tensor(s[1]) for s in samples])  # (n, C, H, W) uint8 or (n, C, S, S) float
    return rows, images


class StreamBatches:
    """A :class:`~pipeline.train.batches.BatchSource` streaming one split of the shards.

    Args:
        manifest: the shard manifest (its split must have as many rows as ``labels``).
        split: ``"train"``.
        labels: the cached labels of the split (N,), for the join check.
        boxes: every row's cached view boxes (N, V, 5), on ``device``.
        preprocess: the student's input (size, filter, normalisation).
        batch_size: rows per batch.
        workers: DataLoader worker processes (0: decode in this process).
        device: where batches go.
        rank, world: this process's DDP rank and world size (checked against what
            webdataset sees: ``RANK``/``WORLD_SIZE`` or the initialised process group).
        seed: base of the per-epoch shard permutation and shuffle-buffer seeds.
        shuffle_buffer: samples held per worker to shuffle across shard boundaries.
    """

    def __init__(self, manifest: Manifest, split: str, *, labels: np.ndarray, boxes: Tensor, preprocess: Preprocess,
                 batch_size: int, workers: int, device: torch.device, rank: int, world: int, seed: int,
                 shuffle_buffer: int) -> None:
        entry = manifest.split(split)
        if entry["num_samples"] != len(labels):
            raise CacheError(f"the {split} shards hold {entry['num_samples']} rows but the cache holds {len(labels)}; "
                             "the cache was made from other shards: rerun `cifd embed`")
        self.urls = [str(manifest.root / s["file"]) for s in entry["shards"]]
        sizes = sorted(s["stop"] - s["start"] for s in entry["shards"])
        if world > 1 and len(self.urls) < world:
            raise ValueError(f"stream mode gives each of the {world} ranks whole shards, but the {split} split has "
                             f"only {len(self.urls)}; use distill.data: memory, or prepare smaller shards")
        self.num_rows = len(labels)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.mode = manifest.mode
        self.boxes, self.preprocess = boxes, preprocess
        self.same_size = manifest.image_shape is not None  # one uint8 batch, rendered on the device
        self.host_boxes = boxes.cpu()  # views are looked up on the host: no device sync per batch
        self.batch_size, self.workers, self.device = batch_size, workers, device
        self.rank, self.world, self.seed, self.shuffle_buffer = rank, world, seed, shuffle_buffer
        fewest = sum(sizes[:len(sizes) // world]) if world > 1 else self.num_rows
        self.steps = steps_per_epoch(fewest, batch_size, world)

    def dataset(self, epoch: int, choice: Tensor | None = None) -> wds.WebDataset:
        """This rank's sample pipeline for ``epoch`` (iterate it for ``(rows, images)`` chunks);
        images of many sizes come rendered under the view ``choice`` (N,) of each row."""
        seen = wds.utils.pytorch_worker_info()[:2]
        if seen != (self.rank, self.world):
            raise RuntimeError(f"webdataset sees rank {seen[0]} of {seen[1]} but training runs as rank {self.rank} "
                               f"of {self.world}; launch with torchrun (it sets RANK and WORLD_SIZE) or "
                               "initialise the process group before streaming")
        seed = derived_seed(self.seed, epoch)
        perm = torch.randperm(len(self.urls), generator=torch.Generator().manual_seed(seed)).tolist()
        # The list is permuted here, before the node split, so that ranks get other shards each
        # epoch; webdataset's own shard shuffle runs after the split (within a rank's share).
        pipeline = wds.WebDataset([self.urls[i] for i in perm], shardshuffle=False, seed=seed,
                                  nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
                                  empty_check=False)
        pipeline = pipeline.map(functools.partial(_decode, labels=self.labels, mode=self.mode))
        if not self.same_size:
            if choice is None:
                raise ValueError("images of many sizes are rendered in the loader: pass the epoch's view choice")
            chosen = self.host_boxes[torch.arange(self.num_rows), choice.cpu()]  # (N, 5)
            pipeline = pipeline.map(functools.partial(_render, boxes=chosen, preprocess=self.preprocess))
        return (pipeline
                .shuffle(self.shuffle_buffer, seed=seed)
                .batched(self.batch_size, collation_fn=_collate, partial=True))

    def _emit(self, rows: Tensor, choice: Tensor, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One batch on the device from host ``rows`` (B,), the epoch's host ``choice`` (N,) and
        the loader's images: same-size uint8 images are rendered here, on the device, from host
        view boxes (no device synchronisation); images of many sizes arrive rendered."""
        views = choice[rows]
        x = images if not self.same_size else render_inputs(images, self.host_boxes[rows, views],
                                                             preprocess=self.preprocess)
        return rows.to(self.device, non_blocking=True), views.to(self.device, non_blocking=True), x

    def __call__(self, epoch: int, order: Tensor, choice: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        cuda = self.device.type == "cuda"
        choice = choice.cpu()
        loader = wds.WebLoader(self.dataset(epoch, choice), batch_size=None, shuffle=False, num_workers=self.workers,
                               pin_memory=cuda, persistent_workers=False)
        seen = torch.zeros(self.num_rows, dtype=torch.int32)  # host bookkeeping: no device sync
        rows_buf = torch.zeros(0, dtype=torch.int64)
        images_buf: Tensor | None = None
        done = 0
        for rows, images in loader:
            rows_buf = torch.cat([rows_buf, rows])
            images = images.to(self.device, non_blocking=cuda)
            images_buf = images if images_buf is None else torch.cat([images_buf, images])
            while len(rows_buf) >= self.batch_size and done < self.steps:
                rows, rows_buf = rows_buf[:self.batch_size], rows_buf[self.batch_size:]
                batch, images_buf = images_buf[:self.batch_size], images_buf[self.batch_size:]
                seen[rows] += 1
                done += 1
                yield self._emit(rows, choice, batch)
            if done == self.steps:
                break
        if done < self.steps and len(rows_buf) > 0 and self.world == 1:  # the last, partial batch
            assert images_buf is not None
            seen[rows_buf] += 1
            done += 1
            yield self._emit(rows_buf, choice, images_buf)
        if done != self.steps:
            raise CacheError(f"rank {self.rank} streamed {int(seen.sum())} rows in epoch {epoch + 1}, fewer than the "
                             f"{self.steps} batches of {self.batch_size} expected; the shards do not match "
                             "their manifest: rerun `cifd prepare`")
        expected = "exactly once" if self.world == 1 else "at most once"
        bad = (seen != 1) if self.world == 1 else (seen > 1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise CacheError(f"row {row} was streamed {int(seen[row])} times in epoch {epoch + 1}, expected "
                             f"{expected}; the shards do not match their manifest: rerun `cifd prepare`")

