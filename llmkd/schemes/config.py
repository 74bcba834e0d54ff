"""`DistillationConfig`: TrainingArguments plus the distillation terms, validated before any training.

Every field either takes effect or is refused. Fields that only matter in some runs name, in their metadata,
the fact about the run that makes them matter (``applies``); once the trainer knows the run it calls
`check_settings`, which refuses a non-default value of a field that would do nothing (naming the field, the
value, why, and the fix). The same holds for the TrainingArguments fields that llmkd's loss path replaces.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from llmkd.knowledge import parse_term

VOCAB_MISMATCH = ("error", "slice")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
TEACHER_PLACEMENTS = ("auto", "replicate")

# fact -> why a field that needs it does nothing when it is false.
FACT_REASONS = {
    "global_temperature": "no logit term uses the config's temperature (none, or each sets its own)",
    "vocab_differs": "the student's and the teacher's logit rows do not differ (or are not compared)",
    "slice": "vocab_mismatch is not 'slice'",
    "fused_possible": "the fused path cannot apply to this run (it needs causal-LM logit terms with a live teacher "
    "reading the student's ids, no task loss or other term needing the full logits, plain lm_heads and no "
    "sharding back-end)",
    "fused": "the fused path is not taken in this run",
    "sharded_backend": "the back-end (no FSDP, no DeepSpeed ZeRO-3) keeps a plain teacher copy on every process",
    "hard_labels": "hard_label_weight is 0 or the task is regression (no cross-entropy on labels)",
    "sampling": "no completion is sampled (lmbda=0 and seq_kd=false)",
    "dataset_batches": "every batch is sampled from the student (lmbda=1)",
    "uld": "uld_weight is 0 (no ULD term)",
}


def _field(default, help_text: str, applies: str | None = None):
    metadata = {"help": help_text} | ({"applies": applies} if applies else {})
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DistillationConfig(TrainingArguments):
    """TrainingArguments for llmkd's trainers: the loss mix and how the teacher runs."""

    terms: list = _field(
        [{"knowledge": "logits", "loss": "forward_kl", "weight": 1.0}],
        "Distillation terms, each {knowledge: logits|hidden|attention|relation, loss: <name>, weight: w, "
        "layer_map: uniform|last|[[s, t], ...], temperature: T (logit terms; default: the config's), <loss "
        "parameters such as beta or alpha>}.",
    )
    temperature: float = _field(
        2.0,
        "Softmax temperature T of logit terms (> 0); soft-target losses are multiplied by T^2 (Hinton).",
        "global_temperature",
    )
    hard_label_weight: float = _field(
        0.5, "Weight (>= 0) of the task loss on gold labels; 0 distils from the teacher alone."
    )
    teacher_dtype: str = _field(
        "auto",
        "Teacher weights dtype: auto (as loaded), float32, bfloat16 or float16. With a teacher-logit cache: the "
        "dtype the cache must have been computed in (checked).",
    )
    teacher_placement: str = _field(
        "auto",
        "Under FSDP / DeepSpeed ZeRO-3: auto shards the teacher like the student (FSDP2: fully_shard, FSDP1: the "
        "plugin, ZeRO-3: an inference engine); replicate keeps a full copy on every process.",
        "sharded_backend",
    )
    vocab_mismatch: str = _field(
        "error",
        "Logit rows differ in size (padded vocab, e.g. 151936 vs 152064): 'error', or 'slice' both to the shared "
        "vocabulary and renormalise (never zero-pad).",
        "vocab_differs",
    )
    fused_logits: bool = _field(
        True,
        "Causal LMs whose terms need no full student logits (no task loss): compute logit terms in training from "
        "the last hidden states and the lm_head weights, chunk by chunk, never materialising the (batch, length, "
        "vocab) logits (llmkd.losses.fused_logit_distillation). Used for model families whose logits are exactly "
        "lm_head(last hidden state); others take the plain path.",
        "fused_possible",
    )
    logit_chunk_size: int = _field(
        1024, "Positions per chunk of the fused logit path (> 0); memory ~ chunk × vocab.", "fused"
    )
    shared_vocab_size: int | None = _field(
        None,
        "With vocab_mismatch=slice: the real vocabulary size (default: the smaller of the two).",
        "slice",
    )
    diagnostics: bool = _field(
        True,
        "Log training diagnostics beside the terms (llmkd.schemes.diagnostics): teacher/student entropy of the "
        "soft targets, top-1 agreement, a cache's top-k mass, per-layer values of feature terms, and a one-time "
        "warning when distillation gives no signal. Measured on the steps that log, under no_grad, from outputs "
        "the terms already have; false skips them.",
    )

    def __post_init__(self):
        best_direction_given = self.greater_is_better is not None
        super().__post_init__()
        if not is_number(self.temperature) or not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0, got {self.temperature!r}; a finite number, 1.0 means no softening"
            )
        if not is_number(self.hard_label_weight) or not self.hard_label_weight >= 0:
            raise ValueError(
                f"hard_label_weight must be a finite number >= 0, got {self.hard_label_weight!r}"
            )
        _choice("teacher_dtype", self.teacher_dtype, TEACHER_DTYPES)
        _choice("teacher_placement", self.teacher_placement, TEACHER_PLACEMENTS)
        _choice("vocab_mismatch", self.vocab_mismatch, VOCAB_MISMATCH)
        if not isinstance(self.diagnostics, bool):
            raise ValueError(f"diagnostics must be true or false, got {self.diagnostics!r}")
        if (
            not isinstance(self.logit_chunk_size, int)
            or isinstance(self.logit_chunk_size, bool)
            or self.logit_chunk_size <= 0
        ):
            raise ValueError(f"logit_chunk_size must be a positive integer, got {self.logit_chunk_size!r}")
        if not isinstance(self.terms, (list, tuple)):
            raise ValueError(f"terms must be a list of term mappings, got {self.terms!r}")
        self.terms = [parse_term(t, i) for i, t in enumerate(self.terms)]
        self._check_something_to_train()
        _check_repeats(self.terms)
        if not best_direction_given and self.metric_for_best_model:
            self.greater_is_better = not _lower_is_better(self.metric_for_best_model)

    def _check_something_to_train(self) -> None:
        # A hook: schemes with a loss of their own (e.g. ULD) count that loss too.
        if not self.terms and self.hard_label_weight == 0:
            raise ValueError("nothing to train on: no distillation terms and hard_label_weight=0; add a term")

    def to_dict(self):
        # Terms are frozen dataclasses; keep the serialised TrainingArguments JSON-friendly.
        d = super().to_dict()
        d["terms"] = [t.to_dict() for t in self.terms]
        return d


def _check_repeats(terms) -> None:
    """The same term twice (all but the weight equal) is one term with the summed weight: say so."""
    keys = [
        (t.knowledge, t.loss, t.layer_map, t.temperature, t.teacher, sorted(t.params.items())) for t in terms
    ]
    repeated = sorted({terms[i].name for i, key in enumerate(keys) if keys.count(key) > 1})
    if repeated:
        raise ValueError(
            f"terms repeat {repeated} with the same layer_map, temperature and parameters; merge them into one "
            "term (weights add up)"
        )


def is_number(value) -> bool:
    """A finite int or float (a YAML `true` is not a number here, nor is inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _lower_is_better(metric: str) -> bool:
    """llmkd's logged terms (`distill/...`, `loss_ce`) are divergences: lower is better; agreement is not."""
    name = metric.removeprefix("eval_")
    return name.startswith("distill/") or name.endswith("loss") or name == "loss_ce"


# TrainingArguments fields whose effect lives in the code path llmkd's trainers replace: fact -> fields.
TRAINING_ARGS_APPLY = {"label_smoothing_factor": "hard_labels"}
TRAINING_ARGS_REFUSED = {
    "label_names": (
        lambda v: v not in (None, ["labels"]),
        "llmkd reads gold labels from the 'labels' column only (the collator renames 'label'); rename your "
        "label column to 'label' or 'labels' and drop label_names",
    ),
    "parallelism_config": (
        lambda v: v is not None and (getattr(v, "cp_enabled", False) or getattr(v, "sp_enabled", False)),
        "context / sequence parallelism shards every sequence, but llmkd's terms, counts and teacher see whole "
        "sequences; use data parallelism (DDP, FSDP, DeepSpeed ZeRO)",
    ),
}


def check_settings(args, facts: dict[str, bool]) -> None:
    """Refuses every setting that would do nothing in this run (see the module docstring)."""
    defaults = {f.name: f for f in dataclasses.fields(type(args)) if f.init}
    problems = []
    for name, spec in defaults.items():
        fact = spec.metadata.get("applies") or TRAINING_ARGS_APPLY.get(name)
        if fact is None or facts.get(fact, True):
            continue
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        value = getattr(args, name)
        if value != default:
            problems.append(
                f"{name}={value!r} has no effect: {FACT_REASONS[fact]}; remove it (default {default!r})"
            )
    for name, (refused, fix) in TRAINING_ARGS_REFUSED.items():
        if refused(getattr(args, name, None)):
            problems.append(f"{name}={getattr(args, name)!r} is not supported: {fix}")
    if problems:
        raise ValueError("settings that would be silently ignored:\n  " + "\n  ".join(problems))
