"""The optimizer and one-cycle schedule built from ``OptimConfig`` (``pipeline.train.optim``).

The named fix: torch's ``OneCycleLR`` cycles the momentum between 0.85 and 0.95 by default,
overriding the configured SGD momentum / AdamW β1; ``make_scheduler`` keeps the configured
value unless ``cycle_momentum`` is set.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.train.optim import make_optimizer, make_scheduler
from schemas.config import OptimConfig

STEPS = 20


def _momenta(optim: OptimConfig) -> tuple[list[float], list[float]]:
    """(momentum or β1, lr) of the first param group before each step of a full schedule."""
    param = torch.nn.Parameter(torch.ones(3))
    opt = make_optimizer([param], optim)
    sched = make_scheduler(opt, optim, total_steps=STEPS)
    momenta, lrs = [], []
    for _ in range(STEPS):
        group = opt.param_groups[0]
        momenta.append(group["momentum"] if optim.name == "sgd" else group["betas"][0])
        lrs.append(group["lr"])
        param.grad = torch.ones_like(param)
        opt.step()
        sched.step()
    return momenta, lrs


@pytest.mark.parametrize(("name", "momentum"), [("sgd", 0.9), ("adamw", 0.9), ("adamw", 0.8), ("sgd", 0.5)])
def test_configured_momentum_stays_exactly_through_the_schedule(name: str, momentum: float) -> None:
    momenta, lrs = _momenta(OptimConfig(name=name, momentum=momentum, lr=0.1, pct_start=0.25))
    assert momenta == [momentum] * STEPS  # exactly, at every step
    # The learning rate does follow the one cycle: up to lr at pct_start, then down.
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(0.1) and 3 <= peak <= 6
    assert lrs[0] < 0.1 / 10 and lrs[-1] < 0.1 / 100


def test_sgd_is_nesterov_with_the_configured_momentum_and_adamw_keeps_beta2() -> None:
    sgd = make_optimizer([torch.nn.Parameter(torch.ones(1))], OptimConfig(name="sgd", momentum=0.9, lr=0.1))
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["nesterov"]
    adamw = make_optimizer([torch.nn.Parameter(torch.ones(1))], OptimConfig(name="adamw", momentum=0.8, lr=0.1))
    assert adamw.param_groups[0]["betas"] == (0.8, 0.999)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_cycle_momentum_true_moves_it_as_torch_does(name: str) -> None:
    """What the code did before the fix (torch's default): 0.95 at the start, 0.85 at the
    LR peak, back to 0.95 at the end, whatever momentum was configured."""
    momenta, _ = _momenta(OptimConfig(name=name, momentum=0.9, lr=0.1, pct_start=0.25, cycle_momentum=True))
    assert momenta[0] == pytest.approx(0.95)
    assert min(momenta) == pytest.approx(0.85, abs=1e-3)
    assert momenta[-1] > 0.94 and len(set(momenta)) > 5
    assert all(0.85 - 1e-9 <= m <= 0.95 + 1e-9 for m in momenta)
