"""The rate-distortion tests run on tensors of a few thousand elements, where intra-op
threading costs far more than it saves (10x slower on a busy 2-core box): every test here
uses the shared ``one_thread`` fixture."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _single_thread(one_thread: None) -> None:
    """Apply ``one_thread`` to every test of this folder."""
