"""Fixtures for the rate-distortion tests: tiny tensors, one CPU thread.

The math here runs on tensors of a few thousand elements, where intra-op threading costs
far more than it saves (10x slower on a busy 2-core box), so each test runs single-threaded
and the previous setting is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


