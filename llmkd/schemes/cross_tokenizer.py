"""Cross-tokenizer distillation: a causal-LM student with another tokenizer than its teacher, trained with ULD.

Boizard, El Haddad, Hudelot & Colombo 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit
Distillation Loss for LLMs", arXiv 2402.12030. Every example is tokenised by both tokenizers
(`llmkd.data.loading.tokenize_pairs`); the teacher source reads its own stream (``teacher_*`` columns), the
`cross_vocab` knowledge pairs the i-th targets of the two streams, and the student also learns its own tokens by
cross-entropy. Loss = uld_weight · ULD + hard_label_weight · CE, each normalised by its items of the window (ULD
by the aligned pairs; the paper averages per sequence, then over the batch: token weighting makes 1×8 and 4×2
give one update).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from llmkd.knowledge import LabelKnowledge, Term, label_term
from llmkd.knowledge.cross_vocab import CrossVocabKnowledge
from llmkd.modeling import CAUSAL_LM, output_rows, task_of
from llmkd.schemes.base import KDTrainer
from llmkd.schemes.config import DistillationConfig, _field
from llmkd.teachers import LiveTeacher

logger = logging.getLogger(__name__)

TEACHER_COLUMNS = ("teacher_input_ids", "teacher_attention_mask", "teacher_labels")


@dataclass
class CrossTokenizerConfig(DistillationConfig):
    """TrainingArguments for `CrossTokenizerTrainer`: loss = hard_label_weight · CE + uld_weight · ULD."""

    terms: list = field(
        default_factory=list,
        metadata={
            "help": "Must stay empty: ULD replaces the distillation terms (they need a shared vocabulary)."
        },
    )
    temperature: float = _field(
        1.0,
        "Softmax temperature T of both sides of ULD (> 0); 1.0 as in the paper; no T² factor.",
        "global_temperature",
    )
    hard_label_weight: float = _field(
        1.0, "Weight (>= 0) of the student's cross-entropy on its own completion tokens."
    )
    uld_weight: float = _field(
        1.0, "Weight λ (>= 0) of the ULD term (sorted-probability L1 between aligned positions)."
    )
    uld_chunk_size: int = _field(
        1024, "Aligned positions per checkpointed ULD chunk (> 0); sort memory ~ chunk x vocab.", "uld"
    )

    def __post_init__(self):
        if self.terms:  # before the base class parses them
            raise ValueError(
                f"terms={self.terms!r}: the cross-tokenizer trainer takes no distillation terms (they compare "
                "logits or positions of one tokenizer); remove terms and set uld_weight"
            )
        super().__post_init__()  # temperature, hard_label_weight, teacher_dtype, ...
        if not isinstance(self.uld_weight, (int, float)) or not 0 <= self.uld_weight < float("inf"):
            raise ValueError(f"uld_weight must be a finite number >= 0, got {self.uld_weight!r}")
        if not isinstance(self.uld_chunk_size, int) or self.uld_chunk_size <= 0:
            raise ValueError(f"uld_chunk_size must be a positive integer, got {self.uld_chunk_size!r}")

    def _check_something_to_train(self) -> None:
        if self.hard_label_weight == 0 and self.uld_weight == 0:
            raise ValueError("nothing to train on: hard_label_weight=0 and uld_weight=0; set uld_weight > 0")


class CrossTokenizerTrainer(KDTrainer):
    """Distils a causal-LM teacher into a causal-LM student with another tokenizer: CE + λ·ULD.

    Train data carries both token streams (`llmkd.data.loading.tokenize_pairs`); the default collator pads each
    stream with its own tokenizer's pad id. Vocabularies and tokenizers are meant to differ here: the teacher
    never reads the student's ids.
    """

    config_class = CrossTokenizerConfig

    def make_source(self, teacher):
        for role, model in (("student", getattr(self, "_student", None)), ("teacher", teacher)):
            if model is not None and task_of(model) != CAUSAL_LM:
                raise ValueError(
                    f"cross-tokenizer distillation (ULD) is for causal LMs, but the {role} is a {task_of(model)} "
                    "model; load both with AutoModelForCausalLM"
                )
        return LiveTeacher(teacher, input_prefix="teacher_")

    def __init__(self, model=None, teacher=None, args=None, *, teacher_processing_class=None, **kwargs):
        self._student = model
        super().__init__(model, teacher, args, teacher_processing_class=teacher_processing_class, **kwargs)
        logger.info(
            "ULD between a student of %d logit rows and a teacher of %d",
            output_rows(model),
            output_rows(teacher),
        )

    def build_terms(self, args) -> list:
        terms = []
        if args.uld_weight > 0:
            terms.append(
                CrossVocabKnowledge(Term("cross_vocab", "uld", float(args.uld_weight)), self.pair, 0)
            )
            terms[-1].name = "distill/uld"
        if args.hard_label_weight > 0:
            terms.append(LabelKnowledge(label_term(args.hard_label_weight), self.pair, len(terms)))
        return terms

    def scheme_columns(self) -> list[str]:
        return list(TEACHER_COLUMNS)

    def scheme_facts(self) -> dict[str, bool]:
        return {"uld": self.args.uld_weight > 0}
