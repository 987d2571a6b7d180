"""Unit tests for pipeline.losses: tiny CPU tensors, no models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kd_reference as ref

from pipeline.losses import (
    CIFDLoss,
    KDLoss,
    cifd_loss,
    comparative_kd,
    dgkd_loss,
    feature_distortion,
    hinton_kd,
    kd_dropout_mask,
    kd_kl,
)

B, C, D, M = 6, 5, 4, 3


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    g = _gen(1)
    return {
        "student_logits": torch.randn(B, C, generator=g),
        "teacher_logits": torch.randn(B, C, generator=g),
        "labels": torch.randint(0, C, (B,), generator=g),
        "rdm_logits": torch.randn(M, B, C, generator=g),
        "student_embedding_proj": torch.randn(B, D, generator=g),
        "teacher_embedding": torch.randn(B, D, generator=g),
        "rdm_embeddings": torch.randn(M, B, D, generator=g),
        "student_bits": torch.rand(B, generator=g) * 10,
    }


def _cifd(batch: dict[str, torch.Tensor], **overrides) -> CIFDLoss:
    kwargs = dict(
        batch,
        rdm_weights=torch.tensor([1.0, 0.5, 0.25]),
        ce_weight=1.0,
        kl_weight=1.0,
        temperature=2.0,
        feature_weight=100.0,
        rate_weight=0.005,
        distortion="mse",
        keep=None,
    )
    kwargs.update(overrides)
    return cifd_loss(**kwargs)


# ---------------------------------------------------------------- reference math
# Expected values come from tests/kd_reference.py (float64, written out by hand) or from
# hand-computed numbers; never from the function under test or its own wrappers.

def _ref_cifd_total(batch: dict[str, torch.Tensor], *, lam, keep=None, ce_w=1.0, kl_w=1.0, beta=100.0,
                    lam_i=0.005, tau=2.0, distortion="mse") -> float:
    """DESIGN §2 from the batch tensors: λ_CE·CE + λ_KL·[k_0·KL_T + Σ k_n λ_n KL_n]
    + β·[k_0·dist(û,x) + Σ k_n λ_n dist(û,x̂_n)] + λ_I·mean bits (k: the keep mask)."""
    zs, lam = batch["student_logits"], [float(v) for v in lam]
    m = len(lam)
    k = [True] * (1 + m) if keep is None else [bool(v) for v in keep]
    kl = k[0] * ref.kl(batch["teacher_logits"], zs, tau)
    kl = kl + sum(k[1 + n] * lam[n] * ref.kl(batch["rdm_logits"][n], zs, tau) for n in range(m))
    u = batch["student_embedding_proj"]
    feat = k[0] * ref.dist(u, batch["teacher_embedding"], distortion)
    feat = feat + sum(k[1 + n] * lam[n] * ref.dist(u, batch["rdm_embeddings"][n], distortion) for n in range(m))
    rate = batch["student_bits"].double().mean()
    return float(ce_w * ref.ce(zs, batch["labels"]) + kl_w * kl + beta * feat + lam_i * rate)


# ---------------------------------------------------------------- kd_kl


def test_kd_kl_zero_when_student_equals_teacher():
    z = torch.randn(B, C, generator=_gen())
    loss = kd_kl(student_logits=z.clone(), teacher_logits=z, temperature=2.0)
    assert loss.shape == ()
    assert abs(loss.item()) <= 1e-6


def test_kd_kl_positive_and_matches_definition(batch):
    zs, zt = batch["student_logits"], batch["teacher_logits"]
    loss = kd_kl(student_logits=zs, teacher_logits=zt, temperature=3.0)
    assert loss.item() > 0
    assert loss.item() == pytest.approx(ref.kl(zt, zs, 3.0).item(), rel=1e-5)


def test_kd_kl_direction_is_teacher_target(batch):
    zs, zt = batch["student_logits"], batch["teacher_logits"]
    loss = kd_kl(student_logits=zs, teacher_logits=zt, temperature=1.0)
    reverse = ref.kl(zs, zt, 1.0).item()
    assert loss.item() == pytest.approx(ref.kl(zt, zs, 1.0).item(), rel=1e-5)
    assert loss.item() != pytest.approx(reverse, rel=1e-3)


def test_kd_kl_known_value_with_tau_squared():
    # τ = 2, teacher logits (2 ln 3, 0) → p = softmax((ln 3, 0)) = (3/4, 1/4); a uniform
    # student → q = (1/2, 1/2). KL(p‖q) = ¾ ln(3/2) + ¼ ln(1/2), times τ² = 4.
    tau = 2.0
    zt = torch.tensor([[2 * math.log(3.0), 0.0]])
    zs = torch.zeros(1, 2)
    expected = tau**2 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert kd_kl(student_logits=zs, teacher_logits=zt, temperature=tau).item() == pytest.approx(expected, rel=1e-6)
    # The batch mean: a second row with student = teacher adds 0 and halves the mean.
    two = kd_kl(student_logits=torch.cat([zs, zt]), teacher_logits=torch.cat([zt, zt]), temperature=tau)
    assert two.item() == pytest.approx(expected / 2, rel=1e-6)


def test_kd_kl_tau_squared_scaling(batch):
    zs, zt = batch["student_logits"], batch["teacher_logits"]
    tau = 4.0
    scaled = kd_kl(student_logits=zs, teacher_logits=zt, temperature=tau)
    assert scaled.item() == pytest.approx(ref.kl(zt, zs, tau).item(), rel=1e-5)
    # Without the τ² factor the value would be 16x smaller.
    softened = ref.kl(zt, zs, tau).item() / tau**2
    assert scaled.item() == pytest.approx(tau**2 * softened, rel=1e-5)
    assert scaled.item() > 10 * softened


def test_kd_kl_bf16_inputs_give_float32(batch):
    loss = kd_kl(
        student_logits=batch["student_logits"].bfloat16(),
        teacher_logits=batch["teacher_logits"].bfloat16(),
        temperature=2.0,
    )
    assert loss.dtype == torch.float32


def test_kd_kl_gradient_reaches_only_student(batch):
    zs = batch["student_logits"].clone().requires_grad_(True)
    zt = batch["teacher_logits"].clone().requires_grad_(True)
    kd_kl(student_logits=zs, teacher_logits=zt, temperature=2.0).backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert zt.grad is None


@pytest.mark.parametrize(
    ("zs_shape", "zt_shape", "match"),
    [((B, C), (B, C + 1), "teacher_logits"), ((B, C, 1), (B, C, 1), "student_logits"), ((0, C), (0, C), "empty")],
)
def test_kd_kl_bad_shapes_raise(zs_shape, zt_shape, match):
    with pytest.raises(ValueError, match=match):
        kd_kl(student_logits=torch.zeros(zs_shape), teacher_logits=torch.zeros(zt_shape), temperature=1.0)


@pytest.mark.parametrize("tau", [0.0, -1.0, math.inf, math.nan])
def test_kd_kl_bad_temperature_raises(batch, tau):
    with pytest.raises(ValueError, match="temperature"):
        kd_kl(student_logits=batch["student_logits"], teacher_logits=batch["teacher_logits"], temperature=tau)


def test_kd_kl_is_keyword_only(batch):
    with pytest.raises(TypeError):
        kd_kl(batch["student_logits"], batch["teacher_logits"], 2.0)  # type: ignore[misc]


# ---------------------------------------------------------------- hinton_kd


def test_hinton_alpha_zero_is_ce_and_alpha_one_is_kd(batch):
    zs, zt, y = batch["student_logits"], batch["teacher_logits"], batch["labels"]
    ce = ref.ce(zs, y)
    kd = ref.kl(zt, zs, 2.0)
    out0 = hinton_kd(student_logits=zs, teacher_logits=zt, labels=y, temperature=2.0, alpha=0.0)
    out1 = hinton_kd(student_logits=zs, teacher_logits=zt, labels=y, temperature=2.0, alpha=1.0)
    assert isinstance(out0, KDLoss)
    assert out0.total.item() == pytest.approx(ce.item(), rel=1e-6)
    assert out1.total.item() == pytest.approx(kd.item(), rel=1e-6)
    half = hinton_kd(student_logits=zs, teacher_logits=zt, labels=y, temperature=2.0, alpha=0.3)
    assert half.total.item() == pytest.approx(0.7 * ce.item() + 0.3 * kd.item(), rel=1e-6)
    assert half.ce.item() == pytest.approx(ce.item(), rel=1e-6)
    assert half.kd.item() == pytest.approx(kd.item(), rel=1e-6)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, math.nan])
def test_hinton_bad_alpha_raises(batch, alpha):
    with pytest.raises(ValueError, match="alpha"):
        hinton_kd(
            student_logits=batch["student_logits"],
            teacher_logits=batch["teacher_logits"],
            labels=batch["labels"],
            temperature=2.0,
            alpha=alpha,
        )


def test_hinton_bad_labels_raise(batch):
    with pytest.raises(ValueError, match="labels"):
        hinton_kd(
            student_logits=batch["student_logits"],
            teacher_logits=batch["teacher_logits"],
            labels=batch["labels"][:-1],
            temperature=2.0,
            alpha=0.5,
        )
    with pytest.raises(ValueError, match="labels"):
        hinton_kd(
            student_logits=batch["student_logits"],
            teacher_logits=batch["teacher_logits"],
            labels=batch["labels"].float(),
            temperature=2.0,
            alpha=0.5,
        )


# ---------------------------------------------------------------- feature_distortion


@pytest.mark.parametrize("kind", ["mse", "smooth_l1"])
def test_feature_distortion_zero_when_equal_and_matches_torch(batch, kind):
    u, x = batch["student_embedding_proj"], batch["teacher_embedding"]
    assert feature_distortion(student=x.clone(), target=x, kind=kind).item() == 0.0
    u = 3 * u  # differences on both sides of 1, so smooth_l1 uses both of its branches
    expected = ref.dist(u, x, kind)
    assert feature_distortion(student=u, target=x, kind=kind).item() == pytest.approx(expected.item(), rel=1e-6)


def test_feature_distortion_target_detached_and_float32(batch):
    u = batch["student_embedding_proj"].bfloat16().requires_grad_(True)
    x = batch["teacher_embedding"].bfloat16().requires_grad_(True)
    loss = feature_distortion(student=u, target=x, kind="mse")
    assert loss.dtype == torch.float32
    loss.backward()
    assert u.grad is not None and x.grad is None


def test_feature_distortion_bad_arguments(batch):
    u, x = batch["student_embedding_proj"], batch["teacher_embedding"]
    with pytest.raises(ValueError, match="kind"):
        feature_distortion(student=u, target=x, kind="l2")
    with pytest.raises(ValueError, match="shape"):
        feature_distortion(student=u, target=x[:, :-1], kind="mse")


# ---------------------------------------------------------------- kd_dropout_mask


def test_dropout_rate_zero_keeps_all_and_rate_one_drops_all():
    keep = kd_dropout_mask(num_targets=7, rate=0.0, generator=_gen())
    assert keep.dtype == torch.bool and keep.shape == (7,) and bool(keep.all())
    drop = kd_dropout_mask(num_targets=7, rate=1.0, generator=_gen())
    assert not bool(drop.any())
    # Deterministic rates need no generator.
    assert bool(kd_dropout_mask(num_targets=3, rate=0.0, generator=None).all())
    assert not bool(kd_dropout_mask(num_targets=3, rate=1.0, generator=None).any())


def test_dropout_is_reproducible_from_seed():
    a = kd_dropout_mask(num_targets=32, rate=0.5, generator=_gen(7))
    b = kd_dropout_mask(num_targets=32, rate=0.5, generator=_gen(7))
    assert torch.equal(a, b)


def test_dropout_empirical_frequency_matches_rate():
    g = _gen(3)
    draws = torch.stack([kd_dropout_mask(num_targets=4, rate=0.25, generator=g) for _ in range(4000)])
    drop_freq = 1.0 - draws.float().mean().item()
    # 16000 Bernoulli(0.25): std ≈ 0.0034; allow 5 std.
    assert abs(drop_freq - 0.25) < 0.02
    # Each target dropped independently: each column has the same rate.
    per_target = 1.0 - draws.float().mean(0)
    assert torch.all((per_target - 0.25).abs() < 0.04)


def test_dropout_needs_generator_for_random_rates():
    with pytest.raises(ValueError, match="generator"):
        kd_dropout_mask(num_targets=4, rate=0.25, generator=None)


@pytest.mark.parametrize(("num", "rate"), [(-1, 0.1), (3, -0.1), (3, 1.1), (3, math.nan)])
def test_dropout_bad_arguments(num, rate):
    with pytest.raises(ValueError):
        kd_dropout_mask(num_targets=num, rate=rate, generator=_gen())


# ---------------------------------------------------------------- cifd_loss


def test_cifd_returns_named_parts_in_float32(batch):
    out = _cifd(batch)
    assert isinstance(out, CIFDLoss)
    assert out.kl_rdm.shape == (M,) and out.feat_rdm.shape == (M,)
    for v in out:
        assert v.dtype == torch.float32


def test_cifd_components_match_reference_math(batch):
    out = _cifd(batch)
    zs, u = batch["student_logits"], batch["student_embedding_proj"]
    assert out.ce.item() == pytest.approx(ref.ce(zs, batch["labels"]).item(), rel=1e-6)
    assert out.kl_teacher.item() == pytest.approx(ref.kl(batch["teacher_logits"], zs, 2.0).item(), rel=1e-5)
    feat = ref.dist(u, batch["teacher_embedding"], "mse").item()
    assert out.feat_teacher.item() == pytest.approx(feat, rel=1e-6)
    for n in range(M):
        assert out.kl_rdm[n].item() == pytest.approx(ref.kl(batch["rdm_logits"][n], zs, 2.0).item(), rel=1e-5)
        expected = ref.dist(u, batch["rdm_embeddings"][n], "mse").item()
        assert out.feat_rdm[n].item() == pytest.approx(expected, rel=1e-6)
    assert out.rate.item() == pytest.approx(batch["student_bits"].double().mean().item(), rel=1e-6)


def test_cifd_known_value_on_a_hand_computed_example():
    # B = 1, C = 2, D = 2, M = 1; τ = 2, λ_1 = 0.5, β = 10, λ_I = 0.01, λ_CE = λ_KL = 1.
    # CE of a uniform student on label 0: ln 2. KL to the teacher (2 ln 3, 0) at τ = 2:
    # τ²·(¾ ln 3/2 + ¼ ln 1/2); the RDM's logits equal the student's: KL 0.
    # û = (1, 0): MSE to x = (0, 0) is ½, to x̂ = (1, 2) is 2. Bits 3.
    out = cifd_loss(
        student_logits=torch.zeros(1, 2), labels=torch.tensor([0]),
        teacher_logits=torch.tensor([[2 * math.log(3.0), 0.0]]), rdm_logits=torch.zeros(1, 1, 2),
        student_embedding_proj=torch.tensor([[1.0, 0.0]]), teacher_embedding=torch.zeros(1, 2),
        rdm_embeddings=torch.tensor([[[1.0, 2.0]]]), student_bits=torch.tensor([3.0]),
        rdm_weights=[0.5], ce_weight=1.0, kl_weight=1.0, temperature=2.0, feature_weight=10.0,
        rate_weight=0.01, distortion="mse", keep=None,
    )
    kl_t = 4 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    expected = math.log(2) + kl_t + 10 * (0.5 + 0.5 * 2.0) + 0.01 * 3.0
    assert out.total.item() == pytest.approx(expected, rel=1e-6)
    assert (out.ce.item(), out.kl_teacher.item(), out.feat_teacher.item(), out.rate.item()) == pytest.approx(
        (math.log(2), kl_t, 0.5, 3.0), rel=1e-6)
    assert out.kl_rdm.tolist() == pytest.approx([0.0], abs=1e-7) and out.feat_rdm.tolist() == pytest.approx([2.0])


@pytest.mark.parametrize("distortion", ["mse", "smooth_l1"])
def test_cifd_total_is_formula_with_all_kept(batch, distortion):
    lam = torch.tensor([1.0, 0.5, 0.25])
    # Embeddings spread wide enough that smooth_l1 sees both of its branches.
    batch = {**batch, "rdm_embeddings": 3 * batch["rdm_embeddings"]}
    out = _cifd(batch, rdm_weights=lam, ce_weight=0.7, kl_weight=1.3, feature_weight=10.0, rate_weight=0.01,
                distortion=distortion)
    hand = _ref_cifd_total(batch, lam=lam, ce_w=0.7, kl_w=1.3, beta=10.0, lam_i=0.01, distortion=distortion)
    assert out.total.item() == pytest.approx(hand, rel=1e-5)


def test_cifd_kd_dropout_removes_dropped_terms(batch):
    lam = torch.tensor([1.0, 0.5, 0.25])
    g = _gen(11)
    seen_partial = False
    full = _cifd(batch, rdm_weights=lam, keep=None)
    for _ in range(20):
        keep = kd_dropout_mask(num_targets=1 + M, rate=0.5, generator=g)
        out = _cifd(batch, rdm_weights=lam, keep=keep)
        # Components are still reported for logging, whatever was dropped.
        for a, b in zip(out[1:], full[1:], strict=True):
            assert torch.allclose(a, b)
        hand = _ref_cifd_total(batch, lam=lam, keep=keep)
        assert out.total.item() == pytest.approx(hand, rel=1e-5)
        if 0 < int(keep.sum()) < 1 + M:
            seen_partial = True
            assert out.total.item() < full.total.item()
    assert seen_partial


def test_cifd_all_dropped_leaves_ce_and_rate(batch):
    keep = kd_dropout_mask(num_targets=1 + M, rate=1.0, generator=None)
    out = _cifd(batch, keep=keep)
    expected = ref.ce(batch["student_logits"], batch["labels"]) + 0.005 * batch["student_bits"].double().mean()
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_cifd_dropped_teacher_gets_no_gradient_through_student_path(batch):
    """A dropped target must not pull the student: gradient equals the kept-only loss."""
    zs = batch["student_logits"].clone().requires_grad_(True)
    keep = torch.tensor([False, True, True, True])
    _cifd({**batch, "student_logits": zs}, keep=keep).total.backward()
    g_drop = zs.grad.clone()
    zs.grad = None
    _cifd({**batch, "student_logits": zs}, keep=None).total.backward()
    g_all = zs.grad.clone()
    zs.grad = None
    ref.kl(batch["teacher_logits"], zs, 2.0).backward()  # the teacher's KL term alone, by hand
    assert torch.allclose(g_all - zs.grad.float(), g_drop, atol=1e-6)


def test_cifd_m0_no_features_reduces_to_ce_plus_kd(batch):
    zs, zt, y = batch["student_logits"], batch["teacher_logits"], batch["labels"]
    out = cifd_loss(
        student_logits=zs,
        labels=y,
        teacher_logits=zt,
        rdm_logits=torch.zeros(0, B, C),
        student_embedding_proj=None,
        teacher_embedding=None,
        rdm_embeddings=None,
        student_bits=None,
        rdm_weights=torch.zeros(0),
        ce_weight=1.0,
        kl_weight=1.0,
        temperature=2.0,
        feature_weight=100.0,
        rate_weight=0.005,
        distortion="mse",
        keep=None,
    )
    expected = ref.ce(zs, y) + ref.kl(zt, zs, 2.0)
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.kl_rdm.shape == (0,) and out.feat_rdm.shape == (0,)
    assert out.feat_teacher.item() == 0.0 and out.rate.item() == 0.0


def test_cifd_feature_term_zero_when_u_equals_targets(batch):
    x = batch["teacher_embedding"]
    out = _cifd(
        batch,
        student_embedding_proj=x.clone(),
        rdm_embeddings=x.unsqueeze(0).expand(M, B, D).clone(),
        distortion="smooth_l1",
    )
    assert out.feat_teacher.item() == 0.0
    assert torch.all(out.feat_rdm == 0)


def test_cifd_gradients_reach_only_student(batch):
    leaves = {k: v.clone().requires_grad_(True) for k, v in batch.items() if k != "labels"}
    _cifd({**batch, **leaves}).total.backward()
    for name in ("student_logits", "student_embedding_proj", "student_bits"):
        assert leaves[name].grad is not None, name
        assert leaves[name].grad.abs().sum() > 0, name
    for name in ("teacher_logits", "rdm_logits", "teacher_embedding", "rdm_embeddings"):
        assert leaves[name].grad is None, name


def test_cifd_bf16_inputs_give_float32(batch):
    bf = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in batch.items()}
    out = _cifd(bf)
    for v in out:
        assert v.dtype == torch.float32
    expected = _cifd(batch)
    assert out.total.item() == pytest.approx(expected.total.item(), rel=0.05)


def test_cifd_soft_labels_match_hard_labels(batch):
    y = batch["labels"]
    out_soft = _cifd(batch, labels=F.one_hot(y, C).float())
    out_hard = _cifd(batch)
    assert out_soft.ce.item() == pytest.approx(out_hard.ce.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"teacher_logits": torch.zeros(B, C + 1)}, "teacher_logits"),
        ({"rdm_logits": torch.zeros(M, B + 1, C)}, "rdm_logits"),
        ({"rdm_logits": torch.zeros(B, C)}, "rdm_logits"),
        ({"rdm_weights": torch.ones(M + 1)}, "rdm_weights"),
        ({"rdm_weights": torch.tensor([1.0, -1.0, 1.0])}, "rdm_weights"),
        ({"labels": torch.zeros(B + 1, dtype=torch.long)}, "labels"),
        ({"teacher_embedding": torch.zeros(B, D + 1)}, "teacher_embedding"),
        ({"teacher_embedding": None}, "teacher_embedding"),
        ({"rdm_embeddings": torch.zeros(M - 1, B, D)}, "rdm_embeddings"),
        ({"rdm_embeddings": None}, "rdm_embeddings"),
        ({"student_bits": torch.zeros(B, 2)}, "student_bits"),
        ({"keep": torch.ones(M, dtype=torch.bool)}, "keep"),
        ({"keep": torch.ones(M + 1)}, "keep"),
        ({"distortion": "l3"}, "distortion"),
        ({"feature_weight": -1.0}, "feature_weight"),
        ({"temperature": 0.0}, "temperature"),
    ],
)
def test_cifd_bad_arguments_raise_value_error(batch, override, match):
    with pytest.raises(ValueError, match=match) as info:
        _cifd(batch, **override)
    assert len(str(info.value)) > 30  # says what was expected, not just the name


def test_cifd_embeddings_without_student_projection_raise(batch):
    with pytest.raises(ValueError, match="student_embedding_proj"):
        _cifd(batch, student_embedding_proj=None)


def test_cifd_is_keyword_only():
    with pytest.raises(TypeError):
        cifd_loss(torch.zeros(B, C))  # type: ignore[misc]


# ---------------------------------------------------------------- dgkd_loss


def test_dgkd_is_weighted_multi_target_kd(batch):
    lam = torch.tensor([1.0, 0.5, 0.25])
    keep = torch.tensor([True, False, True, True])
    out = dgkd_loss(
        student_logits=batch["student_logits"],
        labels=batch["labels"],
        teacher_logits=batch["teacher_logits"],
        assistant_logits=batch["rdm_logits"],
        assistant_weights=lam,
        ce_weight=0.6,
        kl_weight=1.5,
        temperature=3.0,
        keep=keep,
    )
    assert isinstance(out, CIFDLoss)
    # λ_CE·CE + λ_KL·[KL_T + λ_2 KL_2 + λ_3 KL_3] (assistant 1 dropped), no feature or rate term.
    zs = batch["student_logits"]
    kl = ref.kl(batch["teacher_logits"], zs, 3.0) + sum(
        lam[n].item() * ref.kl(batch["rdm_logits"][n], zs, 3.0) for n in (1, 2))
    expected = 0.6 * ref.ce(zs, batch["labels"]) + 1.5 * kl
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.feat_teacher.item() == 0.0 and out.rate.item() == 0.0


# ---------------------------------------------------------------- comparative_kd


def test_comparative_zero_when_student_equals_teacher(batch):
    z = batch["teacher_logits"]
    assert comparative_kd(student_logits=z.clone(), teacher_logits=z, generator=_gen()).item() <= 1e-12


def test_comparative_invariant_to_shared_shift(batch):
    zt = batch["teacher_logits"]
    c = torch.randn(C, generator=_gen(5))
    loss = comparative_kd(student_logits=zt + c, teacher_logits=zt, generator=_gen())
    assert loss.item() <= 1e-10
    # A per-row shift is not shared: differences change, so the loss is positive on logits...
    rows = torch.randn(B, 1, generator=_gen(6))
    assert comparative_kd(student_logits=zt + rows, teacher_logits=zt, generator=_gen()).item() > 1e-4
    # ...but log-softmax removes per-row shifts.
    shifted = comparative_kd(student_logits=zt + rows, teacher_logits=zt, generator=_gen(), temperature=2.0)
    assert shifted.item() <= 1e-10


def test_comparative_positive_and_matches_hand_pairs(batch):
    zs, zt = batch["student_logits"], batch["teacher_logits"]
    loss = comparative_kd(student_logits=zs, teacher_logits=zt, generator=None)
    assert loss.item() > 0
    expected = ref.comparative(zs, zt, cycle=torch.arange(B))  # generator=None pairs i with i+1 (mod B)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_comparative_random_pairing_has_no_fixed_points_and_is_seeded(batch):
    zs, zt = batch["student_logits"], batch["teacher_logits"]
    a = comparative_kd(student_logits=zs, teacher_logits=zt, generator=_gen(9))
    b = comparative_kd(student_logits=zs, teacher_logits=zt, generator=_gen(9))
    assert a.item() == b.item()
    # With B=2 the only derangement swaps the two rows.
    zs2, zt2 = zs[:2], zt[:2]
    for seed in range(5):
        got = comparative_kd(student_logits=zs2, teacher_logits=zt2, generator=_gen(seed))
        expected = ref.comparative(zs2, zt2, cycle=torch.tensor([0, 1]))
        assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_comparative_batch_of_one_is_zero_with_graph(batch):
    zs = batch["student_logits"][:1].clone().requires_grad_(True)
    loss = comparative_kd(student_logits=zs, teacher_logits=batch["teacher_logits"][:1], generator=_gen())
    assert loss.item() == 0.0
    loss.backward()
    assert zs.grad is not None and torch.all(zs.grad == 0)


def test_comparative_gradients_and_dtype(batch):
    zs = batch["student_logits"].bfloat16().requires_grad_(True)
    zt = batch["teacher_logits"].bfloat16().requires_grad_(True)
    loss = comparative_kd(student_logits=zs, teacher_logits=zt, generator=_gen(), temperature=2.0)
    assert loss.dtype == torch.float32
    loss.backward()
    assert zs.grad is not None and zt.grad is None


def test_comparative_bad_shapes_raise(batch):
    with pytest.raises(ValueError, match="teacher_logits"):
        comparative_kd(student_logits=batch["student_logits"], teacher_logits=batch["teacher_logits"][:-1])
    with pytest.raises(ValueError, match="temperature"):
        comparative_kd(student_logits=batch["student_logits"], teacher_logits=batch["teacher_logits"], temperature=-1.0)
