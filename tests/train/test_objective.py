"""The β warm-up of the CIFD loss: the ramp's values, and ``ramp`` reaching only β."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.train.objective import LossWeights, feature_ramp, method_loss, rdm_weight_tensor
from pipeline.train.student import StudentOutput
from pipeline.train.targets import Batch

W = LossWeights(temperature=2.0, kd_alpha=0.9, ce_weight=1.0, kl_weight=1.0, rdm_weights=None, feature_weight=100.0,
                rate_weight=0.005, kd_dropout=0.0, distortion="mse", ckd_weight=0.0, feature_warmup=0.5)


def test_feature_ramp_rises_linearly_over_the_warmup_then_stays_at_one() -> None:
    # 10 steps, warm-up 0.5: 5 warm-up steps, factor (step + 1) / 5.
    assert [feature_ramp(W, s, 10) for s in range(10)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1, 1, 1, 1, 1, 1])
    assert feature_ramp(dataclasses.replace(W, feature_warmup=0.0), 0, 10) == 1.0


def test_ramp_scales_only_the_feature_term() -> None:
    g = torch.Generator().manual_seed(0)
    b, c, d, m = 4, 3, 5, 2
    out = StudentOutput(logits=torch.randn(b, c, generator=g), projected=torch.randn(b, d, generator=g),
                        bits=torch.rand(b, generator=g) * 10)
    batch = Batch(labels=torch.tensor([0, 1, 2, 0]), teacher_logits=torch.randn(b, c, generator=g),
                  teacher_emb=torch.randn(b, d, generator=g), rdm_logits=torch.randn(m, b, c, generator=g),
                  rdm_emb=torch.randn(m, b, d, generator=g))
    lam = rdm_weight_tensor(W, m, torch.device("cpu"))

    def loss(weights: LossWeights, ramp: float) -> float:
        return float(method_loss("cifd", out=out, batch=batch, weights=weights, rdm_weights=lam, emb_scale=2.0,
                                 generator=torch.Generator().manual_seed(1), ramp=ramp))

    no_features = loss(dataclasses.replace(W, feature_weight=0.0), 1.0)
    full = loss(W, 1.0)
    assert loss(W, 0.0) == pytest.approx(no_features, rel=1e-6)
    assert loss(W, 0.25) == pytest.approx(no_features + 0.25 * (full - no_features), rel=1e-6)


def test_sample_feature_norm_is_two_minus_two_cosine_and_scale_free() -> None:
    """feature_norm = sample: each of û, x, x̂_n divided by its own RMS, so the MSE of a pair
    is 2 − 2·cos(û, x) (computed here directly), whatever the scale of either side."""
    g = torch.Generator().manual_seed(0)
    b, c, d, m = 4, 3, 6, 1
    u, x, xr = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g), torch.randn(m, b, d, generator=g)
    batch = Batch(labels=torch.tensor([0, 1, 2, 0]), teacher_logits=torch.randn(b, c, generator=g),
                  teacher_emb=x, rdm_logits=torch.randn(m, b, c, generator=g), rdm_emb=xr)
    weights = dataclasses.replace(W, feature_warmup=0.0, feature_norm="sample", rate_weight=0.0)
    lam = rdm_weight_tensor(weights, m, torch.device("cpu"))

    def loss(projected: torch.Tensor, beta: float) -> float:
        out = StudentOutput(logits=torch.zeros(b, c), projected=projected, bits=torch.zeros(b))
        return float(method_loss("cifd", out=out, batch=batch, weights=dataclasses.replace(weights, feature_weight=beta),
                                 rdm_weights=lam, emb_scale=7.0, generator=torch.Generator().manual_seed(1)))

    cos = torch.nn.functional.cosine_similarity
    expected = (2 - 2 * cos(u, x, dim=1)).mean() + (2 - 2 * cos(u, xr[0], dim=1)).mean()
    assert loss(u, 10.0) - loss(u, 0.0) == pytest.approx(10.0 * float(expected), rel=1e-5)
    assert loss(u * 50.0, 10.0) == pytest.approx(loss(u, 10.0), rel=1e-5)
