"""Memory and time of logit distillation for large vocabularies: naive vs chunked vs fused, in one run.

    python -m benchmarks.bench_losses [--vocab 49152 151936] [--positions 1024 4096] [--chunk-size 32]
                                 [--losses jsd forward_kl] [--device cpu|cuda] [--repeats 2] [--out FILE]

Paths (the same random h_S, W_S, h_T, W_T for all; the logits are h W^T, H = 576 as in SmolLM2-135M):

- ``naive``: a loss written like a typical trainer's (the generalised JSD of TRL's GKD trainer), holding
  (N, V) float32 log-softmaxes, mixtures and elementwise KL terms until backward (:func:`naive_jsd`,
  :func:`naive_forward_kl`);
- ``chunked``: :func:`llmkd.losses.chunked_logit_loss` on the same logits;
- ``fused``: :func:`llmkd.losses.fused_logit_distillation` from h_S, W_S, h_T, W_T: no (N, V) tensor at all.

Peak extra memory, the same definition for every path: the peak of the bytes allocated by torch and still
live during the loss's forward + backward, counted from the start of the step (when only its inputs exist:
the student/teacher logits for naive and chunked, the hidden states and head weights for fused), minus the
gradients the step must return (d/d student logits for naive and chunked; d/d h_S and d/d W_S for fused).
So it is what the loss needs beyond its inputs and outputs. (For naive this is a lower bound: its peak may
come before its gradient exists.) It is measured exactly, from the allocator (:mod:`benchmarks.allocator`):
on CPU from the profiler's allocation events (``torch.profiler`` with ``profile_memory=True``: every
allocation and free of torch's CPU allocator with the running total it keeps), on CUDA from
``torch.cuda.max_memory_allocated``; each process first checks the measure on a tensor of known size.
Library workspaces outside torch's allocator (BLAS, oneDNN) are not counted. "Left over" is what stays
allocated after the step beyond the gradients (0 unless something leaks).

Times (median of ``--repeats``, unprofiled): ``loss`` is the loss forward + backward from the logits (naive,
chunked); ``step`` is the whole step from the hidden states (the lm_head matmuls, the loss and backward
into h_S and W_S: what the trainer pays), for every path; the fused path is only a step. On a shared CPU
times move with the machine's load; ratios are side by side in one run. Each case runs in a fresh process.
A case whose peak, estimated from per-(N, V) tensor counts measured with the same measure at small N,
exceeds ``--memory-budget-gib`` is skipped and says so; no ratio is ever estimated.
"""

from __future__ import annotations

import argparse
import gc
import math
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch
import torch.nn.functional as F

from benchmarks.allocator import MIB, allocator_peak, check_measure
from llmkd.atomic import write_json
from llmkd.losses import chunked_logit_loss, fused_logit_distillation

PATHS = ("naive", "chunked", "fused")
DEFAULTS = {
    "cuda": {"vocab": [49152, 151936], "positions": [4096, 8192, 16384], "chunk_size": 1024},
    "cpu": {"vocab": [49152, 151936], "positions": [1024, 4096], "chunk_size": 32},
}
# For the budget check only: peak live float32 (N, V) tensors of the naive loss (its gradient included) and
# (chunk, V) ones of the chunked/fused loss, as measured by allocator_peak (N = 512, V = 8192).
NAIVE_PEAK_TENSORS = {"jsd": 13, "forward_kl": 5}
CHUNK_PEAK_TENSORS = 4.5
DEFINITION = (
    "peak extra = peak bytes allocated by torch and live during the loss's forward + backward, counted from "
    "the step's start (its inputs only: student/teacher logits for naive and chunked, hidden states + head "
    "weights for fused), minus the gradients it returns (d/d student logits; d/d h_S + d/d W_S for fused); "
    "CPU: exact, from the allocator events of torch.profiler(profile_memory=True). loss s: forward + backward "
    "from the logits; step s: from the hidden states, lm_head matmuls included; medians, unprofiled."
)


# the naive baseline ------------------------------------------
def naive_jsd(student_logits, teacher_logits, mask, beta: float = 0.5, temperature: float = 1.0):
    """Generalised JSD as trainers commonly write it: every intermediate a full (N, V) float32 tensor."""
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    mixture = torch.logsumexp(torch.stack([log_ps + math.log1p(-beta), log_pt + math.log(beta)]), dim=0)
    kl_teacher = F.kl_div(mixture, log_pt, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture, log_ps, reduction="none", log_target=True)
    per_position = (beta * kl_teacher + (1 - beta) * kl_student).sum(-1)
    return per_position[mask].sum() / mask.sum()


def naive_forward_kl(student_logits, teacher_logits, mask, temperature: float = 1.0):
    """KL(p_T ‖ p_S) with both (N, V) float32 log-softmaxes alive until backward."""
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return per_position[mask].sum() / mask.sum()


NAIVE = {"jsd": naive_jsd, "forward_kl": naive_forward_kl}


def step_loss(path: str, loss: str, inputs: dict, chunk_size: int) -> torch.Tensor:
    """The loss of a step from the hidden states: the logits (naive, chunked) are part of it."""
    hs, ws, ht, wt, mask = (inputs[k] for k in ("hs", "ws", "ht", "wt", "mask"))
    if path == "fused":
        return fused_logit_distillation(hs, ws, ht, wt, loss=loss, mask=mask, chunk_size=chunk_size)
    student_logits = hs @ ws.T
    with torch.no_grad():  # the frozen teacher
        teacher_logits = ht @ wt.T
    return logit_loss(path, loss, student_logits, teacher_logits, mask, chunk_size)


def logit_loss(path: str, loss: str, student_logits, teacher_logits, mask, chunk_size: int) -> torch.Tensor:
    if path == "naive":
        return NAIVE[loss](student_logits, teacher_logits, mask)
    return chunked_logit_loss(student_logits, teacher_logits, loss=loss, mask=mask, chunk_size=chunk_size)


# measuring (in the child process; the measure is benchmarks.allocator) ---------
def _make_inputs(case: dict) -> dict:
    device, dtype = torch.device(case["device"]), getattr(torch, case["dtype"])
    generator = torch.Generator(device).manual_seed(0)

    def randn(*shape, scale=1.0, grad=False):
        tensor = torch.randn(*shape, generator=generator, device=device, dtype=dtype) * scale
        return tensor.requires_grad_(grad)

    n, v, h, h_t = case["positions"], case["vocab"], case["hidden"], case["teacher_hidden"]
    return {
        "hs": randn(n, h, grad=True),
        "ws": randn(v, h, scale=h**-0.5, grad=True),
        "ht": randn(n, h_t),
        "wt": randn(v, h_t, scale=h_t**-0.5),
        "mask": torch.ones(n, dtype=torch.bool, device=device),
    }


def _timed(case: dict, leaves: list, loss_fn) -> tuple[float, float]:
    """(loss value, seconds) of one forward + backward, the leaves' gradients dropped first."""
    for leaf in leaves:
        leaf.grad = None
    cuda = case["device"] == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = loss_fn()
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    return loss.item(), time.perf_counter() - start


def _peak_extra(case: dict, leaves: list, loss_fn) -> dict:
    """Peak extra and left-over MiB of one forward + backward from ``leaves`` (see the module docstring)."""
    for leaf in leaves:
        leaf.grad = None
    gc.collect()
    peak, end = allocator_peak(lambda: loss_fn().backward(), case["device"])
    grads = sum(leaf.grad.numel() * leaf.grad.element_size() for leaf in leaves)
    return {"peak_extra_mib": (peak - grads) / MIB, "left_over_mib": (end - grads) / MIB}


def measure_case(case: dict) -> dict:
    """Runs one case (in a fresh process): peak extra memory, median times, loss value."""
    if case["threads"]:
        torch.set_num_threads(case["threads"])
    check_measure(case["device"])
    path, loss, chunk, repeats = case["path"], case["loss"], case["chunk_size"], case["repeats"]
    # Warm-up on 16 positions: CUDA handles, first-call paths; small enough to leave no cached block.
    warm = _make_inputs({**case, "positions": 16})
    _timed(case, [warm["hs"], warm["ws"]], lambda: step_loss(path, loss, warm, chunk))
    inputs = _make_inputs(case)
    hidden_leaves = [inputs["hs"], inputs["ws"]]
    row = {}
    if path != "fused":
        with torch.no_grad():
            student, teacher = inputs["hs"] @ inputs["ws"].T, inputs["ht"] @ inputs["wt"].T
        student.requires_grad_()

        def from_logits():
            return logit_loss(path, loss, student, teacher, inputs["mask"], chunk)

        row.update(_peak_extra(case, [student], from_logits))
        values, seconds = zip(*(_timed(case, [student], from_logits) for _ in range(repeats)))
        row.update(loss_time_s=statistics.median(seconds), value=values[0])
        del student, teacher, from_logits
        gc.collect()
    else:
        row.update(_peak_extra(case, hidden_leaves, lambda: step_loss(path, loss, inputs, chunk)))
    values, seconds = zip(
        *(_timed(case, hidden_leaves, lambda: step_loss(path, loss, inputs, chunk)) for _ in range(repeats))
    )
    row.update(step_time_s=statistics.median(seconds), step_value=values[0])
    row.setdefault("value", values[0])
    return row


# the grid (in the parent) ------------------------------------
def estimate_bytes(case: dict) -> float:
    """The case's peak from tensor counts measured at small N (for the budget check only)."""
    n, v, h = case["positions"], case["vocab"], case["hidden"]
    element = torch.empty((), dtype=getattr(torch, case["dtype"])).element_size()
    logits, heads = n * v * element, 2 * (n + v) * h * element
    chunk = CHUNK_PEAK_TENSORS * min(case["chunk_size"], n) * v * 4
    if case["path"] == "naive":
        return 2 * logits + NAIVE_PEAK_TENSORS[case["loss"]] * n * v * 4 + 2 * heads
    if case["path"] == "chunked":
        return 3 * logits + chunk + 2 * heads
    return chunk + 2 * heads


def run_case(case: dict, budget_bytes: float) -> dict:
    estimate = estimate_bytes(case)
    row = {**case, "estimate_gib": estimate / 2**30}
    if estimate > budget_bytes:
        return {
            **row,
            "status": f"skipped: needs ≈{estimate / 2**30:.1f} GiB > budget {budget_bytes / 2**30:.1f}",
        }
    # A fresh interpreter per case: memory of one case cannot leak into the next.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return {**row, **pool.submit(measure_case, case).result(), "status": "ok"}
        except BrokenProcessPool:
            return {**row, "status": "failed: the process died (out of memory?)"}
        except Exception as error:  # noqa: BLE001 - one failed case should not lose the others
            return {**row, "status": f"failed: {type(error).__name__}: {error}"}


def _default_budget_gib(device: str) -> float:
    if device == "cuda":
        return 0.9 * torch.cuda.mem_get_info()[0] / 2**30
    try:
        # At most 14 GiB: the benchmark shares its machine.
        return min(14.0, 0.8 * _meminfo_kib("MemAvailable") / 2**20)
    except OSError:
        return 8.0


def _meminfo_kib(field: str) -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/meminfo")


def compare_to_naive(rows: list[dict]) -> None:
    """Adds memory and time ratios and the loss value's relative difference to the naive run of each case."""
    naive = {_case_key(r): r for r in rows if r["path"] == "naive" and r["status"] == "ok"}
    for row in rows:
        base = naive.get(_case_key(row))
        if row["status"] != "ok" or base is None:
            continue
        row["memory_vs_naive"] = row["peak_extra_mib"] / base["peak_extra_mib"]
        row["step_time_vs_naive"] = row["step_time_s"] / base["step_time_s"]
        if "loss_time_s" in row:
            row["loss_time_vs_naive"] = row["loss_time_s"] / base["loss_time_s"]
        row["value_rel_diff"] = abs(row["value"] - base["value"]) / max(abs(base["value"]), 1e-12)


def _case_key(row: dict) -> tuple:
    return row["loss"], row["vocab"], row["positions"]


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| loss | V | N | path | peak extra MiB | × naive | loss s | × naive | step s | × naive | rel. diff |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(row, key, spec):
        return format(row[key], spec) if key in row else "–"

    for row in rows:
        head = f"| {row['loss']} | {row['vocab']} | {row['positions']} | {row['path']} |"
        if row["status"] != "ok":
            lines.append(f"{head} {row['status']} | | | | | | |")
            continue
        cells = [
            cell(row, "peak_extra_mib", ".1f"),
            cell(row, "memory_vs_naive", ".4f"),
            cell(row, "loss_time_s", ".2f"),
            cell(row, "loss_time_vs_naive", ".2f"),
            cell(row, "step_time_s", ".2f"),
            cell(row, "step_time_vs_naive", ".2f"),
            cell(row, "value_rel_diff", ".1e"),
        ]
        lines.append(f"{head} {' | '.join(cells)} |")
    left_over = [row["left_over_mib"] for row in rows if "left_over_mib" in row]
    if left_over:
        lines.append(f"\nLeft over after the step beyond the gradients: at most {max(left_over):.2f} MiB.")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes (default: 49152 151936)")
    parser.add_argument(
        "--positions", type=int, nargs="+", help="N = B·T (default: 1024 4096 on CPU, 4k-16k on CUDA)"
    )
    parser.add_argument("--losses", nargs="+", choices=tuple(NAIVE), default=list(NAIVE))
    parser.add_argument("--hidden", type=int, default=576, help="student width (576: SmolLM2-135M)")
    parser.add_argument("--teacher-hidden", type=int, help="teacher width (default: --hidden)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument(
        "--chunk-size", type=int, help="positions per chunk (default: 32 on CPU, 1024 on CUDA)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="steps per case; the median time is reported")
    parser.add_argument(
        "--memory-budget-gib",
        type=float,
        help="skip cases estimated above (default: 80%% free, at most 14 on CPU)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads per case (default: torch's); 1 on a loaded machine, where synchronising threads "
        "that wait for a core slows the many small ops of small chunks",
    )
    parser.add_argument("--out", default="runs/bench/losses.json", help="JSON written atomically")
    args = parser.parse_args(argv)
    for key, default in DEFAULTS[args.device].items():
        setattr(args, key, getattr(args, key) or default)
    args.teacher_hidden = args.teacher_hidden or args.hidden
    if args.repeats < 1 or args.chunk_size < 1:
        parser.error(f"--repeats ({args.repeats}) and --chunk-size ({args.chunk_size}) must be >= 1")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    budget = (args.memory_budget_gib or _default_budget_gib(args.device)) * 2**30
    shared = {
        k: getattr(args, k)
        for k in ("device", "dtype", "hidden", "teacher_hidden", "chunk_size", "repeats", "threads")
    }
    rows = []
    for loss in args.losses:
        for vocab in args.vocab:
            for positions in args.positions:
                for path in PATHS:
                    case = {"loss": loss, "vocab": vocab, "positions": positions, "path": path, **shared}
                    rows.append(run_case(case, budget))
                    print(f"{loss} V={vocab} N={positions} {path}: {rows[-1]['status']}", flush=True)
    compare_to_naive(rows)
    table = markdown_table(rows)
    threads = args.threads or torch.get_num_threads()
    print(
        f"\n{args.device}, {args.dtype}, H={args.hidden}, chunk {args.chunk_size}, {threads} threads, torch {torch.__version__}\n"
    )
    print(f"{DEFINITION}\n\n{table}")
    payload = {
        "config": vars(args),
        "budget_gib": budget / 2**30,
        "torch": torch.__version__,
        "definition": DEFINITION,
        "rows": rows,
    }
    write_json(args.out, {**payload, "table": table})  # atomically: never half a file
    print(f"\nwrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
