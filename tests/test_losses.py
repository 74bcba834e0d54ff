"""Unit tier for llmkd.losses: float64 references written from the papers' formulas (never calling the code
under test), identities, -inf safety, masking and gradients. Every test runs in milliseconds."""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import pytest
import torch

from llmkd import losses
from llmkd.losses import LOSSES, SOFT_TARGET_LOSSES

INF = float("inf")
LOGIT_NAMES = list(LOSSES["logits"])
PROBABILITY_NAMES = [name for name in LOGIT_NAMES if name != "mse"]
OTHER_LOSSES = [(family, name) for family in ("hidden", "attention", "relation") for name in LOSSES[family]]
LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]


def randn(*shape: int, seed: int = 0, scale: float = 1.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(dtype)


def attention_maps(batch: int = 2, heads: int = 3, length: int = 4, seed: int = 0) -> torch.Tensor:
    """Softmax maps with the last key of the first example masked: exactly 0, as transformers returns."""
    scores = randn(batch, heads, length, length, seed=seed, scale=2.0)
    scores[0, :, :, -1] = -INF
    return scores.softmax(-1)


def family_inputs(family: str, seed: int = 0, dtype: torch.dtype = torch.float64):
    if family == "hidden":
        return randn(2, 3, 6, seed=seed, dtype=dtype), randn(2, 3, 6, seed=seed + 100, dtype=dtype)
    if family == "attention":
        return attention_maps(seed=seed).to(dtype), attention_maps(seed=seed + 100).to(dtype)
    return randn(5, 3, seed=seed, dtype=dtype), randn(5, 4, seed=seed + 100, dtype=dtype)


# ------------------------------------------------------------------ float64 references (numpy, from the papers)


def softmax_ref(z: np.ndarray, temperature: float) -> np.ndarray:
    e = np.exp(z / temperature - (z / temperature).max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl_ref(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * np.log(p / q)).sum(-1)


def jsd_ref(ps: np.ndarray, pt: np.ndarray, beta: float) -> np.ndarray:
    m = beta * pt + (1 - beta) * ps
    return beta * kl_ref(pt, m) + (1 - beta) * kl_ref(ps, m)


# (student probs, teacher probs, student logits, teacher logits, T) -> per-position values, default params
LOGIT_REFERENCES = {
    "forward_kl": lambda ps, pt, zs, zt, t: kl_ref(pt, ps),
    "kl": lambda ps, pt, zs, zt, t: kl_ref(pt, ps),
    "reverse_kl": lambda ps, pt, zs, zt, t: kl_ref(ps, pt),
    "jsd": lambda ps, pt, zs, zt, t: jsd_ref(ps, pt, 0.5),
    "skew_kl": lambda ps, pt, zs, zt, t: kl_ref(pt, 0.1 * pt + 0.9 * ps),
    "skew_reverse_kl": lambda ps, pt, zs, zt, t: kl_ref(ps, 0.1 * ps + 0.9 * pt),
    "tvd": lambda ps, pt, zs, zt, t: 0.5 * np.abs(pt - ps).sum(-1),
    "soft_ce": lambda ps, pt, zs, zt, t: -(pt * np.log(ps)).sum(-1),
    "mse": lambda ps, pt, zs, zt, t: ((zs / t - zt / t) ** 2).mean(-1),
}


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


def rkd_distance_ref(s: np.ndarray, t: np.ndarray) -> float:
    pairs = [(i, j) for i in range(len(s)) for j in range(len(s)) if i != j]
    ds = np.array([np.linalg.norm(s[i] - s[j]) for i, j in pairs])
    dt = np.array([np.linalg.norm(t[i] - t[j]) for i, j in pairs])
    # The N diagonal pairs (0 on both sides) count in the divisor, as in the authors' code (lenscloth/RKD).
    return float(sum(huber(a - b) for a, b in zip(ds / ds.mean(), dt / dt.mean(), strict=True)) / len(s) ** 2)


def rkd_angle_ref(s: np.ndarray, t: np.ndarray) -> float:
    def cos(x, i, j, k):
        return float(unit(x[i] - x[j]) @ unit(x[k] - x[j]))

    n = len(s)
    return float(
        np.mean([huber(cos(s, i, j, k) - cos(t, i, j, k)) for i, j, k in product(range(n), repeat=3)])
    )


def sp_ref(s: np.ndarray, t: np.ndarray) -> float:
    def gram(x):
        g = x @ x.T
        return np.stack([unit(row) for row in g])

    return float(((gram(t) - gram(s)) ** 2).sum() / len(s) ** 2)


def pkt_ref(s: np.ndarray, t: np.ndarray, eps: float = 1e-7) -> float:
    # eps as in the authors' code (passalis/probabilistic_kt): x / (‖x‖ + eps), log((p_T + eps) / (p_S + eps)).
    def conditionals(x):
        n = len(x)
        u = [x[i] / (np.linalg.norm(x[i]) + eps) for i in range(n)]
        k = np.array([[(u[i] @ u[j] + 1) / 2 for j in range(n)] for i in range(n)])
        return k / k.sum(1, keepdims=True)

    ps, pt = conditionals(s), conditionals(t)
    return float(np.mean(pt * np.log((pt + eps) / (ps + eps))))


def attention_kl_ref(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    out = np.zeros(s.shape[0::2])
    for b, h, q in product(range(s.shape[0]), range(s.shape[1]), range(s.shape[2])):
        keep = t[b, h, q] > 0
        out[b, q] += (t[b, h, q][keep] * np.log(t[b, h, q][keep] / s[b, h, q][keep])).sum() / s.shape[1]
    return out


OTHER_REFERENCES = {
    ("hidden", "mse"): lambda s, t: ((s - t) ** 2).mean(-1),
    ("hidden", "cosine"): lambda s, t: (
        1 - (s * t).sum(-1) / np.linalg.norm(s, axis=-1) / np.linalg.norm(t, axis=-1)
    ),
    ("attention", "kl"): attention_kl_ref,
    ("attention", "mse"): lambda s, t: ((s - t) ** 2).mean(axis=(1, 3)),
    ("relation", "rkd_distance"): rkd_distance_ref,
    ("relation", "rkd_angle"): rkd_angle_ref,
    ("relation", "sp"): sp_ref,
    ("relation", "similarity_preserving"): sp_ref,
    ("relation", "pkt"): pkt_ref,
}


def test_every_registered_loss_has_a_reference():
    assert set(LOGIT_REFERENCES) == set(LOSSES["logits"])
    assert set(OTHER_REFERENCES) == set(OTHER_LOSSES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", LOGIT_NAMES)
def test_logit_loss_matches_reference(name, temperature, dtype):
    zs, zt = randn(2, 3, 11, seed=1, scale=2.0, dtype=dtype), randn(2, 3, 11, seed=2, scale=2.0, dtype=dtype)
    out = LOSSES["logits"][name](zs, zt, temperature=temperature)
    zs64, zt64 = zs.double().numpy(), zt.double().numpy()
    ps, pt = softmax_ref(zs64, temperature), softmax_ref(zt64, temperature)
    expected = LOGIT_REFERENCES[name](ps, pt, zs64, zt64, temperature)
    assert out.shape == (2, 3) and out.dtype == dtype
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(out.detach().double().numpy(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("family", "name"), OTHER_LOSSES)
def test_other_loss_matches_reference(family, name, dtype):
    student, teacher = family_inputs(family, seed=3, dtype=dtype)
    out = LOSSES[family][name](student, teacher)
    expected = OTHER_REFERENCES[family, name](student.double().numpy(), teacher.double().numpy())
    assert out.dtype == dtype and out.shape == np.shape(expected)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(("name", "params", "expected"), [
    ("jsd", {"beta": 0.3}, lambda ps, pt: jsd_ref(ps, pt, 0.3)),
    ("skew_kl", {"alpha": 0.4}, lambda ps, pt: kl_ref(pt, 0.4 * pt + 0.6 * ps)),
    ("skew_reverse_kl", {"alpha": 0.4}, lambda ps, pt: kl_ref(ps, 0.4 * ps + 0.6 * pt)),
])  # fmt: skip
def test_non_default_parameters_match_reference(name, params, expected):
    zs, zt = randn(4, 9, seed=4, scale=2.0), randn(4, 9, seed=5, scale=2.0)
    out = LOSSES["logits"][name](zs, zt, temperature=2.0, **params)
    reference = expected(softmax_ref(zs.numpy(), 2.0), softmax_ref(zt.numpy(), 2.0))
    np.testing.assert_allclose(out.numpy(), reference, rtol=1e-10)


# ------------------------------------------------------------------ identities


@pytest.mark.parametrize("name", [name for name in LOGIT_NAMES if name != "soft_ce"])
def test_logit_loss_is_zero_for_identical_inputs(name):
    z = randn(3, 7, seed=6, scale=3.0, dtype=torch.float32)
    torch.testing.assert_close(
        LOSSES["logits"][name](z, z.clone(), temperature=2.0), torch.zeros(3), atol=1e-6, rtol=0
    )


def test_soft_ce_of_identical_inputs_is_the_entropy():
    z = randn(3, 7, seed=6, scale=3.0)
    p = softmax_ref(z.numpy(), 2.0)
    np.testing.assert_allclose(
        losses.soft_ce(z, z, temperature=2.0).numpy(), -(p * np.log(p)).sum(-1), rtol=1e-12
    )


@pytest.mark.parametrize(("family", "name"), OTHER_LOSSES)
def test_other_loss_is_zero_for_identical_inputs(family, name):
    _, teacher = family_inputs(family, seed=7, dtype=torch.float32)
    out = LOSSES[family][name](teacher.clone(), teacher)
    torch.testing.assert_close(out, torch.zeros_like(out), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_every_loss_is_non_negative(seed):
    zs, zt = randn(4, 13, seed=seed, scale=4.0), randn(4, 13, seed=seed + 50, scale=4.0)
    for name in LOGIT_NAMES:
        assert (LOSSES["logits"][name](zs, zt, temperature=1.5) >= 0).all(), name
    for family, name in OTHER_LOSSES:
        assert (LOSSES[family][name](*family_inputs(family, seed=seed)) >= 0).all(), (family, name)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_lies_between_zero_and_the_binary_entropy(beta):
    zs, zt = randn(6, 5, seed=8, scale=10.0), randn(6, 5, seed=9, scale=10.0)
    out = losses.jsd(zs, zt, beta=beta)
    assert (out >= 0).all() and (
        out <= -beta * math.log(beta) - (1 - beta) * math.log(1 - beta) + 1e-12
    ).all()


def test_jsd_limits_are_forward_and_reverse_kl_and_swapping_mirrors_beta():
    zs, zt, eps = randn(3, 6, seed=10), randn(3, 6, seed=11), 1e-7
    torch.testing.assert_close(
        losses.jsd(zs, zt, beta=eps) / eps, losses.forward_kl(zs, zt), rtol=1e-4, atol=0
    )
    torch.testing.assert_close(
        losses.jsd(zs, zt, beta=1 - eps) / eps, losses.reverse_kl(zs, zt), rtol=1e-4, atol=0
    )
    torch.testing.assert_close(losses.jsd(zs, zt, beta=0.3), losses.jsd(zt, zs, beta=0.7))


def test_skew_kl_endpoints():
    zs, zt = randn(3, 6, seed=12), randn(3, 6, seed=13)
    torch.testing.assert_close(losses.skew_kl(zs, zt, alpha=0.0), losses.forward_kl(zs, zt))
    torch.testing.assert_close(losses.skew_reverse_kl(zs, zt, alpha=0.0), losses.reverse_kl(zs, zt))
    torch.testing.assert_close(losses.skew_kl(zs, zt, alpha=1.0), torch.zeros(3, dtype=torch.float64))
    assert (losses.skew_kl(zs, zt, alpha=0.5) < losses.forward_kl(zs, zt)).all()


@pytest.mark.parametrize("beta", [0.0, 1.0, 1.5, -0.2])
def test_jsd_rejects_beta_outside_the_open_interval(beta):
    with pytest.raises(ValueError, match="forward_kl") as info:
        losses.jsd(randn(2, 4), randn(2, 4), beta=beta)
    assert "reverse_kl" in str(info.value) and str(beta) in str(info.value)


@pytest.mark.parametrize("name", ["skew_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_skew_rejects_alpha_outside_the_unit_interval(name, alpha):
    with pytest.raises(ValueError, match=str(alpha)):
        LOSSES["logits"][name](randn(2, 4), randn(2, 4), alpha=alpha)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
@pytest.mark.parametrize("name", LOGIT_NAMES)
def test_non_positive_temperature_is_rejected(name, temperature):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        LOSSES["logits"][name](randn(2, 4), randn(2, 4), temperature=temperature)


@pytest.mark.parametrize("name", LOGIT_NAMES)
def test_temperature_divides_both_logits(name):
    zs, zt = randn(3, 8, seed=14, scale=3.0), randn(3, 8, seed=15, scale=3.0)
    loss = LOSSES["logits"][name]
    torch.testing.assert_close(loss(zs, zt, temperature=2.5), loss(zs / 2.5, zt / 2.5))


def test_logit_mse_scales_as_inverse_temperature_squared():
    zs, zt = randn(3, 8, seed=16), randn(3, 8, seed=17)
    torch.testing.assert_close(losses.logit_mse(zs, zt, temperature=2.0), losses.logit_mse(zs, zt) / 4)


@pytest.mark.parametrize("name", LOGIT_NAMES)
def test_soft_target_losses_are_the_softmax_losses_whose_gradient_scales_as_inverse_t_squared(name):
    zs, zt = randn(8, 50, seed=18, scale=3.0), randn(8, 50, seed=19, scale=3.0)

    def grad_norm(temperature):
        student = zs.clone().requires_grad_()
        LOSSES["logits"][name](student, zt, temperature=temperature).sum().backward()
        return student.grad.norm()

    ratio = grad_norm(32.0) / grad_norm(64.0)
    scales_as_inverse_t_squared = abs(ratio - 4) < 0.2
    assert (name in SOFT_TARGET_LOSSES) == (scales_as_inverse_t_squared and name != "mse"), float(ratio)
