"""Memory of llmkd.losses.kernels' chunked and fused losses: structurally (no loss call, closed-form kernel or
tensor saved for backward spans more than one chunk of (N, V)) and measured by the benchmark's allocator measure
(peak extra memory of naive, chunked and fused paths in units of (N, V) tensors), plus the benchmark's budget
check and side-by-side report. Shares its inputs and plain-path helpers with test_chunked.py. Each test runs in
milliseconds to a second."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from test_chunked import H_S, N, V, fused, head_inputs, plain_loss, randn, student_grads

from benchmarks.allocator import allocator_peak, check_measure
from benchmarks.bench_losses import (
    _peak_extra,
    compare_to_naive,
    logit_loss,
    markdown_table,
    naive_jsd,
    run_case,
)
from llmkd.losses import LOSSES, chunked_logit_loss, fused_logit_distillation
from llmkd.losses.kernels import lean as lean_module
from llmkd.losses.response import RESPONSE_LOSSES

# ------------------------------------------------------------------ memory, structurally


@pytest.fixture
def row_spy(monkeypatch):
    """Wraps every logit loss so that the number of positions of each call is recorded."""
    rows: list[int] = []

    def wrap(fn):
        def spy(student_logits, teacher_logits, **kwargs):
            rows.append(student_logits.shape[:-1].numel())
            return fn(student_logits, teacher_logits, **kwargs)

        return spy

    for name, fn in list(RESPONSE_LOSSES.items()):  # what the kernels call
        monkeypatch.setitem(RESPONSE_LOSSES, name, wrap(fn))
    for name, fn in list(LOSSES["logits"].items()):  # what the plain path calls
        monkeypatch.setitem(LOSSES["logits"], name, wrap(fn))
    return rows


@pytest.mark.parametrize("name", ["forward_kl", "jsd"])
def test_loss_calls_never_see_more_than_one_chunk(row_spy, name):
    s, t = randn(N, V, seed=1).requires_grad_(), randn(N, V, seed=2)
    loss = chunked_logit_loss(s, t, loss=name, chunk_size=8)
    assert row_spy and max(row_spy) <= 8
    calls = len(row_spy)
    loss.backward()
    assert len(row_spy) == calls  # backward only scales the saved gradient: no loss maths in it
    row_spy.clear()
    fused(name, *student_grads(head_inputs()), chunk_size=8).backward()
    assert row_spy and max(row_spy) <= 8
    row_spy.clear()
    plain_loss(name, s, t).backward()  # negative control: the plain path sees every position at once
    assert max(row_spy) == N


def test_fully_masked_chunks_are_skipped(row_spy):
    mask = torch.zeros(N, dtype=torch.bool)
    mask[20] = True
    chunked_logit_loss(randn(N, V, seed=1), randn(N, V, seed=2), mask=mask, chunk_size=8)
    assert sorted(row_spy) == [0, 8]  # the empty validation call and the one chunk holding row 20


def saved_for_backward(loss_fn) -> list[tuple[int, torch.dtype]]:
    """(numel, dtype) of the tensors that loss_fn()'s graph holds for backward once it has returned.

    Tensors packed by graphs that died inside the call (the chunked path's per-chunk graphs) are gone by
    then: only the ones reachable from the returned loss are still alive.
    """
    packed: list[weakref.ref] = []

    def pack(tensor):
        packed.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn()
    gc.collect()
    alive = [ref() for ref in packed]
    del loss
    return [(tensor.numel(), tensor.dtype) for tensor in alive if tensor is not None]


def test_backward_keeps_no_float32_logit_sized_tensor():
    """Chunked: only the (N, V) gradient in the input dtype is kept; fused: nothing of N·V elements."""
    s = randn(N, V, seed=1, dtype=torch.bfloat16).requires_grad_()
    t = randn(N, V, seed=2, dtype=torch.bfloat16)
    chunked = saved_for_backward(lambda: chunked_logit_loss(s, t, loss="jsd", chunk_size=8))
    assert chunked == [(N * V, torch.bfloat16)]
    plain = saved_for_backward(lambda: plain_loss("jsd", s, t))  # negative control
    assert sum(numel >= N * V and dtype == torch.float32 for numel, dtype in plain) >= 3
    hs, ws, bs, ht, wt, bt = student_grads(head_inputs())
    assert max(N * H_S, V * H_S) < N * V
    fused_saved = saved_for_backward(lambda: fused("jsd", hs, ws, bs, ht, wt, bt, chunk_size=8))
    assert fused_saved and max(numel for numel, _ in fused_saved) < N * V
    plain = saved_for_backward(lambda: plain_loss("jsd", hs @ ws.T + bs, ht @ wt.T + bt))  # negative control
    assert max(numel for numel, _ in plain) >= N * V


@pytest.mark.parametrize("name", ["forward_kl", "jsd"])
def test_lean_kernels_never_see_more_than_one_chunk(monkeypatch, name):
    """The structural property for the closed-form path (the row_spy tests cover the autograd path)."""
    rows: list[int] = []

    def spy(kernel):
        def wrapped(logits, *args, **kwargs):
            zs, zt = logits()
            rows.append(len(zs))
            return kernel(lambda: (zs, zt), *args, **kwargs)

        return wrapped

    for fn, kernel in list(lean_module.LEAN.items()):
        monkeypatch.setitem(lean_module.LEAN, fn, spy(kernel))
    s, t = randn(N, V, seed=1).requires_grad_(), randn(N, V, seed=2)
    chunked_logit_loss(s, t, loss=name, chunk_size=8).backward()
    assert rows and max(rows) <= 8 and sum(rows) == N
    rows.clear()
    fused(name, *student_grads(head_inputs()), chunk_size=8).backward()
    assert rows and max(rows) <= 8 and sum(rows) == N


# ------------------------------------------------------------------ memory, measured by the allocator


def test_allocator_peak_is_exact():
    """The benchmark's measure reports a known temporary and a kept tensor to the byte."""
    check_measure()  # raises unless (4 MiB peak, 1 MiB kept) is measured exactly
    kept = []
    peak, end = allocator_peak(lambda: kept.append(torch.empty(1000, 10)) or torch.empty(7, 3).exp_())
    assert (peak, end) == (40_000 + 84, 40_000)


def loss_memory(path: str, loss: str, n: int, v: int, chunk: int) -> dict:
    """The benchmark's peak extra (in units of one float32 (n, v) tensor) of a loss from the logits."""
    s, t = randn(n, v, seed=1).requires_grad_(), randn(n, v, seed=2)
    mask = torch.ones(n, dtype=torch.bool)
    case = {"device": "cpu"}
    row = _peak_extra(case, [s], lambda: logit_loss(path, loss, s, t, mask, chunk))
    unit = n * v * 4 / 2**20
    return {k: value / unit for k, value in row.items()}


def test_peak_extra_memory_of_naive_and_chunked():
    """Naive JSD holds ≥ 12 (N, V) float32 temporaries beyond its gradient (the negative control: a path
    that materialises full (N, V) tensors is reported as such); chunked holds ≤ 4 + masks (chunk, V) ones."""
    n, v, chunk = 64, 1024, 8
    naive = loss_memory("naive", "jsd", n, v, chunk)
    assert naive["peak_extra_mib"] >= 12 and naive["left_over_mib"] == 0
    for loss, lean_tensors in [("jsd", 4), ("forward_kl", 3)]:
        chunked = loss_memory("chunked", loss, n, v, chunk)
        assert chunked["peak_extra_mib"] * n / chunk <= lean_tensors + 0.5 and chunked["left_over_mib"] == 0
    # The autograd path keeps more per chunk than the closed-form one (and still only one chunk's worth).
    autograd = loss_memory("chunked", "skew_kl", n, v, chunk)["peak_extra_mib"] * n / chunk
    assert 6 <= autograd <= 12


def test_fused_peak_extra_memory_is_a_few_chunks():
    hs, ws, _, ht, wt, _ = head_inputs()
    hs.requires_grad_(), ws.requires_grad_()
    case = {"device": "cpu"}
    row = _peak_extra(
        case, [hs, ws], lambda: fused_logit_distillation(hs, ws, ht, wt, loss="jsd", chunk_size=4)
    )
    assert row["peak_extra_mib"] * 2**20 <= 4.5 * 4 * V * 4 and row["left_over_mib"] == 0
    row = _peak_extra(
        case, [hs, ws], lambda: naive_jsd(hs @ ws.T, ht @ wt.T, torch.ones(N, dtype=torch.bool))
    )
    assert row["peak_extra_mib"] * 2**20 >= 14 * N * V * 4  # negative control: logits and their temporaries


def test_benchmark_skips_what_does_not_fit_and_compares_side_by_side():
    case = {"loss": "jsd", "vocab": 151936, "positions": 16384, "path": "naive", "device": "cpu"}
    case |= {"dtype": "float32", "hidden": 576, "teacher_hidden": 576, "chunk_size": 32}
    row = run_case(case, budget_bytes=14 * 2**30)
    assert row["status"].startswith("skipped") and "peak_extra_mib" not in row
    rows = [
        {
            **case,
            "status": "ok",
            "path": "naive",
            "peak_extra_mib": 100.0,
            "loss_time_s": 2.0,
            "step_time_s": 4.0,
            "value": 1.0,
        },
        {
            **case,
            "status": "ok",
            "path": "chunked",
            "peak_extra_mib": 5.0,
            "loss_time_s": 1.0,
            "step_time_s": 2.0,
            "value": 1.5,
        },
        {**case, "path": "fused", "status": "skipped: test"},
    ]
    compare_to_naive(rows)
    assert rows[1]["memory_vs_naive"] == 0.05 and rows[1]["loss_time_vs_naive"] == 0.5
    assert rows[1]["value_rel_diff"] == 0.5 and "memory_vs_naive" not in rows[2]
    assert "skipped: test" in markdown_table(rows)
