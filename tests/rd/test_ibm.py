"""InformationBottleneck: identity at eval, bounded noise in training, projection, rate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.rd import IBMOutput, InformationBottleneck


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_eval_is_identity() -> None:
    ibm = InformationBottleneck(6, init_scale=10.0, generator=_gen()).eval()
    w = torch.randn(5, 6, generator=_gen()) * 3
    out = ibm(w)
    assert isinstance(out, IBMOutput)
    assert out.noisy is w
    torch.testing.assert_close(out.projected, w, rtol=0, atol=0)
    assert out.bits.shape == (5,) and (out.bits >= 0).all()


def test_training_noise_is_bounded_and_reproducible() -> None:
    ibm = InformationBottleneck(6, init_scale=10.0, generator=_gen()).train()
    w = torch.randn(32, 6, generator=_gen()) * 3
    a, b = ibm(w, generator=_gen(4)), ibm(w, generator=_gen(4))
    torch.testing.assert_close(a.noisy, b.noisy, rtol=0, atol=0)
    assert (a.noisy - w).abs().max() <= 0.5
    assert (a.noisy - w).abs().mean() > 0.1
    assert a.bits.shape == (32,) and (a.bits >= 0).all() and a.bits.dtype == torch.float32


def test_projection_shape_and_identity_when_same_width() -> None:
    ibm = InformationBottleneck(6, init_scale=10.0, out_dim=10, generator=_gen())
    assert isinstance(ibm.projection, nn.Linear)
    out = ibm(torch.randn(4, 6, generator=_gen()), generator=_gen())
    assert out.noisy.shape == (4, 6) and out.projected.shape == (4, 10)
    assert isinstance(InformationBottleneck(6, init_scale=10.0, out_dim=6).projection, nn.Identity)
    assert isinstance(InformationBottleneck(6, init_scale=10.0).projection, nn.Identity)


def test_gradients_reach_input_projection_and_entropy_model() -> None:
    ibm = InformationBottleneck(4, init_scale=10.0, out_dim=3, generator=_gen()).train()
    w = torch.randn(8, 4, generator=_gen()).requires_grad_()
    out = ibm(w, generator=_gen())
    (out.projected.square().mean() + 0.01 * out.bits.mean()).backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    for name, p in ibm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_under_bf16_autocast_the_noise_survives_large_embeddings() -> None:
    """|w| >= 64: bf16's spacing there is 0.5, so casting w + u back to bf16 (the old code)
    rounded the noise away while the rate still counted it. The IBM now stays float32:
    noisy is exactly w + u with u the generator's U(-0.5, 0.5), and û is its projection."""
    from pipeline.rd import uniform_noise

    ibm = InformationBottleneck(4, init_scale=10.0, out_dim=3, generator=_gen()).train()
    w = (100.0 + torch.randn(8, 4, generator=_gen())).bfloat16()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = ibm(w, generator=_gen(5))
    u = uniform_noise((8, 4), device=torch.device("cpu"), generator=_gen(5))
    assert out.noisy.dtype == out.projected.dtype == out.bits.dtype == torch.float32
    torch.testing.assert_close(out.noisy, w.float() + u, rtol=0, atol=1e-5)
    assert len(torch.unique(out.noisy - w.float())) > 8  # not three values {-0.5, 0, 0.5}
    expected = w.float() + u
    torch.testing.assert_close(out.projected, expected @ ibm.projection.weight.t() + ibm.projection.bias)


def test_bad_shapes_fail_clearly() -> None:
    ibm = InformationBottleneck(4, init_scale=10.0)
    with pytest.raises(ValueError, match=r"\(B, 4\).*\(2, 5\)"):
        ibm(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="dim"):
        InformationBottleneck(0, init_scale=10.0)


def test_relative_noise_scales_with_the_embedding_and_its_rate_does_not() -> None:
    """With noise_scale k the noise is U(-0.5, 0.5)·k·RMS(w): scaling w by c scales the noisy
    embedding by c (same draw) and leaves the rate unchanged, since it is the rate of
    w / (k·RMS(w)). Unit noise (the paper's) has neither property."""
    torch.manual_seed(0)
    w = torch.randn(16, 6) * 0.05 + 0.1
    ibm = InformationBottleneck(6, init_scale=10.0, noise_scale=0.5).train()
    base = ibm(w, generator=torch.Generator().manual_seed(3))
    scaled = ibm(w * 40.0, generator=torch.Generator().manual_seed(3))
    rms = float(w.pow(2).mean().sqrt())
    assert float((base.noisy - w).abs().max()) <= 0.5 * 0.5 * rms + 1e-6
    assert float((base.noisy - w).abs().max()) > 0.1 * 0.5 * rms  # real noise, not none
    assert torch.allclose(scaled.noisy, base.noisy * 40.0, rtol=1e-5, atol=1e-6)
    assert torch.allclose(scaled.bits, base.bits, rtol=1e-5)
    unit = InformationBottleneck(6, init_scale=10.0).train()
    a = unit(w, generator=torch.Generator().manual_seed(3)).bits
    b = unit(w * 40.0, generator=torch.Generator().manual_seed(3)).bits
    assert not torch.allclose(a, b, rtol=1e-2)
    assert torch.equal(ibm.eval()(w).noisy, w)  # eval: the IBM is removed
    with pytest.raises(ValueError, match="noise_scale"):
        InformationBottleneck(6, init_scale=10.0, noise_scale=0.0)
