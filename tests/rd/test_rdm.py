"""RDMBank and rdm_loss: shapes, batching equivalence, independence, training behaviour."""

from __future__ import annotations

import pytest
import torch

from pipeline.rd import RDMBank, RDMLoss, RDMOutput, rdm_loss


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _clusters(
    *, n: int, dim: int, classes: int, scale: float, spread: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings around class centres, labels, and teacher logits that agree with them."""
    g = _gen(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, dim, generator=g)
    x = (centres[labels] + spread * torch.randn(n, dim, generator=g)) * scale  # (N, D)
    teacher_logits = -torch.cdist(x / scale, centres) ** 2  # (N, C)
    return x, labels, teacher_logits


def _loss(bank_out: RDMOutput, x, y, zt, rates, **kw) -> RDMLoss:
    args = {"ce_weight": 1.0, "kl_weight": 1.0, "temperature": 2.0} | kw
    return rdm_loss(
        output=bank_out,
        embeddings=x,
        teacher_logits=zt,
        labels=y,
        rate_weights=torch.as_tensor(rates, dtype=torch.float32),
        **args,
    )


def _fit(bank: RDMBank, x, y, zt, rates, *, steps: int, lr: float = 1e-2, **kw) -> None:
    g = _gen(123)
    opt = torch.optim.Adam(bank.parameters(), lr=lr)
    bank.train()
    for _ in range(steps):
        loss = _loss(bank(x, generator=g), x, y, zt, rates, **kw)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
    bank.eval()


def test_shapes_and_nonnegative_rate() -> None:
    bank = RDMBank(init_scale=10.0, num_rdms=3, in_dim=6, hidden=8, num_classes=5, generator=_gen())
    x = torch.randn(10, 6, generator=_gen())
    for mode in (True, False):
        out = bank.train(mode)(x, generator=_gen())
        assert isinstance(out, RDMOutput)
        assert out.x_hat.shape == (3, 10, 6)
        assert out.logits.shape == (3, 10, 5)
        assert out.bits.shape == (3, 10) and out.bits.dtype == torch.float32
        assert (out.bits >= 0).all()


def test_same_generator_same_output() -> None:
    bank = RDMBank(init_scale=10.0, num_rdms=2, in_dim=4, hidden=8, num_classes=3, generator=_gen())
    x = torch.randn(5, 4, generator=_gen())
    a, b = bank(x, generator=_gen(9)), bank(x, generator=_gen(9))
    torch.testing.assert_close(a.x_hat, b.x_hat, rtol=0, atol=0)
    again = RDMBank(init_scale=10.0, num_rdms=2, in_dim=4, hidden=8, num_classes=3, generator=_gen())
    for p, q in zip(bank.parameters(), again.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_rdms_are_initialised_independently() -> None:
    bank = RDMBank(init_scale=10.0, num_rdms=2, in_dim=4, hidden=8, num_classes=3, generator=_gen())
    assert not torch.equal(bank.enc1.weight[0], bank.enc1.weight[1])
    bound = 1 / 4**0.5  # nn.Linear's kaiming-uniform bound for fan_in = 4
    assert bank.enc1.weight.abs().max() <= bound


def _single_from_bank(bank: RDMBank, m: int) -> RDMBank:
    """Copy RDM m of ``bank`` into a fresh bank of one, by hand from the state dict."""
    h = bank.hidden
    one = RDMBank(init_scale=10.0, num_rdms=1, in_dim=bank.in_dim, hidden=h, num_classes=bank.num_classes)
    own = bank.state_dict()
    state = {}
    for key, value in one.state_dict().items():
        if key.startswith("bottleneck."):
            state[key] = own[key][m * h : (m + 1) * h].clone()
        else:
            state[key] = own[key][m : m + 1].clone()
        assert state[key].shape == value.shape, key
    one.load_state_dict(state)
    return one.eval()


def test_batched_bank_equals_each_rdm_alone() -> None:
    bank = RDMBank(init_scale=10.0, num_rdms=3, in_dim=6, hidden=8, num_classes=4, generator=_gen())
    x = torch.randn(9, 6, generator=_gen(1)) * 3
    zt = torch.randn(9, 4, generator=_gen())
    _fit(bank, x, torch.arange(9) % 4, zt, [1.0, 2.0, 3.0], steps=5)
    full = bank.eval()(x)
    for m in range(3):
        alone = _single_from_bank(bank, m)(x)
        torch.testing.assert_close(alone.x_hat[0], full.x_hat[m])
        torch.testing.assert_close(alone.logits[0], full.logits[m])
        torch.testing.assert_close(alone.bits[0], full.bits[m])


def test_subset_matches_manual_copy_and_order() -> None:
    bank = RDMBank(init_scale=10.0, num_rdms=3, in_dim=5, hidden=4, num_classes=3, generator=_gen()).eval()
    x = torch.randn(6, 5, generator=_gen(1))
    full = bank(x)
    sub = bank.subset([2, 0])
    assert sub.num_rdms == 2 and not sub.training
    out = sub(x)
    torch.testing.assert_close(out.x_hat, full.x_hat[[2, 0]])
    torch.testing.assert_close(out.bits, full.bits[[2, 0]])
    with pytest.raises(ValueError, match="indices"):
        bank.subset([3])


def test_rdms_do_not_share_gradients() -> None:
    bank = RDMBank(init_scale=10.0, num_rdms=2, in_dim=4, hidden=6, num_classes=3, generator=_gen())
    x = torch.randn(8, 4, generator=_gen())
    y, zt = torch.arange(8) % 3, torch.randn(8, 3, generator=_gen())
    loss = _loss(bank(x, generator=_gen()), x, y, zt, [1.0, 1.0])
    (loss.distortion[0] + loss.rate[0] + loss.ce[0] + loss.kl[0]).backward()
    for name, p in bank.named_parameters():
        rows = 6 if name.startswith("bottleneck.") else 1  # RDM 1 owns channels 6..11
        assert p.grad[:rows].abs().sum() > 0, name
        assert p.grad[rows:].abs().sum() == 0, name


def test_loss_total_is_sum_of_weighted_parts() -> None:
    bank = RDMBank(init_scale=10.0, num_rdms=2, in_dim=4, hidden=6, num_classes=3, generator=_gen())
    x = torch.randn(8, 4, generator=_gen())
    y, zt = torch.arange(8) % 3, torch.randn(8, 3, generator=_gen())
    out = bank(x, generator=_gen())
    loss = _loss(out, x, y, zt, [2.0, 5.0], ce_weight=0.5, kl_weight=3.0, temperature=4.0)
    expected = (
        torch.tensor([2.0, 5.0]) * loss.distortion
        + loss.rate
        + 0.5 * loss.ce
        + 3.0 * 16.0 * loss.kl
    ).sum()
    torch.testing.assert_close(loss.total, expected)
    torch.testing.assert_close(loss.rate, out.bits.mean(1))
    torch.testing.assert_close(loss.distortion, (out.x_hat - x).square().mean((1, 2)))
    assert loss.total.ndim == 0 and loss.ce.shape == loss.kl.shape == (2,)


def test_kl_is_zero_when_rdm_matches_teacher_and_smooth_l1() -> None:
    x = torch.randn(4, 3, generator=_gen())
    zt = torch.randn(4, 5, generator=_gen(1))
    out = RDMOutput(x_hat=x.expand(2, 4, 3), logits=zt.expand(2, 4, 5), bits=torch.zeros(2, 4))
    loss = _loss(out, x, torch.zeros(4, dtype=torch.long), zt, [1.0, 1.0], distortion="smooth_l1")
    torch.testing.assert_close(loss.kl, torch.zeros(2))
    torch.testing.assert_close(loss.distortion, torch.zeros(2))
    shifted = out._replace(x_hat=x.expand(2, 4, 3) + 3.0)  # |err| = 3 > 1: smooth-L1 = 3 - 0.5
    y = torch.zeros(4, dtype=torch.long)
    loss = _loss(shifted, x, y, zt, [1.0, 1.0], distortion="smooth_l1")
    torch.testing.assert_close(loss.distortion, torch.full((2,), 2.5))


def test_loss_validation_errors() -> None:
    bank = RDMBank(init_scale=10.0, num_rdms=2, in_dim=4, hidden=6, num_classes=3, generator=_gen())
    x = torch.randn(8, 4, generator=_gen())
    y, zt = torch.arange(8) % 3, torch.randn(8, 3, generator=_gen())
    out = bank(x, generator=_gen())
    with pytest.raises(ValueError, match=r"'huber'.*'mse', 'smooth_l1'"):
        _loss(out, x, y, zt, [1.0, 1.0], distortion="huber")
    with pytest.raises(ValueError, match=r"rate_weights has shape \(3,\), expected \(2,\)"):
        _loss(out, x, y, zt, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"teacher_logits has shape \(8, 4\), expected \(8, 3\)"):
        _loss(out, x, y, torch.zeros(8, 4), [1.0, 1.0])
    with pytest.raises(ValueError, match=r"embeddings has shape"):
        _loss(out, x[:, :3], y, zt, [1.0, 1.0])
    with pytest.raises(ValueError, match="integer class indices"):
        _loss(out, x, y.float(), zt, [1.0, 1.0])
    with pytest.raises(ValueError, match="temperature"):
        _loss(out, x, y, zt, [1.0, 1.0], temperature=0.0)
    with pytest.raises(ValueError, match=r"\(B, 4\).*\(8, 5\)"):
        bank(torch.zeros(8, 5))
    with pytest.raises(ValueError, match="hidden"):
        RDMBank(init_scale=10.0, num_rdms=1, in_dim=4, hidden=0, num_classes=3)


def test_bf16_autocast_keeps_rate_float32() -> None:
    bank = RDMBank(init_scale=10.0, num_rdms=2, in_dim=4, hidden=6, num_classes=3, generator=_gen()).eval()
    x = torch.randn(8, 4, generator=_gen())
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = bank(x)
        loss = _loss(out, x, torch.arange(8) % 3, torch.randn(8, 3, generator=_gen()), [1.0, 1.0])
    assert out.bits.dtype == torch.float32 and loss.total.dtype == torch.float32
    assert torch.isfinite(loss.total)
    out64 = bank.double()(x)  # input cast to the parameter dtype
    assert out64.x_hat.dtype == torch.float64 and out64.bits.dtype == torch.float32


def test_bank_overfits_a_tiny_batch() -> None:
    x, y, zt = _clusters(n=32, dim=8, classes=4, scale=1.0, spread=0.3, seed=0)
    bank = RDMBank(init_scale=10.0, num_rdms=1, in_dim=8, hidden=32, num_classes=4, generator=_gen())
    with torch.no_grad():
        before = _loss(bank.eval()(x), x, y, zt, [1000.0]).distortion
    _fit(bank, x, y, zt, [1000.0], steps=300)
    with torch.no_grad():
        out = bank(x)
        after = _loss(out, x, y, zt, [1000.0]).distortion
    accuracy = (out.logits[0].argmax(-1) == y).float().mean().item()
    assert accuracy == 1.0
    assert after.item() < before.item() / 10, (before, after)


def test_rate_rises_and_distortion_falls_with_rate_weight() -> None:
    x, y, zt = _clusters(n=128, dim=4, classes=4, scale=10.0, spread=1.0, seed=1)
    bank = RDMBank(init_scale=10.0, num_rdms=3, in_dim=4, hidden=16, num_classes=4, generator=_gen())
    rates = [0.1, 1.0, 10.0]
    _fit(bank, x, y, zt, rates, steps=200, ce_weight=0.0, kl_weight=0.0)
    with torch.no_grad():
        loss = _loss(bank(x), x, y, zt, rates, ce_weight=0.0, kl_weight=0.0)
    bits, dist = loss.rate.tolist(), loss.distortion.tolist()
    assert bits[0] < bits[1] < bits[2], bits
    assert dist[0] > dist[1] > dist[2], dist
