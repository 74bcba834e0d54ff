"""Cross-modal distillation: a classifier teacher on one input (a transcript) teaches a classifier student on
another (the spoken sentence), through paired examples.

Gou et al. 2021 §5.3; Gupta, Hoffman & Malik 2016, "Cross Modal Distillation for Supervision Transfer", arXiv
1507.00448. Every example carries both inputs (`llmkd.data.paired.encode_pairs`): the student reads its own
columns, the teacher its ``teacher_*`` columns through its own processor (`LiveTeacher(input_prefix="teacher_")`),
and `llmkd.data.collate` pads each stream with its own masks. What can cross modalities is what does not compare
positions: soft targets on the shared label space (``logits``), pooled representations through a learnt
projector (``pooled``), the teacher's token states stretched over the student's frames (``aligned``: inputs that
unfold in the same order, such as speech and its transcript) and relations between the examples of a batch
(``relation``: RKD, SP, PKT; ``graph``: IRG, on each side's pooled vectors). The student needs no labels of its own (hard_label_weight 0): the teacher's soft targets
are its supervision. The same scheme pairs two text classifiers with different tokenizers, or text and images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from llmkd.modeling import SEQ_CLS, main_input, task_of
from llmkd.schemes.base import KDTrainer
from llmkd.schemes.config import DistillationConfig, _field
from llmkd.teachers import LiveTeacher

logger = logging.getLogger(__name__)
# Knowledge that compares one value per example, so it holds whatever each side's positions are.
CROSS_MODAL_KNOWLEDGE = ("logits", "pooled", "aligned", "relation", "graph")


@dataclass
class CrossModalConfig(DistillationConfig):
    """TrainingArguments for `CrossModalTrainer`: loss = Σ weight · term (logits, pooled) + hard_label_weight · CE."""

    terms: list = _field(
        [{"knowledge": "logits", "loss": "forward_kl", "weight": 1.0}],
        "Distillation terms, each {knowledge: logits|pooled|aligned|relation|graph, loss, weight, layer_map (last or "
        "[[s, t]]), temperature}; per-position knowledge (hidden, attention, ...) cannot cross modalities.",
    )
    hard_label_weight: float = _field(
        0.0,
        "Weight (>= 0) of the cross-entropy on the student's own gold labels; 0 (the default): the student "
        "learns from the teacher alone and its data needs no labels.",
    )

    def __post_init__(self):
        super().__post_init__()  # parses the terms
        wrong = [t.knowledge for t in self.terms if t.knowledge not in CROSS_MODAL_KNOWLEDGE]
        if wrong:
            raise ValueError(
                f"terms of knowledge {wrong} compare positions, which differ between the student's and the "
                f"teacher's inputs; use {' or '.join(CROSS_MODAL_KNOWLEDGE)} terms"
            )


class CrossModalTrainer(KDTrainer):
    """Distils a classifier teacher into a classifier student that reads other inputs of the same examples.

    Train data: `llmkd.data.paired.encode_pairs` (the student's inputs, the teacher's under ``teacher_``, and
    labels when hard_label_weight > 0 or for evaluation). Both models must be classifiers of the same classes
    (text, audio or image; checked against label2id). The default collator pads each stream itself.
    """

    config_class = CrossModalConfig

    def make_source(self, teacher):
        if isinstance(teacher, LiveTeacher):  # it will read the teacher_ columns, whatever it was built for
            teacher = teacher.model
        if teacher is None or not hasattr(teacher, "forward"):
            raise ValueError(
                "cross-modal distillation needs a teacher model (teacher=), which reads its own inputs; "
                "caches and ensembles are keyed by the student's inputs"
            )
        student = getattr(self, "_student", None)
        for role, model in (("student", student), ("teacher", teacher)):
            if model is not None and task_of(model) != SEQ_CLS:
                raise ValueError(
                    f"cross-modal distillation is for classifiers, but the {role} is a {task_of(model)} model; "
                    "for causal LMs with different tokenizers use trainer: cross_tokenizer"
                )
        return LiveTeacher(teacher, input_prefix="teacher_")

    def __init__(self, model=None, teacher=None, args=None, *, teacher_processing_class=None, **kwargs):
        self._student = model
        if model is not None:
            main_input(model)  # a model without a known input column is refused here
            if getattr(model.config, "feat_extract_norm", None) == "group":
                logger.warning(
                    "%s normalises its first convolution over the whole padded clip (feat_extract_norm='group'): "
                    "a clip's values depend on the batch it is padded in; build the student with "
                    "feat_extract_norm='layer' (and do_stable_layer_norm=True) for batch-independent values",
                    type(model).__name__,
                )
        super().__init__(model, teacher, args, teacher_processing_class=teacher_processing_class, **kwargs)
