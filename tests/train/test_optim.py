"""The one-cycle schedule: torch's own, except where torch divides by zero."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.train.optim import one_cycle


def _lrs(make, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = make(opt)
    out = []
    for _ in range(steps):
        opt.step()
        sched.step()
        out.append(opt.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("pct", [0.1, 0.15, 0.2, 0.25, 0.5])
@pytest.mark.parametrize("total", [1, 2, 3, 4, 5, 9, 10, 11, 20])
def test_one_cycle_runs_every_short_schedule_and_is_torchs_elsewhere(total: int, pct: float) -> None:
    ours = _lrs(lambda o: one_cycle(o, max_lr=0.1, total_steps=total, pct_start=pct, cycle_momentum=False),
                total - 1)  # OneCycleLR allows total_steps - 1 steps after its first lr
    assert all(math.isfinite(lr) and lr >= 0 for lr in ours)
    if abs(pct * total - 1) > 1e-9:  # torch's schedule works here: ours is exactly it
        ref = _lrs(lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=total, pct_start=pct,
                                                                  cycle_momentum=False), total - 1)
        assert ours == ref
    else:  # torch itself fails on the first lr of this schedule
        with pytest.raises(ZeroDivisionError):
            torch.optim.lr_scheduler.OneCycleLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1),
                                                max_lr=0.1, total_steps=total, pct_start=pct, cycle_momentum=False)
