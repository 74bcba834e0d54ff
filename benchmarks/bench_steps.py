"""Teacher-logit cache on a real model: faithfulness and size per k, and training-step times, in one run.

    python -m benchmarks.bench_steps [--data runs/demo/data/train.jsonl] [--what faithfulness steps]
                                [--ks 1 8 32 64 128] [--batch 8] [--length 128] [--steps 5] [--warmup 1]
                                [--threads 1] [--out runs/bench/steps.json]

Teacher: SmolLM2-135M-Instruct (llmkd.data.assets.smollm2, 30 Llama layers, vocabulary 49,152) in float32; student: 4 of its
layers (0, 8, 16, 24; llmkd.models.student_from_teacher); text: Rotten Tomatoes sentences (make them with
`llmkd data rotten-tomatoes runs/demo/data`).

- faithfulness: for each k and stored dtype, the cached (k + 1)-bucket loss against the live teacher's full loss
  at the same positions — relative error (cached ≤ live for divergences) and the cosine of the two gradients with
  respect to the student logits — and the cache's bytes per position, from a cache actually written.
- steps (side by side, interleaved round by round, median of ``--steps`` after ``--warmup``): (a) a training
  step from a k = 64 float16 cache (DistillationTrainer with the cache as teacher, forward KL, no hard labels) against plain
  fine-tuning (cross-entropy) of the same student, bar ≤ 1.10×; (b) a live-teacher distillation step
  (DistillationTrainer, same loss) against the ideal 1 + t(teacher forward) / t(student step), bar within 10%.
  Every step is ``Trainer.training_step`` (forward, loss, backward) plus the same AdamW step.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from llmkd import DistillationConfig, DistillationTrainer
from llmkd.atomic import write_json
from llmkd.data.assets.smollm2 import smollm2_path
from llmkd.losses import LOSSES
from llmkd.losses.bucketed import bucketed_logit_loss
from llmkd.students.from_teacher import student_from_teacher
from llmkd.teachers.cached.binding import cached_trainer_kwargs
from llmkd.teachers.cached.writer import topk_targets, write_cache

STUDENT_LAYERS = [0, 8, 16, 24]
NEAR_DROPPED = (7, 14, 21, 28)
LOSS_CASES = [
    ("forward_kl", 1.0, {}),
    ("forward_kl", 2.0, {}),
    ("reverse_kl", 1.0, {}),
    ("jsd", 1.0, {"beta": 0.5}),
]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_texts(path: str, n: int) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing; create it with `llmkd data rotten-tomatoes {os.path.dirname(path)}`"
        )
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [r.get("sentence", r.get("text")) for r in rows[:n]]


def packed_rows(tokenizer, texts: list[str], rows: int, length: int) -> Dataset:
    """`rows` rows of exactly `length` tokens: sentences joined by EOS, as in LM pre-training (no padding)."""
    stream = []
    for text in texts:
        stream += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= rows * length:
            break
    if len(stream) < rows * length:
        raise ValueError(f"{len(texts)} sentences give {len(stream)} tokens, fewer than {rows} × {length}")
    ids = [stream[i * length : (i + 1) * length] for i in range(rows)]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length for _ in ids]})


# faithfulness ------------------------------------------------
def _masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def _loss_and_grad(fn, student_logits, mask):
    leaf = student_logits.detach().clone().requires_grad_(True)
    value = _masked_mean(fn(leaf), mask)
    value.backward()
    return value.item(), leaf.grad.flatten()


def faithfulness(teacher, students: dict, tokenizer, texts, ks, workdir) -> list[dict]:
    """Per student, k, loss and stored dtype: the cached loss against the live one (see the module docstring)."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        t_logits = teacher(**enc).logits[:, :-1].float()
    mask = enc["attention_mask"][:, 1:].float()  # position t predicts token t + 1
    data = Dataset.from_dict(
        {"input_ids": [ids[m.bool()].tolist() for ids, m in zip(enc["input_ids"], enc["attention_mask"])]}
    )
    sizes = {}
    for k in ks:  # a cache actually written, for its size
        path = os.path.join(workdir, f"k{k}")
        sizes[k] = write_cache(teacher, tokenizer, {"train": data}, path, k=k, batch_size=8)[
            "bytes_per_position"
        ]
    rows = []
    for student_name, student in students.items():
        with torch.no_grad():
            s_logits = student(**enc).logits[:, :-1].float()
        for name, temperature, params in LOSS_CASES:
            live_fn = functools.partial(
                LOSSES["logits"][name], teacher_logits=t_logits, temperature=temperature, **params
            )
            live, g_live = _loss_and_grad(live_fn, s_logits, mask)
            for k in ks:
                ids, values, rest = topk_targets(t_logits, k, temperature)
                exact = None
                for dtype_name, dtype in DTYPES.items():
                    stored = (values.to(dtype).float(), rest.to(dtype).float())
                    cached_fn = functools.partial(
                        bucketed_logit_loss, topk_ids=ids, topk_logprobs=stored[0], rest_logmass=stored[1],
                        loss=name, temperature=temperature, **params,
                    )  # fmt: skip
                    cached, g_cached = _loss_and_grad(cached_fn, s_logits, mask)
                    exact = cached if exact is None else exact  # float32 first: the cut alone
                    rows.append(
                        {
                            "student": student_name,
                            "k": k,
                            "loss": name,
                            "temperature": temperature,
                            "dtype": dtype_name,
                            "bytes_per_position": sizes[k] if dtype_name == "float16" else None,
                            "live": round(live, 6),
                            "cached": round(cached, 6),
                            "relative_error": round((live - cached) / live, 5),
                            "storage_error": float(f"{abs(cached - exact) / exact:.3g}"),
                            "grad_cosine": round(F.cosine_similarity(g_live, g_cached, dim=0).item(), 5),
                        }
                    )
    return rows


# step times --------------------------------------------------
def _args(out: str, **kw):
    common = dict(
        output_dir=out, report_to="none", use_cpu=True, per_device_train_batch_size=8, disable_tqdm=True
    )
    return common | kw


def _ready(trainer):
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by train(), read by training_step
    return trainer


def _step(trainer, batch) -> float:
    start = time.perf_counter()
    num_items = trainer._get_num_items_in_batch([batch], trainer.args.device)
    trainer.training_step(trainer.model, batch, num_items)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _teacher_forward(teacher, batch) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return time.perf_counter() - start


def step_times(teacher, student, tokenizer, data, k, steps, warmup, workdir) -> dict:
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    batch = collator([data[i] for i in range(len(data))])
    started = time.perf_counter()
    write_cache(
        teacher, tokenizer, {"train": data}, os.path.join(workdir, "steps"), k=k, batch_size=len(data)
    )
    cache_seconds = time.perf_counter() - started
    distill = dict(
        terms=[{"knowledge": "logits", "loss": "forward_kl"}], hard_label_weight=0.0, temperature=1.0
    )
    args = DistillationConfig(**_args(os.path.join(workdir, "c"), **distill))
    kwargs = cached_trainer_kwargs(
        os.path.join(workdir, "steps"), args=args, train_dataset=data, processing_class=tokenizer
    )
    cached_batch = collator([kwargs["train_dataset"][i] for i in range(len(data))])
    trainers = {
        "ce": _ready(
            Trainer(model=copy.deepcopy(student), args=TrainingArguments(**_args(os.path.join(workdir, "f"))))
        ),
        "cached": _ready(
            DistillationTrainer(model=copy.deepcopy(student), processing_class=tokenizer, **kwargs)
        ),
        "live": _ready(
            DistillationTrainer(
                model=copy.deepcopy(student),
                teacher=teacher,
                args=DistillationConfig(**_args(os.path.join(workdir, "l"), **distill)),
                processing_class=tokenizer,
            )
        ),
    }
    times = {name: [] for name in (*trainers, "teacher_forward")}
    for round_ in range(warmup + steps):  # interleaved: the machine's load hits every path alike
        sample = {
            "ce": _step(trainers["ce"], batch),
            "cached": _step(trainers["cached"], cached_batch),
            "teacher_forward": _teacher_forward(teacher, batch),
            "live": _step(trainers["live"], batch),
        }
        logging.info("round %d: %s", round_, {k: round(v, 3) for k, v in sample.items()})
        if round_ >= warmup:
            for name, value in sample.items():
                times[name].append(value)
    return _step_report(times, cache_seconds, trainers["live"].fused, k, batch["input_ids"].shape)


def _step_report(times, cache_seconds, fused, k, shape) -> dict:
    median = {name: statistics.median(values) for name, values in times.items()}
    cached_ratio = median["cached"] / median["ce"]
    ideal = 1 + median["teacher_forward"] / median["ce"]
    live_ratio = median["live"] / median["ce"]
    return {
        "batch": list(shape),
        "k": k,
        "median_seconds": {n: round(v, 4) for n, v in median.items()},
        "all_seconds": {n: [round(v, 4) for v in values] for n, values in times.items()},
        "cache_write_seconds": round(cache_seconds, 2),
        "cached_over_ce": round(cached_ratio, 3),
        "cached_bar_1.10_met": cached_ratio <= 1.10,
        "live_over_ce": round(live_ratio, 3),
        "ideal_live_over_ce": round(ideal, 3),
        "live_over_ideal": round(live_ratio / ideal, 3),
        "live_bar_within_10pct_met": abs(live_ratio / ideal - 1) <= 0.10,
        "live_path": "fused (hidden states + lm_head chunks)" if fused else "plain logits",
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="runs/demo/data/train.jsonl")
    parser.add_argument(
        "--what", nargs="+", default=["faithfulness", "steps"], choices=["faithfulness", "steps"]
    )
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 8, 32, 64, 128])
    parser.add_argument("--sentences", type=int, default=16, help="sentences of the faithfulness check")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--k", type=int, default=64, help="k of the step benchmark's cache")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads; 1 keeps a shared CPU's timings steady"
    )
    parser.add_argument("--out", default=None)
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(options.threads)
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    student = student_from_teacher(teacher, STUDENT_LAYERS)
    texts = load_texts(options.data, 2000)
    report = {"teacher": path, "student_layers": STUDENT_LAYERS, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as workdir:
        if "faithfulness" in options.what:
            # A far student (4 untrained layers, KL ~ 12 nats) and a near one (26 of 30 layers): they bracket a
            # trained student.
            near = student_from_teacher(teacher, [i for i in range(30) if i not in NEAR_DROPPED])
            report["faithfulness"] = faithfulness(
                teacher,
                {"4 layers": student, "26 layers": near},
                tokenizer,
                texts[: options.sentences],
                options.ks,
                workdir,
            )
        if "steps" in options.what:
            data = packed_rows(tokenizer, texts, options.batch, options.length)
            report["steps"] = step_times(
                teacher, student, tokenizer, data, options.k, options.steps, options.warmup, workdir
            )
    print(json.dumps(report, indent=2))
    if options.out:
        write_json(options.out, report)
    return report


if __name__ == "__main__":
    main()
