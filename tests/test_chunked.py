"""Unit tier for llmkd.losses.kernels: the chunked and fused losses against the plain ``masked_mean(LOSSES[...])``
path (value and gradients) for every logit loss, dtypes, -inf safety, masking, and the lean (closed-form)
kernels. Their memory, structurally and measured by the allocator, is tests/test_chunked_memory.py, which
imports the helpers below. Each test runs in milliseconds to a second."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from llmkd.losses import LOSSES, chunked_logit_loss, fused_logit_distillation, masked_mean
from llmkd.losses.kernels import lean as lean_module

N, V, H_S, H_T = 37, 50, 8, 12
NUM_ITEMS = 41  # a gradient-accumulation window larger than this batch's mask count
CHUNK_SIZES = [1, 7, N, 100]
LOGIT_NAMES = list(LOSSES["logits"])
PARAMS = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
LOW_PRECISION = [torch.bfloat16, torch.float16]


def randn(*shape: int, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator)).to(dtype)


def position_mask() -> torch.Tensor:
    """Random holes plus a fully masked run of rows 7..13 (whole chunks when chunk_size is 7)."""
    mask = torch.rand(N, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[7:14] = False
    return mask


def plain_loss(name, student_logits, teacher_logits, mask=None, num_items=None, temperature=1.0):
    fn = LOSSES["logits"][name]
    values = fn(student_logits, teacher_logits, temperature=temperature, **PARAMS.get(name, {}))
    return masked_mean(values, mask, num_items)


def value_and_grads(loss_fn, *inputs, weight: float = 3.0):
    """The loss and the gradients of `weight * loss` (so backward's grad_output is not 1) w.r.t. inputs."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    value = loss_fn(*leaves)
    (weight * value).backward()
    return value.detach(), [leaf.grad for leaf in leaves]


def head_inputs(dtype=torch.float32):
    """Student/teacher hidden states, head weights and biases with different widths H_S != H_T."""
    return (
        randn(N, H_S, seed=1, dtype=dtype),
        randn(V, H_S, seed=2, scale=0.5, dtype=dtype),
        randn(V, seed=3, dtype=dtype),
        randn(N, H_T, seed=4, dtype=dtype),
        randn(V, H_T, seed=5, scale=0.5, dtype=dtype),
        randn(V, seed=6, dtype=dtype),
    )


def student_grads(inputs):
    """The head inputs with the student side (hidden states, weight, bias) requiring grad."""
    return tuple(x.requires_grad_(i < 3) for i, x in enumerate(inputs))


def fused(name, hs, ws, bs, ht, wt, bt, **kwargs):
    return fused_logit_distillation(
        hs,
        ws,
        ht,
        wt,
        loss=name,
        student_head_bias=bs,
        teacher_head_bias=bt,
        **PARAMS.get(name, {}),
        **kwargs,
    )


# ------------------------------------------------------------------ equality with the plain path


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("name", LOGIT_NAMES)
def test_chunked_matches_plain(name, chunk_size):
    s, t, mask = randn(N, V, seed=1, scale=3), randn(N, V, seed=2, scale=3), position_mask()
    kwargs = {"mask": mask, "num_items": NUM_ITEMS, "temperature": 2.0}
    expected, (grad_expected,) = value_and_grads(lambda x: plain_loss(name, x, t, **kwargs), s)
    value, (grad,) = value_and_grads(
        lambda x: chunked_logit_loss(
            x, t, loss=name, chunk_size=chunk_size, **kwargs, **PARAMS.get(name, {})
        ),
        s,
    )
    assert value.dtype == torch.float32 and value.shape == ()
    assert_close(value, expected)
    assert_close(grad, grad_expected)
    assert grad[~mask].abs().max() == 0


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "mse"])
def test_chunked_default_reduction_and_leading_dims(name):
    """No mask and no num_items: the mean over all positions; (B, T, V) with a (B, T) mask flattens."""
    s, t = randn(3, 5, V, seed=1, scale=3), randn(3, 5, V, seed=2, scale=3)
    params = PARAMS.get(name, {})
    expected, (grad_expected,) = value_and_grads(lambda x: plain_loss(name, x, t), s)
    value, (grad,) = value_and_grads(lambda x: chunked_logit_loss(x, t, loss=name, chunk_size=4, **params), s)
    assert_close(value, expected)
    assert_close(grad, grad_expected)
    mask = torch.arange(15).reshape(3, 5) % 4 != 0
    expected, (grad_expected,) = value_and_grads(lambda x: plain_loss(name, x, t, mask), s)
    value, (grad,) = value_and_grads(
        lambda x: chunked_logit_loss(x, t, loss=name, mask=mask, chunk_size=4, **params), s
    )
    assert_close(value, expected)
    assert_close(grad, grad_expected)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("name", LOGIT_NAMES)
def test_fused_matches_plain(name, chunk_size):
    inputs, mask = head_inputs(), position_mask()
    kwargs = {"mask": mask, "num_items": NUM_ITEMS, "temperature": 2.0}
    _, _, _, ht, wt, bt = inputs

    def plain(hs, ws, bs):
        return plain_loss(name, hs @ ws.T + bs, ht @ wt.T + bt, **kwargs)

    expected, grads_expected = value_and_grads(plain, *inputs[:3])
    value, grads = value_and_grads(
        lambda hs, ws, bs: fused(name, hs, ws, bs, ht, wt, bt, chunk_size=chunk_size, **kwargs), *inputs[:3]
    )
    assert value.dtype == torch.float32 and value.shape == ()
    assert_close(value, expected)
    for grad, grad_expected in zip(grads, grads_expected):
        assert_close(grad, grad_expected)
    assert grads[0][~mask].abs().max() == 0


def test_fused_without_bias_and_frozen_head():
    """No biases; a frozen student head gets no gradient while the hidden states still do."""
    hs, ws, _, ht, wt, _ = head_inputs()
    hs.requires_grad_()
    expected, (grad_expected,) = value_and_grads(lambda h: plain_loss("jsd", h @ ws.T, ht @ wt.T), hs)
    value, (grad,) = value_and_grads(lambda h: fused("jsd", h, ws, None, ht, wt, None, chunk_size=5), hs)
    assert_close(value, expected)
    assert_close(grad, grad_expected)
    assert ws.grad is None


def test_teacher_gets_no_gradient():
    s, t = randn(N, V, seed=1).requires_grad_(), randn(N, V, seed=2).requires_grad_()
    chunked_logit_loss(s, t, chunk_size=8).backward()
    assert s.grad is not None and t.grad is None
    hs, ws, bs, ht, wt, bt = student_grads(head_inputs())
    for x in (ht, wt, bt):
        x.requires_grad_()
    fused("forward_kl", hs, ws, bs, ht, wt, bt, chunk_size=8).backward()
    assert all(x.grad is not None for x in (hs, ws, bs))
    assert all(x.grad is None for x in (ht, wt, bt))


def test_no_grad_mode_gives_the_value():
    s, t = randn(N, V, seed=1).requires_grad_(), randn(N, V, seed=2)
    with torch.no_grad():
        value = chunked_logit_loss(s, t, loss="reverse_kl", chunk_size=8)
    assert not value.requires_grad
    assert_close(value, plain_loss("reverse_kl", s.detach(), t))


# ------------------------------------------------------------------ dtypes, -inf, masking


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("name", ["forward_kl", "jsd", "tvd"])
def test_low_precision_inputs_give_float32_close_to_float32(name, dtype):
    s, t, mask = randn(N, V, seed=1, scale=3), randn(N, V, seed=2, scale=3), position_mask()
    expected, (grad_expected,) = value_and_grads(lambda x: plain_loss(name, x, t, mask), s)
    value, (grad,) = value_and_grads(
        lambda x: chunked_logit_loss(
            x, t.to(dtype), loss=name, mask=mask, chunk_size=7, **PARAMS.get(name, {})
        ),
        s.to(dtype),
    )
    assert value.dtype == torch.float32 and grad.dtype == dtype
    assert_close(value, expected, rtol=2e-2, atol=2e-3)
    assert_close(grad.float(), grad_expected, rtol=5e-2, atol=2e-3)

    inputs = head_inputs()
    expected, grads_expected = value_and_grads(
        lambda *x: fused(name, *x, *inputs[3:], mask=mask, chunk_size=7), *inputs[:3]
    )
    low = [x.to(dtype) for x in inputs]
    value, grads = value_and_grads(lambda *x: fused(name, *x, *low[3:], mask=mask, chunk_size=7), *low[:3])
    assert value.dtype == torch.float32
    assert_close(value, expected, rtol=3e-2, atol=3e-3)
    for grad, grad_expected in zip(grads, grads_expected):
        assert grad.dtype == dtype
        assert_close(grad.float(), grad_expected, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("name", LOGIT_NAMES)
def test_neg_inf_columns_are_finite_and_match_plain(name):
    """Teacher logits with -inf vocabulary columns, and a student with one -inf column of its own."""
    s, t = randn(N, V, seed=1, scale=3), randn(N, V, seed=2, scale=3)
    t[:, -5:] = -float("inf")
    s[:, 0] = -float("inf")
    expected, (grad_expected,) = value_and_grads(lambda x: plain_loss(name, x, t), s)
    value, (grad,) = value_and_grads(
        lambda x: chunked_logit_loss(x, t, loss=name, chunk_size=7, **PARAMS.get(name, {})), s
    )
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert_close(value, expected)
    assert_close(grad, grad_expected)


def test_nan_in_masked_rows_reaches_neither_value_nor_gradient():
    s, t, mask = randn(N, V, seed=1), randn(N, V, seed=2), position_mask()
    s[~mask] = float("nan")
    value, (grad,) = value_and_grads(lambda x: chunked_logit_loss(x, t, mask=mask, chunk_size=5), s)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert grad[~mask].abs().max() == 0


@pytest.mark.parametrize("num_items", [None, 0])
def test_all_masked_gives_zero_and_zero_grads(num_items):
    mask = torch.zeros(N, dtype=torch.bool)
    value, (grad,) = value_and_grads(
        lambda x: chunked_logit_loss(x, randn(N, V, seed=2), mask=mask, num_items=num_items),
        randn(N, V, seed=1),
    )
    assert value == 0 and grad.abs().max() == 0
    inputs = head_inputs()
    value, grads = value_and_grads(lambda *x: fused("jsd", *x, *inputs[3:], mask=mask), *inputs[:3])
    assert value == 0 and all(g.abs().max() == 0 for g in grads)


def test_bad_input_fails_with_a_message_even_when_everything_is_masked():
    s, t, none = randn(N, V, seed=1), randn(N, V, seed=2), torch.zeros(N, dtype=torch.bool)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        chunked_logit_loss(s, t, mask=none, temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        chunked_logit_loss(s, t, loss="jsd", mask=none, beta=1.0)
    with pytest.raises(ValueError, match="unknown logits loss"):
        chunked_logit_loss(s, t, loss="kld")
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_logit_loss(s, t, chunk_size=0)
    with pytest.raises(ValueError, match="differ"):
        chunked_logit_loss(s, t[:, :-1])
    with pytest.raises(ValueError, match="mask has 36 entries"):
        chunked_logit_loss(s, t, mask=none[1:])
    hs, ws, bs, ht, wt, bt = head_inputs()
    with pytest.raises(ValueError, match="do not match"):
        fused_logit_distillation(hs, ws[:, 1:], ht, wt)
    with pytest.raises(ValueError, match="differ"):
        fused_logit_distillation(hs, ws, ht[1:], wt)
    with pytest.raises(ValueError, match="alpha"):
        fused_logit_distillation(hs, ws, ht, wt, loss="skew_kl", mask=none, alpha=2.0)


def test_second_backward_through_the_same_graph_fails_loudly():
    """Backward scales the saved gradient in place (no second (N, V) copy), so it may run only once."""
    s = randn(N, V, seed=1).requires_grad_()
    loss = chunked_logit_loss(s, randn(N, V, seed=2), chunk_size=8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ------------------------------------------------------------------ imports


@pytest.mark.parametrize(
    "first",
    [
        "import llmkd.losses.kernels.chunked",
        "import llmkd.losses",
        "from llmkd.losses import fused_logit_distillation",
    ],
)
def test_no_import_cycle_whichever_module_comes_first(first):
    check = "from llmkd.losses import chunked_logit_loss as a; from llmkd.losses.kernels.chunked import chunked_logit_loss as b"
    subprocess.run([sys.executable, "-c", f"{first}; {check}; assert a is b"], check=True)


# ------------------------------------------------------------------ the lean kernels (closed-form gradients)

LEAN_NAMES = ["forward_kl", "soft_ce", "reverse_kl", "jsd"]


@pytest.mark.parametrize("name", LEAN_NAMES)
def test_lean_kernels_match_plain_in_float64(name):
    """Closed-form value and gradient == autograd of the plain loss to float64 precision, with -inf columns,
    fully -inf rows on either side (their loss and gradient are 0) and T != 1."""
    s, t = (
        randn(N, V, seed=1, scale=3, dtype=torch.float64),
        randn(N, V, seed=2, scale=3, dtype=torch.float64),
    )
    t[:, -5:] = -float("inf")
    s[:, 0] = -float("inf")
    s[3] = -float("inf")  # a dead student row
    t[11] = -float("inf")  # a dead teacher row
    assert lean_module.LEAN.get(LOSSES["logits"][name].fn) is not None  # the lean path is what runs here
    kwargs = {"temperature": 1.7, "num_items": NUM_ITEMS}
    expected, (grad_expected,) = value_and_grads(lambda x: plain_loss(name, x, t, **kwargs), s)
    value, (grad,) = value_and_grads(
        lambda x: chunked_logit_loss(x, t, loss=name, chunk_size=7, **kwargs, **PARAMS.get(name, {})), s
    )
    assert value.dtype == torch.float64
    assert_close(value, expected, rtol=1e-12, atol=1e-12)
    assert_close(grad, grad_expected, rtol=1e-10, atol=1e-12)
    assert grad[3].abs().max() == 0 and grad[11].abs().max() == 0 and grad[:, 0].abs().max() == 0
