"""Losses, robustness tier: -inf logits, low precision, masking and validation edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_losses import (
    INF,
    LOGIT_NAMES,
    LOW_PRECISION,
    OTHER_LOSSES,
    attention_maps,
    family_inputs,
    randn,
    softmax_ref,
)

from llmkd import losses
from llmkd.losses import LOSSES, SOFT_TARGET_LOSSES, get_loss, masked_mean

# ------------------------------------------------------------------ -inf logits (masked vocabulary rows)

MASK_CASES = ["teacher", "student", "both", "fully_masked_rows"]


def masked_logits(case: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    zs, zt = randn(3, 4, 8, seed=20, scale=3.0), randn(3, 4, 8, seed=21, scale=3.0)
    if case in ("teacher", "both"):
        zt[..., :3] = -INF
    if case in ("student", "both"):
        zs[..., :3] = -INF
    if case == "fully_masked_rows":  # both sides, teacher only, student only
        zs[0, 1] = zt[0, 1] = zt[1, 2] = zs[2, 0] = -INF
    return zs.to(dtype).requires_grad_(), zt.to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("case", MASK_CASES)
@pytest.mark.parametrize("name", LOGIT_NAMES)
def test_neg_inf_logits_give_finite_float32_values_and_gradients(name, case, dtype):
    zs, zt = masked_logits(case, dtype)
    out = LOSSES["logits"][name](zs, zt, temperature=2.0)
    assert out.dtype == torch.float32 and out.shape == (3, 4) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(zs.grad).all() and torch.isfinite(zt.grad).all()
    if case == "fully_masked_rows":
        assert out[0, 1] == out[1, 2] == out[2, 0] == 0


@pytest.mark.parametrize("name", LOGIT_NAMES)
def test_tokens_masked_on_both_sides_are_as_if_removed_from_the_vocabulary(name):
    zs, zt = masked_logits("both")
    loss = LOSSES["logits"][name]
    torch.testing.assert_close(loss(zs, zt, temperature=2.0), loss(zs[..., 3:], zt[..., 3:], temperature=2.0))


def test_teacher_mass_on_a_student_masked_token_costs_the_documented_floor():
    zs, zt = masked_logits("student")
    pt = softmax_ref(zt.detach().double().numpy(), 1.0)
    log_ps = np.full_like(pt, math.log(torch.finfo(torch.float32).tiny))
    log_ps[..., 3:] = np.log(softmax_ref(zs.detach().double().numpy()[..., 3:], 1.0))
    expected = (pt * (np.log(pt) - log_ps)).sum(-1)
    np.testing.assert_allclose(losses.forward_kl(zs, zt).detach().numpy(), expected, rtol=1e-5)
    assert expected.max() > 50  # large, finite


@pytest.mark.parametrize("case", ["teacher", "both", "fully_masked_rows"])
def test_naive_kl_is_nan_on_the_same_inputs(case):
    """Negative control: the -inf tests above would catch the textbook formula."""
    zs, zt = masked_logits(case)
    log_ps, log_pt = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
    assert torch.isnan((log_pt.exp() * (log_pt - log_ps)).sum(-1)).any()


def test_masking_the_naive_reverse_kl_after_the_fact_still_gives_nan_gradients():
    zs, zt = masked_logits("both")
    log_ps, log_pt = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
    terms = torch.where(log_ps.exp() > 0, log_ps.exp() * (log_ps - log_pt), 0.0)
    terms.sum().backward()
    assert torch.isfinite(terms).all() and torch.isnan(zs.grad).any()


# ------------------------------------------------------------------ dtype, other edge cases, validation


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize(("family", "name"), OTHER_LOSSES)
def test_other_losses_compute_in_float32(family, name, dtype):
    assert LOSSES[family][name](*family_inputs(family, seed=22, dtype=dtype)).dtype == torch.float32


@pytest.mark.parametrize(
    ("family", "name"), [("hidden", "cosine"), *[("relation", n) for n in LOSSES["relation"]]]
)
def test_zero_vectors_and_duplicate_examples_have_finite_gradients(family, name):
    student, teacher = family_inputs(family, seed=23, dtype=torch.float32)
    student[0] = 0.0
    if family == "relation":
        student[2] = student[1]
        teacher[2] = teacher[1]
    student.requires_grad_()
    out = LOSSES[family][name](student, teacher)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(student.grad).all()


def test_attention_kl_is_finite_when_the_student_puts_zero_on_a_teacher_key():
    student, teacher = attention_maps(seed=24).float(), attention_maps(seed=25).float()
    student[1, :, :, 0] = 0.0
    student.requires_grad_()
    out = losses.attention_kl(student, teacher)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(student.grad).all() and (out[1] > 10).all()


@pytest.mark.parametrize("name", ["kl", "mse"])
def test_attention_losses_name_both_head_counts(name):
    with pytest.raises(ValueError, match=r"student has 2 attention heads and teacher 3"):
        LOSSES["attention"][name](attention_maps(heads=2), attention_maps(heads=3))


@pytest.mark.parametrize("name", ["mse", "cosine"])
def test_hidden_losses_reject_different_widths(name):
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 3, 6\).*project"):
        LOSSES["hidden"][name](randn(2, 3, 4), randn(2, 3, 6))


@pytest.mark.parametrize("name", list(LOSSES["relation"]))
@pytest.mark.parametrize(
    ("student_shape", "teacher_shape"), [((4, 3), (5, 3)), ((1, 3), (1, 3)), ((4,), (4,))]
)
def test_relation_losses_reject_mismatched_or_too_small_batches(name, student_shape, teacher_shape):
    with pytest.raises(ValueError, match="N >= 2"):
        LOSSES["relation"][name](randn(*student_shape), randn(*teacher_shape))


# ------------------------------------------------------------------ gradients (float64 gradcheck)


GRADCHECK_CASES = [
    ("logits", "forward_kl"),
    ("logits", "jsd"),
    ("logits", "skew_reverse_kl"),
    ("logits", "mse"),
    ("hidden", "cosine"),
    ("attention", "kl"),
    ("relation", "rkd_distance"),
    ("relation", "rkd_angle"),
    ("relation", "sp"),
    ("relation", "pkt"),
]


@pytest.mark.parametrize(("family", "name"), GRADCHECK_CASES)
def test_gradcheck_in_float64(family, name):
    if family == "logits":
        inputs = randn(2, 5, seed=26), randn(2, 5, seed=27)
        loss = lambda s, t: LOSSES["logits"][name](s, t, temperature=2.0)  # noqa: E731
    else:
        inputs = family_inputs(family, seed=26)
        loss = LOSSES[family][name]
    if family == "attention":  # the teacher map holds exact zeros, where p·log p has no derivative
        inputs, loss = inputs[:1], lambda s, teacher=inputs[1]: LOSSES["attention"][name](s, teacher)  # noqa: E731
    assert torch.autograd.gradcheck(loss, tuple(x.clone().requires_grad_() for x in inputs))


def test_gradcheck_with_masked_vocabulary_rows():
    zs, zt = randn(3, 5, seed=28), randn(3, 5, seed=29)
    zs[0, :2] = zt[0, :2] = zt[1, 0] = -INF
    zs[2] = -INF
    check = lambda s: losses.jsd(s, zt, temperature=2.0)  # noqa: E731
    assert torch.autograd.gradcheck(check, (zs.requires_grad_(),))


# ------------------------------------------------------------------ masked_mean


def test_masked_mean_ignores_masked_nan_and_inf_in_value_and_gradient():
    values = torch.tensor([[1.0, 2.0, float("nan")], [3.0, INF, -INF]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = masked_mean(values, mask)
    out.backward()
    assert out.item() == pytest.approx(2.0)
    torch.testing.assert_close(values.grad, mask.float() / 3)


def test_masked_mean_divides_by_num_items_and_accumulates_like_one_big_batch():
    values, mask = randn(8, 5, seed=30, dtype=torch.float32), randn(8, 5, seed=31) > 0
    whole = masked_mean(values, mask)
    torch.testing.assert_close(masked_mean(values, mask, num_items=10), values[mask].sum() / 10)
    total = int(mask.sum())
    chunks = [
        masked_mean(values[i : i + 2], mask[i : i + 2], num_items=torch.tensor(total)) for i in range(0, 8, 2)
    ]
    torch.testing.assert_close(sum(chunks), whole)


def test_masked_mean_broadcasts_integer_masks_and_defaults_to_all():
    values = randn(2, 3, seed=32, dtype=torch.float32)
    torch.testing.assert_close(masked_mean(values), values.mean())
    torch.testing.assert_close(masked_mean(values, torch.tensor([[1], [0]])), values[0].mean())
    assert masked_mean(values.half()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(2,\).*\(2, 3\)"):
        masked_mean(values, torch.ones(2, dtype=torch.bool))


def test_masked_mean_with_no_items_is_zero_with_a_finite_gradient():
    values = torch.tensor([[float("nan"), INF], [1.0, 2.0]], requires_grad=True)
    out = masked_mean(values, torch.zeros(2, 2, dtype=torch.bool))
    out.backward()
    assert out.item() == 0 and torch.isfinite(values.grad).all()
    values = torch.tensor([3.0, 4.0], requires_grad=True)
    out = masked_mean(values, num_items=0)
    out.backward()
    assert out.item() == 0 and torch.isfinite(values.grad).all()


# ------------------------------------------------------------------ registry


def test_registry_aliases_and_get_loss():
    assert LOSSES["logits"]["kl"].fn is losses.forward_kl
    assert get_loss("relation", "sp").fn is get_loss("relation", "similarity_preserving").fn
    assert get_loss("relation", "sp").fn is losses.similarity_preserving
    assert get_loss("logits", "mse").fn is losses.logit_mse
    assert get_loss("logits", "jsd").params == {"beta"} and get_loss("logits", "skew_kl").params == {"alpha"}
    assert set(LOSSES["logits"]) - {"tvd", "mse"} == SOFT_TARGET_LOSSES


@pytest.mark.parametrize(("knowledge", "name", "unknown", "listed"), [
    ("logits", "kld", "kld", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd", "mse"]),
    ("hidden", "l1", "l1", ["mse", "cosine"]),
    ("features", "mse", "features", ["logits", "hidden", "attention", "relation"]),
])  # fmt: skip
def test_get_loss_unknown_name_lists_valid_names(knowledge, name, unknown, listed):
    with pytest.raises(ValueError, match=repr(unknown)) as info:
        get_loss(knowledge, name)
    assert all(valid in str(info.value) for valid in listed)
