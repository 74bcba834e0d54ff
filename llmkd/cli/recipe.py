"""Recipe configs: dataclass defaults < YAML < `--field value` flags, with every key checked."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

from llmkd.cli.recipe_files import parse_overrides, read_yaml  # noqa: F401 - the recipe API, re-exported

# Nothing here imports torch or transformers at import time (`llmkd … --help` and the key check stay fast, see
# llmkd.cli.keys); the modules that do are imported inside the functions that validate or build a run.
TASKS = ("causal_lm", "sequence_classification")  # llmkd.modeling.CAUSAL_LM, SEQ_CLS (tests/test_cli_fast.py)
STUDENT_OPTION_KEYS = {
    "lora": {"r", "alpha", "dropout", "target_modules", "modules_to_save", "merge"},
    "qat": {"bits", "group_size", "exclude", "export"},
}
CACHE_DTYPES = ("float16", "bfloat16", "float32")  # llmkd.teachers.cached.writer.VALUE_DTYPES


def _help(text: str, default=None, factory=None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class DataConfig:
    """Which data, which columns, how long."""

    train_file: str | None = _help("csv/tsv/json/jsonl/parquet training file.")
    validation_file: str | None = _help("Validation file, same format.")
    dataset_name: str | None = _help("A `datasets` name (Hub or local script) instead of files.")
    dataset_config: str | None = _help("The dataset's configuration name.")
    glue_task: str | None = _help(
        "A GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli): columns, classes and metrics from "
        "llmkd.data.glue; data from the Hub (nyu-mll/glue) or from data_dir."
    )
    data_dir: str | None = _help("With glue_task: a folder of local files train.<ext>, validation.<ext>, ...")
    text_columns: list | str = _help("Text column(s); two for sentence pairs.", "text")
    label_column: str | None = _help("Gold label column (classifiers).", "label")
    max_length: int = _help("Truncate inputs to this many tokens (> 0).", 128)
    max_train_samples: int | None = _help("Use only the first N training rows.")
    max_eval_samples: int | None = _help("Use only the first N validation rows.")
    trust_remote_code: bool = _help("Run model code from the Hub (off: only trusted architectures).", False)
    attn_implementation: str | None = _help("eager, sdpa, … (default: transformers' choice).")
    prompt_column: str | None = _help(
        "Causal LMs: prompt/completion data: the prompt column (the loss then covers completion tokens only; "
        "a chat 'messages' column works too). Default: plain text, or 'prompt' for trainer: on_policy."
    )
    completion_column: str = _help(
        "Causal LMs: the completion column of prompt/completion data.", "completion"
    )
    max_prompt_length: int | None = _help("Keep only a prompt's last N tokens.")

    def __post_init__(self):
        if not isinstance(self.max_length, int) or self.max_length <= 0:
            raise ValueError(f"max_length must be a positive integer, got {self.max_length!r}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or null, got {value!r}")
        if not (self.train_file or self.dataset_name or self.glue_task):
            raise ValueError(
                "no data: set train_file (csv/tsv/json/jsonl/parquet), dataset_name or glue_task"
            )
        from llmkd.data.glue import GLUE_TASKS

        if self.glue_task is not None and self.glue_task not in GLUE_TASKS:
            raise ValueError(f"glue_task={self.glue_task!r}: choose one of {sorted(GLUE_TASKS)}")


@dataclass
class RunConfig(DataConfig):
    """What to distil into what (the part of a distillation recipe that is not TrainingArguments)."""

    teacher: str | None = _help(
        "Teacher: a Hub id, a local directory, or a model shipped in a PyPI package that loads offline: "
        "embedded:all-minilm-l6-v2 (all-MiniLM-L6-v2, BERT encoder, 22.7M) or embedded:smollm2-135m-instruct."
    )
    teacher_revision: str | None = _help("Hub revision of the teacher (branch, tag or commit).")
    teachers: list | None = _help(
        "Several teachers (multi-teacher distillation, llmkd.teachers.ensemble): a list of {model: Hub id or "
        "folder} or {cache: classifier cache folder from `llmkd cache-teacher`} (a bare string is a model), each "
        "with an optional name (default: the folder's name; a term reads one teacher with `teacher: NAME`) and "
        "weight (read by teacher_combination weights and random). `teacher:` still builds the student and teaches "
        "only if listed here. A model whose tokenizer differs from the student's reads its own tokenisation."
    )
    teacher_combination: str = _help(
        "With teachers: how logit terms without `teacher:` combine them, mixing probabilities at the run's "
        "temperature: mean, weights (fixed), confidence (per example, by top probability), entropy (per example, "
        "softmax of minus the entropy), random (one teacher per optimizer step, from seed and step), route (per "
        "example, the teacher route_column names).",
        "mean",
    )
    route_column: str | None = _help(
        "With teacher_combination: route: the data column that names each example's teacher (a name or index)."
    )
    task: str | None = _help(f"{TASKS[0]} or {TASKS[1]} (default: from the teacher's architectures).")
    student: str | None = _help(
        "Student: a Hub id, a local directory or an embedded:NAME model (see teacher)."
    )
    student_layers: list | str | None = _help(
        "Student from the teacher: teacher layers to keep, [0, 2, 4] or 'every:K', 'first:N', 'last:N'."
    )
    student_config: dict | None = _help(
        "Fresh student: the teacher's config with these fields changed, e.g. {num_hidden_layers: 4}."
    )
    freeze_embeddings: bool = _help(
        "Keep the student's token embeddings fixed: for small students they hold most of the parameters, so "
        "steps get much cheaper on CPU; students built from the teacher's layers start from its embeddings.",
        False,
    )
    lora: dict | None = _help(
        "Train LoRA adapters instead of the student's weights (peft): {r: 8, alpha: 16, dropout: 0.0, "
        "target_modules: null (all linear layers but the head), modules_to_save: null, merge: false}; checkpoints "
        "hold the adapter; merge: true also writes output_dir/merged, a plain model."
    )
    qlora: bool = _help(
        "With lora: load the student checkpoint (student: PATH) in 4-bit NF4 through bitsandbytes (QLoRA; "
        "pip install llmkd[qlora]).",
        False,
    )
    qat: dict | None = _help(
        "Quantisation-aware distillation: {bits: 4 or 8, group_size: null or N, exclude: [lm_head, classifier, "
        "score], export: true}: Linear layers compute with fake-quantised weights (straight-through gradients); "
        "export writes output_dir/quantized, the int model."
    )
    trainer: str = _help(
        "Which trainer: distill (DistillationTrainer), on_policy (GKD: student-sampled completions; its keys "
        "lmbda, seq_kd, max_new_tokens, sampling_temperature, top_k, top_p), cross_tokenizer (ULD for a "
        "student with another tokenizer; keys uld_weight, uld_chunk_size), cross_modal (a classifier teacher "
        "teaches a student that reads another column of each example through its own processor — audio, images "
        "or another tokenizer; keys student_column, teacher_column, max_seconds), early_exit (FastBERT: exits on "
        "the student's own layers, taught by its final layer; teacher names the student; keys exit_layers, "
        "exit_loss, exit_kd_weight, exit_hint_weight, exit_label_weight, freeze_backbone), mutual (deep mutual "
        "learning: num_peers peers built like the student teach each other, teacher only lends its layers; keys "
        "num_peers, mutual_target, peer_heads).",
        "distill",
    )
    student_column: str | None = _help(
        "trainer: cross_modal: the column the student reads through its own processor: audio (WAV paths relative "
        "to the data file, or arrays), images, or text for another tokenizer (llmkd.data.paired)."
    )
    teacher_column: str | None = _help(
        "trainer: cross_modal: the column the teacher reads through its own processor (default: text_columns)."
    )
    max_seconds: float | None = _help(
        "trainer: cross_modal: cut audio to this many seconds (> 0; default: whole clips)."
    )
    teacher_cache: str | None = _help(
        "Teacher-logit cache folder: written by `llmkd cache-teacher`, read by the distillation run, which then "
        "never loads the teacher."
    )
    cache_top_k: int = _help(
        "Causal LMs: top-k log-probabilities kept per position (+ the rest's log-mass); classifiers keep all.",
        64,
    )
    cache_dtype: str = _help(
        "Stored log-probability dtype: float16 (faithful, default), bfloat16 or float32.", "float16"
    )
    cache_batch_size: int = _help("Rows per teacher forward while caching (> 0).", 8)
    cache_rows_per_shard: int = _help("Rows per safetensors shard, the unit of resume (> 0).", 1024)
    student_dtype: str = _help(
        "Student weights dtype while training: float32 (default; bf16: true / fp16: true then train in mixed "
        "precision with float32 master weights, as optimizers need) or auto (as loaded, e.g. a bf16 checkpoint "
        "trained in pure bf16).",
        "float32",
    )
    mean_teacher: dict | None = _help(
        "Self-distillation from a mean teacher (Tarvainen & Valpola 2017): the teacher is the exponential moving "
        "average of the student, updated after every optimizer step, {decay: 0.999, warmup: false} (warmup: "
        "decay_t = min(decay, 1 - 1/(t+1)), the authors' code); teacher: then only provides the student "
        "(student_layers / student_config). See llmkd.teachers.ema."
    )
    born_again: dict | None = _help(
        "Born-again networks (Furlanello et al. 2018): {generations: N, ensemble: false, student_init: null}: "
        "generation 1 learns from teacher:, generation k from generation k-1, every student initialised alike "
        "(student_layers / student_config from student_init, default the teacher); writes "
        "output_dir/generation-k, output_dir = the last; ensemble: true also scores the generations' mean "
        "probabilities. See llmkd.cli.self_distill."
    )

    def __post_init__(self):
        super().__post_init__()
        trainer_classes(self.trainer)  # a ValueError lists the schemes
        self._check_student_options()
        if self.student_dtype not in ("float32", "auto"):
            raise ValueError(f"student_dtype must be float32 or auto, got {self.student_dtype!r}")
        if not self.teacher:
            raise ValueError("no teacher: set teacher to a Hub id or a local model directory")
        sources = [k for k in ("student", "student_layers", "student_config") if getattr(self, k) is not None]
        if len(sources) != 1:
            unset = " ".join(f"--{k} null" for k in sources[1:])  # a flag cannot delete a recipe's key
            raise ValueError(
                f"set exactly one of student, student_layers, student_config (got {sources or 'none'})"
                + (f"; to replace the recipe's, unset the others: {unset}" if len(sources) > 1 else "")
            )
        if self.task not in (None, *TASKS):
            raise ValueError(f"task={self.task!r}: use {TASKS[0]} or {TASKS[1]}")
        self._check_cache_options()
        from llmkd.cli.self_distill import check_recipe  # the teacher sources load only once a recipe is read

        check_recipe(self)
        from llmkd.cli.ensemble import check_run  # teachers, teacher_combination, route_column

        check_run(self)
        from llmkd.cli.cross_modal import check_recipe as check_cross_modal  # its keys, and what it refuses

        check_cross_modal(self)

    def _check_cache_options(self) -> None:
        if not isinstance(self.cache_top_k, int) or self.cache_top_k < 1:
            raise ValueError(f"cache_top_k must be a positive integer, got {self.cache_top_k!r}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype={self.cache_dtype!r}: choose one of {sorted(CACHE_DTYPES)}")
        for name in ("cache_batch_size", "cache_rows_per_shard"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def _check_student_options(self) -> None:
        for name, keys in STUDENT_OPTION_KEYS.items():
            value = getattr(self, name)
            if value is not None and (not isinstance(value, dict) or set(value) - keys):
                raise ValueError(f"{name} must be a mapping with keys from {sorted(keys)}, got {value!r}")
        if self.lora is not None and self.qat is not None:
            raise ValueError("lora and qat together are not supported: train adapters or a quantised student")
        if self.qlora and (self.lora is None or self.student is None):
            raise ValueError(
                "qlora: true needs lora: {...} and student: PATH (a checkpoint to load in 4 bits)"
            )
        if self.qlora and self.lora.get("merge"):
            raise ValueError(
                "lora: {merge: true} cannot fold adapters into a 4-bit base; drop merge for qlora"
            )


@dataclass
class FinetuneConfig(DataConfig):
    """Fine-tune a classifier (a teacher for users without a fine-tuned Hub checkpoint)."""

    model: str | None = _help(
        "Base model: a Hub id, a local directory, or embedded:all-minilm-l6-v2 (all-MiniLM-L6-v2 from a PyPI "
        "package, no network needed); a fresh classification head is added."
    )
    revision: str | None = _help("Hub revision of the model.")
    class_names: list | None = _help("Class names in label-id order, e.g. [negative, positive].")

    def __post_init__(self):
        super().__post_init__()
        if not self.model:
            raise ValueError("no model: set model to a Hub id or a local model directory")
        if not self.class_names and not self.glue_task:
            raise ValueError("class_names must list the classes in label-id order, e.g. [negative, positive]")


def split_config(values: dict, run_cls=RunConfig, args_cls=None, default_output_dir="runs/distill"):
    """Routes each key to the run dataclass or the TrainingArguments one (default: DistillationConfig); unknown
    keys get a suggestion."""
    from llmkd.cli.keys import unknown_keys_error

    args_cls = args_cls or _distillation_config()
    run_keys = {f.name for f in dataclasses.fields(run_cls)}
    train_keys = {f.name for f in dataclasses.fields(args_cls) if f.init}
    shared = run_keys & train_keys
    assert not shared, (
        f"{run_cls.__name__} and {args_cls.__name__} both define {shared}"
    )  # a key must mean one thing
    unknown = set(values) - run_keys - train_keys
    if unknown:
        raise unknown_keys_error(unknown, run_keys | train_keys)
    defaults = {f.name: f.default for cls in (run_cls, args_cls) for f in dataclasses.fields(cls)}
    takes_bool = {
        f.name for cls in (run_cls, args_cls) for f in dataclasses.fields(cls) if "bool" in str(f.type)
    }
    values = {k: _coerce(k, v, defaults.get(k), k in takes_bool) for k, v in values.items()}
    train_values = {k: v for k, v in values.items() if k in train_keys}
    train_values.setdefault("output_dir", default_output_dir)
    run = run_cls(**{k: v for k, v in values.items() if k in run_keys})
    return run, args_cls(**train_values)


def _distillation_config() -> type:
    from llmkd.schemes.config import DistillationConfig  # imports transformers' TrainingArguments and torch

    return DistillationConfig


def _coerce(key: str, value, default, takes_bool: bool = False):
    """A YAML value for a numeric field: '1e-4' or "0.5" (quoted) -> float, 4.0 -> 4 for an int field; a boolean
    (true would silently be 1) or a word for a number is refused. The dataclass then checks the value itself.
    YAML 1.1 reads the words no/yes/off/on as booleans: for the `*_strategy` fields `no` means the strategy "no";
    a boolean for any other word field is refused with the quoting fix."""
    if isinstance(value, bool) and isinstance(default, str) and not takes_bool:
        if key.endswith("_strategy") and value is False:
            return "no"
        raise ValueError(
            f"{key} takes a word, got the boolean {value!r}: YAML reads yes/no/on/off/true/false as booleans; "
            f'quote the word, e.g. {key}: "{default}" (a flag: --{key} \'"{default}"\')'
        )
    if not isinstance(default, (int, float)) or isinstance(default, bool):
        return value
    if isinstance(value, bool):
        raise ValueError(f"{key} must be a number, got {value!r}")
    if isinstance(value, str):
        if not re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", value):
            raise ValueError(f"{key} must be a number, got {value!r} (e.g. {key}: {default!r})")
        value = float(value)
    if isinstance(default, int) and isinstance(value, float) and value.is_integer():
        return int(value)  # not a non-integral float: some int fields take ratios too (warmup_steps: 0.1)
    return value


def load_config(path: str, overrides: list[str], run_cls=RunConfig, args_cls=None):
    """One (run, training-arguments) pair; see `load_stages` for multi-stage recipes."""
    stages = load_stages(path, overrides, run_cls, args_cls)
    if len(stages) != 1:
        raise ValueError(f"{path} has {len(stages)} stages; run it with `llmkd distill`")
    return stages[0]


def load_stages(path: str, overrides: list[str], run_cls=RunConfig, args_cls=None) -> list[tuple]:
    """Every stage of a recipe, all validated before any training.

    A recipe may list `stages:` (e.g. TinyBERT's intermediate then prediction-layer distillation): each stage's
    keys override the shared ones, flags override both, and stage k > 1 starts from stage k-1's student.
    `smoke: true` shrinks any recipe to a tiny slice and two steps, which is what CI runs.
    """
    base, flags = read_yaml(path), parse_overrides(overrides)
    stages = base.pop("stages", None) or [{}]
    smoke = flags.pop("smoke", base.pop("smoke", False))
    stem = os.path.splitext(os.path.basename(path))[0]
    final_dir = (base | flags).get("output_dir", os.path.join("runs", stem))
    out = []
    for k, stage in enumerate(stages):
        values = base | stage | flags | (SMOKE if smoke else {})
        if k > 0:  # later stages continue from the previous stage's student
            values = {key: v for key, v in values.items() if key not in ("student_layers", "student_config")}
            values["student"] = out[-1][1].output_dir
        values["output_dir"] = (
            final_dir if k == len(stages) - 1 else os.path.join(final_dir, f"stage-{k + 1}")
        )
        classes = (
            trainer_classes(values.get("trainer", "distill")) if issubclass(run_cls, RunConfig) else None
        )
        out.append(split_config(values, run_cls, classes[1] if classes else args_cls))
    early = [
        k + 1 for k, (run, _) in enumerate(out[:-1]) if getattr(run, "lora", None) or getattr(run, "qlora", 0)
    ]
    if early:  # stage k+1 loads stage k's output as a full model, but a LoRA stage saves only an adapter
        raise ValueError(f"lora/qlora in stage(s) {early}: LoRA may only be set on the last stage")
    from llmkd.cli.paths import check_recipe_paths

    for k, stage in enumerate(stages):  # later stages' students are written by the run itself
        check_recipe_paths(base | stage | flags, path, skip=("student",) if k else (), flags=set(flags))
    return out


def trainer_classes(name: str) -> tuple[type, type]:
    """(trainer class, its config dataclass) for a recipe's `trainer:` key (llmkd.schemes.SCHEMES)."""
    from llmkd.schemes import scheme  # imports transformers' Trainer: only once a recipe is read

    return scheme(name)


SMOKE = {
    "max_train_samples": 32,
    "max_eval_samples": 16,
    "max_steps": 2,
    "save_strategy": "no",
    "eval_strategy": "no",
    "logging_steps": 1,
    "report_to": "none",
}


def __getattr__(name: str):
    # FINETUNE imports TrainingArguments (and torch) only when a fine-tuning run asks for it.
    if name == "FINETUNE":
        from transformers import TrainingArguments

        return (FinetuneConfig, TrainingArguments)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
