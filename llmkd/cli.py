"""`llmkd distill CONFIG.yaml [--field value …]`: precedence is dataclass defaults < YAML < flags."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field

import yaml
from transformers import AutoTokenizer, set_seed

from llmkd.alignment import CAUSAL_LM, SEQ_CLS
from llmkd.config import DistillationConfig
from llmkd.data import collator_for, load_raw, tokenize
from llmkd.models import describe, detect_task, load_model, student_from_config, student_from_teacher
from llmkd.trainer import DistillationTrainer

logger = logging.getLogger("llmkd")
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


@dataclass
class RunConfig:
    """What to distil into what, on which data (the part of a recipe that is not TrainingArguments)."""

    teacher: str = field(default=None, metadata={"help": "Teacher: a Hub id or a local directory."})
    teacher_revision: str | None = field(
        default=None, metadata={"help": "Hub revision (branch, tag, commit)."}
    )
    task: str | None = field(
        default=None,
        metadata={
            "help": "causal_lm or sequence_classification (default: from the teacher's architectures)."
        },
    )
    student: str | None = field(default=None, metadata={"help": "Student: a Hub id or a local directory."})
    student_layers: list | str | None = field(
        default=None,
        metadata={
            "help": "Student from the teacher: teacher layers to keep, [0, 2, 4] or 'every:K', 'first:N', 'last:N'."
        },
    )
    student_config: dict | None = field(
        default=None,
        metadata={
            "help": "Fresh student: the teacher's config with these fields changed, e.g. {num_hidden_layers: 4}."
        },
    )
    train_file: str | None = field(
        default=None, metadata={"help": "csv/tsv/json/jsonl/parquet training file."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Validation file, same format."})
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` name instead of files."})
    dataset_config: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    text_columns: list | str = field(
        default="text", metadata={"help": "Text column(s); two for sentence pairs."}
    )
    label_column: str | None = field(default="label", metadata={"help": "Gold label column (classifiers)."})
    max_length: int = field(default=128, metadata={"help": "Truncate inputs to this many tokens (> 0)."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training rows."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N validation rows."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code from the Hub (off)."})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager, sdpa, … (default: HF's)."}
    )

    def __post_init__(self):
        if not self.teacher:
            raise ValueError("no teacher: set teacher to a Hub id or a local model directory")
        sources = [k for k in ("student", "student_layers", "student_config") if getattr(self, k) is not None]
        if len(sources) != 1:
            raise ValueError(
                f"set exactly one of student, student_layers, student_config (got {sources or 'none'})"
            )
        if self.task not in (None, CAUSAL_LM, SEQ_CLS):
            raise ValueError(f"task={self.task!r}: use {CAUSAL_LM} or {SEQ_CLS}")
        if not isinstance(self.max_length, int) or self.max_length <= 0:
            raise ValueError(f"max_length must be a positive integer, got {self.max_length!r}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or null, got {value!r}")


def parse_overrides(tokens: list[str]) -> dict:
    """`--key value`, `--key=value` or a bare `--flag` (true); values are read as YAML scalars/lists."""
    out, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ValueError(f"unexpected argument {token!r}; overrides look like --learning_rate 1e-4")
        key, eq, value = token[2:].partition("=")
        if not eq:
            has_value = i + 1 < len(tokens) and not tokens[i + 1].startswith("--")
            value = tokens[i + 1] if has_value else "true"
            i += has_value
        out[key.replace("-", "_")] = _numbers(yaml.safe_load(value))
        i += 1
    return out


def _numbers(value):
    """YAML 1.1 reads `1e-4` as a string; recipes mean the number."""
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def split_config(
    values: dict, default_output_dir: str = "runs/distill"
) -> tuple[RunConfig, DistillationConfig]:
    run_keys = {f.name for f in dataclasses.fields(RunConfig)}
    train_keys = {f.name for f in dataclasses.fields(DistillationConfig) if f.init}
    unknown = sorted(set(values) - run_keys - train_keys)
    if unknown:
        hints = {k: difflib.get_close_matches(k, run_keys | train_keys, n=1) for k in unknown}
        raise ValueError(
            "unknown config keys: "
            + ", ".join(f"{k} (did you mean {h[0]}?)" if h else k for k, h in hints.items())
        )
    train_values = {k: v for k, v in values.items() if k in train_keys}
    train_values.setdefault("output_dir", default_output_dir)
    return RunConfig(**{k: v for k, v in values.items() if k in run_keys}), DistillationConfig(**train_values)


def load_config(path: str, overrides: list[str]) -> tuple[RunConfig, DistillationConfig]:
    with open(path, encoding="utf-8") as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of config keys, got {type(values).__name__}")
    values = {k: _numbers(v) for k, v in values.items()} | parse_overrides(overrides)
    stem = os.path.splitext(os.path.basename(path))[0]
    return split_config(values, default_output_dir=os.path.join("runs", stem))


def build_models(run: RunConfig, args: DistillationConfig):
    """Teacher, student and their tokenizers, as the recipe says."""
    common = {
        "revision": run.teacher_revision,
        "trust_remote_code": run.trust_remote_code,
        "attn_implementation": run.attn_implementation,
    }
    task = run.task or detect_task(run.teacher, run.teacher_revision, run.trust_remote_code)
    teacher = load_model(run.teacher, task, **common)
    teacher_tok = AutoTokenizer.from_pretrained(
        run.teacher, revision=run.teacher_revision, trust_remote_code=run.trust_remote_code
    )
    if run.student is not None:
        extra = (
            {
                "num_labels": teacher.config.num_labels,
                "label2id": teacher.config.label2id,
                "id2label": teacher.config.id2label,
            }
            if task == SEQ_CLS
            else {}
        )
        student = load_model(
            run.student,
            task,
            trust_remote_code=run.trust_remote_code,
            attn_implementation=run.attn_implementation,
            **extra,
        )
        student_tok = AutoTokenizer.from_pretrained(run.student, trust_remote_code=run.trust_remote_code)
    elif run.student_layers is not None:
        student, student_tok = student_from_teacher(teacher, run.student_layers), teacher_tok
    else:
        student, student_tok = student_from_config(teacher, run.student_config, seed=args.seed), teacher_tok
    return task, teacher, teacher_tok, student, student_tok


def build_data(run: RunConfig, task: str, tokenizer):
    raw = load_raw(run.train_file, run.validation_file, run.dataset_name, run.dataset_config)
    limits = {"train": run.max_train_samples, "validation": run.max_eval_samples}
    out = {}
    for split, data in raw.items():
        if limits.get(split):
            data = data.select(range(min(limits[split], len(data))))
        out[split] = tokenize(data, tokenizer, task, run.text_columns, run.label_column, run.max_length)
    return out


def distill(config_path: str, overrides: list[str]) -> dict:
    """Runs one distillation recipe end to end and returns its report (also written to output_dir)."""
    run, args = load_config(config_path, overrides)
    set_seed(args.seed)
    task, teacher, teacher_tok, student, student_tok = build_models(run, args)
    data = build_data(run, task, student_tok)
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data.get("validation"),
        data_collator=collator_for(task, student_tok),
        processing_class=student_tok,
        teacher_processing_class=teacher_tok,
    )
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()
    report = {
        "teacher": run.teacher,
        "task": task,
        "train": result.metrics,
        "student": describe(student),
        "teacher_size": describe(teacher),
    }
    if "validation" in data:
        report["eval"] = trainer.evaluate()
    if trainer.is_world_process_zero():
        write_json(os.path.join(args.output_dir, "llmkd_report.json"), report)
    return report


def write_json(path: str, payload: dict) -> None:
    """Atomic: write a temporary file, then rename it over the target."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, default=str)
    os.replace(path + ".tmp", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmkd", description="Knowledge distillation for HF transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_distill = sub.add_parser("distill", help="distil a teacher into a student from a YAML recipe")
    p_distill.add_argument("config", help="YAML recipe; any field can be overridden with --field value")
    sub.add_parser("demo", help="run the embedded offline demo")
    known, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if known.command == "distill":
            report = distill(known.config, rest)
            print(json.dumps(report.get("eval", report["train"]), indent=2, default=str))
        elif known.command == "demo":
            from llmkd.demo import run_demo

            run_demo(rest)
    except (ValueError, FileNotFoundError) as err:
        print(f"llmkd: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
