"""Stage two's loop (``pipeline.train.rdm.train_bank``): what loss it optimises.

R weighs the squared error *summed* over the D embedding dims (of the scaled embedding)
against the bits of a sample, so R means the same for any embedding width.
"""

from __future__ import annotations

import pytest
import torch

import kd_reference as ref
from pipeline.rd import RDMBank
from pipeline.train.rdm import EmbeddingSet, RdmTrainSettings, train_bank

N, D, C, HIDDEN = 24, 16, 3, 8
RATE_WEIGHTS = (4.0, 1.0)
SCALE = 2.5


def _data(seed: int) -> EmbeddingSet:
    g = torch.Generator().manual_seed(seed)
    return EmbeddingSet(embeddings=3.0 * torch.randn(N, D, generator=g), logits=torch.randn(N, C, generator=g),
                        labels=torch.randint(0, C, (N,), generator=g))


def test_train_bank_weighs_r_times_the_squared_error_summed_over_d_against_bits() -> None:
    train, val = _data(0), _data(1)
    bank = RDMBank(num_rdms=len(RATE_WEIGHTS), in_dim=D, hidden=HIDDEN, num_classes=C, init_scale=1.0,
                   generator=torch.Generator().manual_seed(0))
    cfg = RdmTrainSettings(rate_weights=RATE_WEIGHTS, ce_weight=0.5, kl_weight=1.5, temperature=2.0,
                           distortion="mse", epochs=1, batch_size=64, eval_batch_size=64, lr=1e-3, pct_start=0.3,
                           density_lr_factor=10.0, seed=0)
    calls: list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = []

    def record(module, args, output) -> None:  # what the loop fed the bank, and what it gave
        calls.append((args[0].detach().clone(), tuple(t.detach().clone() for t in output)))

    handle = bank.register_forward_hook(record)
    try:
        logs = train_bank(bank, train=train, val=val, cfg=cfg, scale=SCALE)
    finally:
        handle.remove()

    # One epoch of one batch (batch_size >= N): the logged loss is that batch's loss, computed
    # on the bank's outputs before its only optimizer step.
    assert len(logs) == 1
    x, (x_hat, logits, bits) = calls[0]
    # The batch is every train row once (in the loop's order), divided by the scale.
    rows = torch.cdist(x * SCALE, train.embeddings).argmin(dim=1)
    assert sorted(rows.tolist()) == list(range(N))
    torch.testing.assert_close(x, train.embeddings[rows] / SCALE)

    expected = 0.0
    for m, r in enumerate(RATE_WEIGHTS):
        sq_err_summed_over_d = ((x_hat[m].double() - x.double()) ** 2).sum(dim=1).mean()
        expected += (r * sq_err_summed_over_d + bits[m].double().mean()
                     + 0.5 * ref.ce(logits[m], train.labels[rows])
                     + 1.5 * ref.kl(train.logits[rows], logits[m], 2.0))
    assert logs[0].loss == pytest.approx(float(expected), rel=1e-5)
    # R on the per-dim mean instead (rdm_loss without the factor D) is another loss.
    per_dim_mse = [float(((x_hat[m].double() - x.double()) ** 2).mean()) for m in range(len(RATE_WEIGHTS))]
    without_d = float(expected) - sum(r * (D - 1) * e for r, e in zip(RATE_WEIGHTS, per_dim_mse, strict=True))
    assert logs[0].loss != pytest.approx(without_d, rel=1e-2)
