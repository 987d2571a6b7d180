"""Per-step host synchronisations (issue 12, item 7): the view replay and stage three's
target gathering decide everything on the host (view boxes, row splits) and never ask the
device for a value. The CUDA tests run under ``torch.cuda.set_sync_debug_mode("error")``,
which raises on any synchronising call; the CPU tests check that the sync-free paths render
the same pixels as one view at a time."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from pipeline.cache.logits import LogitsFormat
from pipeline.data.preprocess import Preprocess, render_inputs
from pipeline.data.resample import resample_boxes
from pipeline.data.views import replay_views
from pipeline.train.batches import MemoryBatches
from pipeline.train.targets import Targets

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _images(n: int = 6, size: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _mixed_boxes(n: int = 6, out: int = 12) -> torch.Tensor:
    """Integer output-sized boxes (exact copies) and fractional ones (resampled), interleaved."""
    boxes = torch.zeros(n, 5)
    for i in range(n):
        boxes[i] = (torch.tensor([2.0, 1.0, out, out, i % 2]) if i % 2 == 0
                    else torch.tensor([0.5, 1.25, 10.5, 13.0, 1.0]))
    return boxes


def test_a_mixed_batch_replays_as_each_view_alone() -> None:
    images = _images().float() / 255
    boxes = _mixed_boxes()
    together = replay_views(images, boxes, out_size=12)
    alone = torch.cat([replay_views(images[i:i + 1], boxes[i:i + 1], out_size=12) for i in range(len(boxes))])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)


def test_one_image_resamples_alike_with_and_without_the_host_cut() -> None:
    """The B = 1 cut to the reached pixels runs on the host only; the full product (what a
    device runs, no synchronisation) gives the same pixels."""
    image = _images(2, 40).float()
    box = torch.tensor([[3.5, 7.25, 10.0, 12.5, 1.0]])
    cut = resample_boxes(image[:1], box, out_size=8, interpolation="bicubic")
    full = resample_boxes(image, box.expand(2, 5), out_size=8, interpolation="bicubic")[:1]  # B = 2: no cut
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-4)


@contextmanager
def _no_sync() -> Iterator[None]:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@cuda
def test_replay_on_the_device_does_not_synchronise() -> None:
    device = torch.device("cuda")
    images = _images().to(device)
    pre = Preprocess(image_size=12, crop_pct=1.0, interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3)
    expected = render_inputs(images.cpu(), _mixed_boxes(), preprocess=pre)
    with _no_sync():
        for boxes in (_mixed_boxes(), _mixed_boxes()[::2].contiguous(), _mixed_boxes()[1::2].contiguous()):
            render_inputs(images[: len(boxes)], boxes, preprocess=pre)
        one = render_inputs(images[1:2], _mixed_boxes()[1:2], preprocess=pre)  # B = 1 on the device
        got = render_inputs(images, _mixed_boxes(), preprocess=pre)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(one.cpu(), expected[1:2], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@cuda
def test_memory_batches_and_head_logits_do_not_synchronise() -> None:
    """Memory mode with a from_head cache: boxes looked up on the host, pixels rendered on
    the device, logits made from the held embeddings through the head, no synchronisation."""
    device = torch.device("cuda")
    n, v, d, c = 32, 2, 8, 5
    g = torch.Generator().manual_seed(1)
    images = _images(n).to(device)
    views = torch.stack([_mixed_boxes(n)] * v, dim=1)  # (N, V, 5)
    emb = torch.randn(n, v, d, generator=g).half()
    fmt = LogitsFormat("from_head", "float32", None, c, torch.randn(c, d, generator=g), torch.randn(c, generator=g))
    targets = Targets(views=views.to(device), labels=torch.randint(c, (n,), generator=g).to(device),
                      teacher_logits=emb.to(device), teacher_emb=None, rdm_head=None, rdm_emb=None, emb_scale=1.0,
                      logits=fmt.to(device))
    pre = Preprocess(image_size=12, crop_pct=1.0, interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3)
    source = MemoryBatches(images, targets, preprocess=pre, batch_size=8, rank=0, world=1)
    order, choice = torch.randperm(n, generator=g), torch.randint(v, (n,), generator=g)
    with _no_sync():
        batches = list(source(0, order, choice))
    rows, views_d, _, batch = batches[0]
    expected = emb[rows.cpu(), views_d.cpu()].float() @ fmt.head_weight.T + fmt.head_bias
    np.testing.assert_allclose(batch.teacher_logits.cpu().numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
