"""The markdown of a model card's sections (llmkd.publish.card gathers the facts, this module words them)."""

from __future__ import annotations

import os

import yaml

from llmkd.publish.measure import LOWER_IS_BETTER

# huggingface_hub renders `card_data` as the YAML metadata block; the rest is plain markdown.
TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Evaluation

{{ evaluation }}

## How to use

{{ usage }}

## Training

{{ training }}
{% if recipe %}
## Recipe

{{ recipe }}
{% endif %}"""


def number(value) -> float | int:
    """Rounded for reading (6 significant digits); ints stay ints."""
    if isinstance(value, (bool, int)):
        return value
    return float(f"{float(value):.6g}")


def _fmt(value, percent: bool = False) -> str:
    if value is None:
        return "—"
    if percent or (isinstance(value, float) and 0.0 <= value <= 1.0):
        return f"{100 * value:.2f} %"
    return f"{value:,.4g}" if isinstance(value, float) else f"{value:,}"


def _millions(count) -> str:
    return "—" if count is None else f"{count / 1e6:.2f} M"


def _relative(metric: str, teacher, student) -> str:
    if teacher in (None, 0) or student in (None, 0):
        return "—"
    share = teacher / student if metric in LOWER_IS_BETTER else student / teacher
    return f"{100 * share:.1f} %"


def evaluation_section(facts: dict, student_metrics: dict) -> str:
    comparison, latency, sizes = facts.get("comparison"), facts.get("latency"), facts.get("parameters", {})
    if comparison:
        return _comparison_table(facts, comparison, latency, sizes)
    if not student_metrics:
        return "No evaluation set was given: this run has no measured metric."
    rows = ["| metric | value |", "|---|---|"]
    for split, values in student_metrics.items():
        prefix = "" if split == "eval" else f"{split} "
        rows += [f"| {prefix}{name} | {_fmt(value)} |" for name, value in values.items()]
    rows.append(f"| parameters | {_millions(sizes.get('student'))} |")
    return f"On {_eval_data(facts)}, at the end of training:\n\n" + "\n".join(rows)


def _comparison_table(facts: dict, comparison: dict, latency, sizes: dict) -> str:
    rows = ["| | teacher | student | student vs teacher |", "|---|---|---|---|"]
    for split, row in comparison.items():
        prefix = "" if split == "eval" else f"{split} "
        for metric, student in row["student"].items():
            teacher = row["teacher"].get(metric)
            rows.append(
                f"| {prefix}{metric} | {_fmt(teacher)} | {_fmt(student)} | {_relative(metric, teacher, student)} of teacher |"
            )
        if "agreement" in row:
            unit = row.get("agreement_unit", "examples")
            rows.append(
                f"| {prefix}top-1 agreement with the teacher ({unit}) | — | {_fmt(row['agreement'], True)} | |"
            )
    teacher_n, student_n = sizes.get("teacher"), sizes.get("student")
    ratio = f"{student_n / teacher_n:.2f}×" if teacher_n and student_n else "—"
    rows.append(f"| parameters | {_millions(teacher_n)} | {_millions(student_n)} | {ratio} |")
    cut = facts["data"].get("max_length")
    note = (
        f"\n\nTeacher and student read the same inputs, cut at this run's max_length ({cut} tokens); `llmkd eval` "
        "cuts each checkpoint at the length it was trained with, so its teacher figure can differ."
        if cut
        else ""
    )
    if latency:
        rows.append(
            f"| CPU latency, batch 1 (ms, median) | {latency['teacher']:.2f} | {latency['student']:.2f} | "
            f"{latency['speedup']:.2f}× faster |"
        )
        note += (
            f"\n\nLatency: {latency['rows']} rows of the evaluation set at batch 1 (their own lengths, no padding), "
            f"teacher and student run back to back on each row, {latency['repeats']} rounds after {latency['warmup']} untimed round(s), "
            f"{latency['threads']} CPU thread(s); the median over rows and rounds. Measured once, when the run "
            "ended, on the training machine: compare it with `llmkd eval` on the machine you deploy to."
        )
    return f"On {_eval_data(facts)}, measured when training ended:\n\n" + "\n".join(rows) + note


def _eval_data(facts: dict) -> str:
    data = facts["data"]
    sizes = data.get("eval_rows") or {}
    counts = ", ".join(f"{n:,} examples" if k == "eval" else f"{k}: {n:,} examples" for k, n in sizes.items())
    names = data.get("names") or []
    name = names[-1] if names and not data.get("hub") else (names[0] if names else "the evaluation set")
    return f"{name} ({counts})" if counts else name


def training_section(facts: dict) -> str:
    data, args = facts["data"], facts["args"]
    lines = [f"- Data: {_data_line(data)}"]
    role = "Teacher" if facts["kind"] == "distillation" else "Base model"
    for name, digest in facts["hashes"].items():
        where = (
            f"local folder `{os.path.basename(os.path.normpath(name))}`"
            if os.path.isdir(name)
            else f"`{name}`"
        )
        revision = f" at revision `{facts['revision']}`" if facts.get("revision") else ""
        hashed = (
            f", content hash `{digest}`"
            if digest
            else " (its files are not on this machine: no content hash)"
        )
        lines.append(f"- {role}: {where}{revision}{hashed}")
    if facts["kind"] == "distillation":
        lines.append(
            f"- Trainer: {facts['trainer']}" + (f" (`trainer: {facts['scheme']}`)" if facts["scheme"] else "")
        )
    steps = (facts["report"].get("train") or {}).get("train_runtime")
    schedule = f"- Optimisation: learning rate {number(args.learning_rate)}, seed {args.seed}"
    schedule += f", {args.per_device_train_batch_size} examples per device and step"
    lines.append(schedule + (f", {steps:,.3g} s of training" if steps else ""))
    versions = ", ".join(f"{k} {v}" for k, v in facts["versions"].items())
    lines.append(f"- Software: {versions}")
    lines.append(
        "- Files: safetensors weights, `training_args.json` (the TrainingArguments, no pickle), "
        "`llmkd_report.json` (every metric of the run)"
    )
    return "\n".join(lines)


def _rows(count) -> str:
    return f"{count:,} rows" if count else "rows not counted"


def _data_line(data: dict) -> str:
    names = data.get("names") or []
    train, evaluation = data.get("train_rows"), sum((data.get("eval_rows") or {}).values())
    if data.get("hub") or len(names) < 2:  # a Hub dataset (or GLUE task) names both splits at once
        where = f"{', '.join(names)}: " if names else ""
        return f"{where}training {_rows(train)}" + (f", evaluation {_rows(evaluation)}" if evaluation else "")
    return f"training `{names[0]}` ({_rows(train)}), evaluation `{names[1]}` ({_rows(evaluation)})"


def recipe_section(command: str, path: str, values: dict) -> str:
    text = yaml.safe_dump(values, sort_keys=False, allow_unicode=True).rstrip()
    return (
        f"The recipe `{os.path.basename(path)}` with its command-line flags merged in (credentials removed): save "
        f"it as recipe.yaml and `llmkd {command} recipe.yaml --output_dir NEW_FOLDER` trains it again."
        f"\n\n```yaml\n{text}\n```"
    )
