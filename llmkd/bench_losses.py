"""Memory and time of logit distillation for large vocabularies: naive vs chunked vs fused, in one run.

    python -m llmkd.bench_losses [--vocab 49152 151936] [--positions 4096 8192 16384] [--device cpu|cuda]
                                 [--repeats 3] [--out runs/bench/losses.json]

Every case is one student step from the final hidden states: the student logits h_S W_Sᵀ (and the frozen
teacher's), the loss, and backward into h_S and W_S, which is what the trainer pays per step. Paths:

- ``naive``: the logits, then a loss written like a typical trainer's, holding (N, V) float32 log-softmaxes,
  mixtures and elementwise KL terms until backward (:func:`naive_jsd`, :func:`naive_forward_kl`);
- ``chunked``: the logits, then :func:`llmkd.chunked.chunked_logit_loss`;
- ``fused``: :func:`llmkd.chunked.fused_logit_distillation`, no (N, V) tensor at all.

"Peak extra" is the memory the step adds on top of its inputs (h_S, W_S, h_T, W_T): the logits, the loss's
temporaries and the gradients. Each case runs in a fresh spawned process, after a warm-up step on 16
positions. On CUDA it is ``torch.cuda.max_memory_allocated`` minus the allocation before the step; on CPU
the growth of the peak resident set size (VmHWM, reset through /proc/self/clear_refs) over the resident
size before the step. Times are the median of ``--repeats`` forward+backward steps (on a shared CPU they
move with the machine's load; the ratios of one run are side by side). Loss values are compared with the
naive path's.

Defaults on CPU (2 cores: about 5 minutes) are N = 512 in chunks of 128; on CUDA N = 4k-16k in chunks of
1024. A case whose estimated memory exceeds ``--memory-budget-gib`` is skipped and marked so in the table
rather than run out of memory.
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

from llmkd.atomic import write_json
from llmkd.chunked import chunked_logit_loss, fused_logit_distillation

PATHS = ("naive", "chunked", "fused")
# device -> grid. The CPU grid is smaller (about 5 minutes on 2 cores) and so are its chunks, so that a case
# still has 4 of them; on CUDA the chunk is chunked_logit_loss's own default.
DEFAULTS = {
    "cuda": {"vocab": [49152, 151936], "positions": [4096, 8192, 16384], "chunk_size": 1024},
    "cpu": {"vocab": [49152, 151936], "positions": [512], "chunk_size": 128},
}
# Live float32 (N, V) tensors at the naive loss's peak besides the two logits, and (chunk, V) ones at the
# chunked/fused peak, as measured on CPU (V = 8192, N = 4096): the budget check's estimate.
NAIVE_PEAK_TENSORS = {"jsd": 13, "forward_kl": 6}
CHUNK_PEAK_TENSORS = 14
MIB = 2**20


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
    """The loss of one step along ``path``; the logits (naive, chunked) are part of the step."""
    hs, ws, ht, wt, mask = (inputs[k] for k in ("hs", "ws", "ht", "wt", "mask"))
    if path == "fused":
        return fused_logit_distillation(hs, ws, ht, wt, loss=loss, mask=mask, chunk_size=chunk_size)
    student_logits = hs @ ws.T
    with torch.no_grad():  # the frozen teacher
        teacher_logits = ht @ wt.T
    if path == "naive":
        return NAIVE[loss](student_logits, teacher_logits, mask)
    return chunked_logit_loss(student_logits, teacher_logits, loss=loss, mask=mask, chunk_size=chunk_size)


# measuring (in the child process) ----------------------------
def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> int:
    """Resets the peak RSS to the current RSS (Linux ≥ 4.0) and returns it in bytes."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _proc_kib("VmRSS") * 1024


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


def _one_step(case: dict, inputs: dict) -> tuple[float, float]:
    """(loss value, seconds) of a forward+backward step, gradients of the previous step dropped first."""
    inputs["hs"].grad = inputs["ws"].grad = None
    cuda = case["device"] == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = step_loss(case["path"], case["loss"], inputs, case["chunk_size"])
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    return loss.item(), time.perf_counter() - start


def measure_case(case: dict) -> dict:
    """Runs one case (in a fresh process): peak extra bytes, median seconds, loss value."""
    if case["threads"]:
        torch.set_num_threads(case["threads"])
    cuda = case["device"] == "cuda"
    # Warm-up on 16 positions: on CPU the first call pages in library code, which RSS would count; on
    # CUDA it creates the cuBLAS handles. Small, so no freed block stays cached for the measured steps.
    _one_step(case, _make_inputs({**case, "positions": 16}))
    inputs = _make_inputs(case)
    inputs["hs"].grad = inputs["ws"].grad = None
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _reset_cpu_peak()
    values, seconds = zip(*(_one_step(case, inputs) for _ in range(case["repeats"])))
    peak = torch.cuda.max_memory_allocated() if cuda else _proc_kib("VmHWM") * 1024
    return {"peak_extra_mib": (peak - before) / MIB, "time_s": statistics.median(seconds), "value": values[0]}


# the grid (in the parent) ------------------------------------
def estimate_bytes(case: dict) -> float:
    """A rough peak for the budget check: live (N, V) float32 tensors plus the gradients."""
    n, v, h = case["positions"], case["vocab"], case["hidden"]
    element = torch.empty((), dtype=getattr(torch, case["dtype"])).element_size()
    logits = n * v * element
    grads = (n + v) * h * 4
    if case["path"] == "naive":
        return 2 * logits + NAIVE_PEAK_TENSORS[case["loss"]] * n * v * 4 + grads
    chunk = min(case["chunk_size"], n) * v * 4 * CHUNK_PEAK_TENSORS
    return (3 * logits if case["path"] == "chunked" else 0) + chunk + grads


def run_case(case: dict, budget_bytes: float) -> dict:
    estimate = estimate_bytes(case)
    row = {**case, "estimate_gib": estimate / 2**30}
    if estimate > budget_bytes:
        return {
            **row,
            "status": f"skipped: estimate {estimate / 2**30:.1f} GiB > budget {budget_bytes / 2**30:.1f}",
        }
    # A fresh interpreter per case: peak memory of one case cannot leak into the next.
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
        return 0.8 * _meminfo_kib("MemAvailable") / 2**20
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
        if row["status"] == "ok" and base is not None:
            row["memory_vs_naive"] = row["peak_extra_mib"] / base["peak_extra_mib"]
            row["time_vs_naive"] = row["time_s"] / base["time_s"]
            row["value_rel_diff"] = abs(row["value"] - base["value"]) / max(abs(base["value"]), 1e-12)


def _case_key(row: dict) -> tuple:
    return row["loss"], row["vocab"], row["positions"]


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| loss | V | N | path | peak extra MiB | × naive | time s | × naive |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        head = f"| {row['loss']} | {row['vocab']} | {row['positions']} | {row['path']} |"
        if row["status"] != "ok":
            lines.append(f"{head} {row['status']} | | | |")
            continue
        memory, time_ = (f"{row[k]:.2f}" if k in row else "n/a" for k in ("memory_vs_naive", "time_vs_naive"))
        lines.append(f"{head} {row['peak_extra_mib']:.0f} | {memory} | {row['time_s']:.3f} | {time_} |")
    differences = [row["value_rel_diff"] for row in rows if "value_rel_diff" in row]
    if differences:
        lines.append(f"\nLoss values vs naive: max relative difference {max(differences):.1e}.")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes (default: 49152 151936)")
    parser.add_argument(
        "--positions", type=int, nargs="+", help="N = B·T (default: 512 on CPU, 4k-16k on CUDA)"
    )
    parser.add_argument("--losses", nargs="+", choices=tuple(NAIVE), default=list(NAIVE))
    parser.add_argument("--hidden", type=int, default=576, help="student width (576: SmolLM2-135M)")
    parser.add_argument("--teacher-hidden", type=int, help="teacher width (default: --hidden)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument(
        "--chunk-size", type=int, help="positions per chunk (default: 128 on CPU, 1024 on CUDA)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="steps per case; the median time is reported")
    parser.add_argument(
        "--memory-budget-gib", type=float, help="skip cases estimated above (default: 80%% free)"
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
    print(table)
    payload = {"config": vars(args), "budget_gib": budget / 2**30, "torch": torch.__version__, "rows": rows}
    write_json(args.out, {**payload, "table": table})  # atomically: never half a file
    print(f"\nwrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
