"""Self-distillation, deep → shallow: a sequence classifier's final layer teaches exits on its own layers.

Liu et al. 2020, "FastBERT: a Self-distilling BERT with Adaptive Inference Time" (ACL, arXiv 2004.02178); Zhang et
al. 2019, "Be Your Own Teacher" (ICCV, arXiv 1905.08094). There is no teacher model: the source below provides
nothing, and the `exits` knowledge (llmkd.knowledge.exits) reads the student's own final logits and states. With
``freeze_backbone`` (FastBERT's self-distillation stage, the default for a fine-tuned model) only the exit heads
train: the backbone runs in eval mode (no dropout: the exits learn the model's real predictions, as at inference)
and builds no autograd graph, so steps are cheap. Without it, the backbone trains too (Be Your Own Teacher), with
the task loss on the final logits (hard_label_weight) if wanted.

Saving writes the plain model (``AutoModelForSequenceClassification.from_pretrained`` loads it unchanged) plus
``llmkd_exits.safetensors`` / ``llmkd_exits.json``; `llmkd.students.exits.EarlyExitClassifier` runs it with
adjustable speed, `llmkd.evaluation.exits.exit_curve` measures accuracy and CPU latency per threshold.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from llmkd.knowledge import LabelKnowledge, Term, label_term
from llmkd.knowledge.adapters import AUX
from llmkd.knowledge.exits import ExitKnowledge
from llmkd.losses import LOSSES
from llmkd.modeling import SEQ_CLS, base_model, task_of
from llmkd.schemes.base import KDTrainer
from llmkd.schemes.config import DistillationConfig, _field, is_number
from llmkd.students.exits import save_exits
from llmkd.teachers import TeacherOutputs, TeacherSource

WEIGHTS = ("exit_kd_weight", "exit_hint_weight", "exit_label_weight")


@dataclass
class EarlyExitConfig(DistillationConfig):
    """TrainingArguments for `EarlyExitTrainer`: which layers get exits and what they learn."""

    terms: list = field(
        default_factory=list,
        metadata={"help": "Must stay empty: the exit terms come from exit_kd_weight, exit_hint_weight and "
                  "exit_label_weight."},
    )  # fmt: skip
    hard_label_weight: float = _field(
        0.0,
        "Weight (>= 0) of the task loss on the FINAL layer's logits; needs freeze_backbone: false (a frozen "
        "model's own head cannot learn).",
    )
    exit_layers: list | str = _field(
        "all",
        "Layers that get an exit, each l in 1..L-1 reading hidden_states[l] (the output of layer l), e.g. [1, 2, "
        "3]; 'all': every layer below the last (FastBERT).",
    )
    exit_loss: str = _field(
        "forward_kl",
        "How an exit's probabilities are pulled to the final layer's (any logits loss of llmkd.losses): forward_kl "
        "= KL(p_final || p_exit) x T^2 (Hinton); reverse_kl = FastBERT's KL(p_exit || p_final).",
    )
    exit_kd_weight: float = _field(
        1.0, "Weight (>= 0) of the exits' distillation from the final layer (summed over the exits)."
    )
    exit_hint_weight: float = _field(
        0.0,
        "Weight (>= 0) of the hint: MSE between each exit's bottleneck feature and the final layer's pooled "
        "state (Be Your Own Teacher).",
    )
    exit_label_weight: float = _field(
        0.0, "Weight (>= 0) of each exit's cross-entropy on the gold labels (Be Your Own Teacher)."
    )
    exit_pooling: str = _field(
        "auto",
        "What each exit reads of its layer: auto (what the model's own classifier reads: an encoder's first token "
        "[CLS], a decoder's last real token) or mean (the mean of the real tokens: better for sentence-embedding "
        "backbones such as all-MiniLM-L6-v2, whose lower layers' [CLS] carries little).",
    )
    freeze_backbone: bool = _field(
        True,
        "Train only the exits (FastBERT, for a fine-tuned model): the model's own parameters get "
        "requires_grad=False (in place) and it runs without dropout. false: the backbone trains too.",
    )

    def __post_init__(self):
        if self.terms:  # before the base class parses them
            raise ValueError(
                f"terms={self.terms!r}: trainer early_exit builds its terms from exit_kd_weight, exit_hint_weight "
                "and exit_label_weight; remove terms"
            )
        _check_exit_settings(self)
        super().__post_init__()
        if self.freeze_backbone and self.hard_label_weight > 0:
            raise ValueError(
                f"hard_label_weight={self.hard_label_weight} trains the final layer, which freeze_backbone: true "
                "keeps fixed; set hard_label_weight: 0 (or exit_label_weight for the exits) or freeze_backbone: false"
            )
        for name, default in (("teacher_dtype", "auto"), ("teacher_placement", "auto")):
            if getattr(self, name) != default:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} has no effect: trainer early_exit has no teacher model (the "
                    f"model teaches its own exits); remove it (default {default!r})"
                )

    def _check_something_to_train(self) -> None:
        if self.exit_kd_weight == 0 and self.exit_label_weight == 0:
            raise ValueError(
                "the exit classifiers learn nothing: exit_kd_weight=0 and exit_label_weight=0; set exit_kd_weight "
                "> 0 (distil the final layer) or exit_label_weight > 0 (gold labels)"
            )


def _check_exit_settings(args) -> None:
    for name in WEIGHTS:
        if not is_number(getattr(args, name)) or getattr(args, name) < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {getattr(args, name)!r}")
    layers = args.exit_layers
    if layers != "all":
        numbers = isinstance(layers, (list, tuple)) and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in layers
        )
        if not numbers or not layers or len(set(layers)) != len(layers):
            raise ValueError(
                f"exit_layers={layers!r}: use 'all' or a list of distinct layer numbers >= 1, e.g. [1, 2, 3]"
            )
        args.exit_layers = sorted(layers)
    if args.exit_loss not in LOSSES["logits"]:
        raise ValueError(f"exit_loss={args.exit_loss!r}: choose one of {sorted(LOSSES['logits'])}")
    if args.exit_pooling not in ("auto", "mean"):
        raise ValueError(f"exit_pooling must be auto or mean, got {args.exit_pooling!r}")
    if not isinstance(args.freeze_backbone, bool):
        raise ValueError(f"freeze_backbone must be true or false, got {args.freeze_backbone!r}")


class OwnFinalLayer(TeacherSource):
    """The teacher of self-distillation to exits: the model's own final layer. It provides nothing (the exit terms
    read the student's outputs), so training runs no teacher forward and evaluation computes no agreement."""

    shares_weights = True

    def __init__(self, model):
        self.task = task_of(model)
        if self.task != SEQ_CLS:
            raise ValueError(
                f"early exits are for sequence classifiers, but the model is a {self.task} model; load one with "
                "AutoModelForSequenceClassification"
            )
        self.config = base_model(model).config

    def check(self, pair) -> None:
        if pair.regression:
            raise ValueError(
                "num_labels=1 (regression): an exit decides by the entropy of its class probabilities; early exits "
                "need a classifier with num_labels >= 2"
            )

    def outputs(self, batch: dict, flags: dict) -> TeacherOutputs:
        return TeacherOutputs()


class EarlyExitTrainer(KDTrainer):
    """Trains classifier exits on `model`'s intermediate layers from its own final layer; there is no teacher.

    Example::

        args = EarlyExitConfig(output_dir="out", exit_layers=[1, 2, 3], learning_rate=1e-3)
        EarlyExitTrainer(model=classifier, args=args, train_dataset=data, processing_class=tokenizer).train()
        # out/: the plain classifier + llmkd_exits.*; EarlyExitClassifier.from_pretrained("out", threshold=0.2)

    `teacher` must be None or `model` itself (a recipe's pipeline passes the model as both). Evaluation logs each
    exit's accuracy and its agreement with the final layer (``eval_exit<l>_accuracy``, ``eval_exit<l>_agreement``).
    """

    config_class = EarlyExitConfig

    def __init__(self, model=None, teacher=None, args=None, **kwargs):
        self._own_model = model
        columns = getattr(kwargs.get("train_dataset"), "column_names", None)
        label_weight = getattr(args, "exit_label_weight", 0)
        if label_weight and columns is not None and not {"label", "labels"} & set(columns):
            raise ValueError(
                f"exit_label_weight={label_weight} needs a 'label' column, but the training data has only "
                f"{columns}; add labels or set exit_label_weight: 0"
            )
        super().__init__(model, teacher, args, **kwargs)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(
                "trainer early_exit runs on one process or DDP: its exits are small, and FSDP / DeepSpeed would "
                "shard a frozen backbone for nothing; launch without an FSDP or DeepSpeed config"
            )
        self.exit_owner = self.terms[0]
        if self.args.freeze_backbone:  # the optimizer (built at train time) then holds the exits only
            for name, parameter in model.named_parameters():
                if AUX not in name.split("."):
                    parameter.requires_grad_(False)

    def make_source(self, teacher):
        if teacher is not None and teacher is not self._own_model:
            raise ValueError(
                "trainer early_exit: the model teaches its own exits, so it takes no other teacher; remove "
                "teacher= (in a recipe, teacher must name the student itself)"
            )
        return OwnFinalLayer(self._own_model)

    def build_terms(self, args) -> list:
        parts = [(args.exit_loss, args.exit_kd_weight), ("hint", args.exit_hint_weight)]
        terms = []
        for loss, weight in [*parts, ("ce", args.exit_label_weight)]:
            if weight > 0:
                terms.append(ExitKnowledge(Term("exits", loss, float(weight)), self.pair, len(terms)))
        for term in terms:  # one set of heads, owned by the first exit term
            term.owner = terms[0].owner
        if args.hard_label_weight > 0:
            terms.append(LabelKnowledge(label_term(args.hard_label_weight), self.pair, len(terms)))
        return terms

    def scheme_facts(self) -> dict[str, bool]:
        args = self.args
        distils = args.exit_kd_weight > 0 and LOSSES["logits"][args.exit_loss].takes_temperature
        return {
            "global_temperature": distils,
            "hard_labels": args.hard_label_weight + args.exit_label_weight > 0,
        }

    def forward_flags(self, training: bool) -> dict:
        return super().forward_flags(training) | {"output_hidden_states": True}  # the exits read them

    def _student_forward(self, model, inputs, training):
        self.exit_owner.mask = inputs.get("attention_mask")  # decoder exits pool each row's last real token
        try:
            return super()._student_forward(model, inputs, training)
        finally:
            self.exit_owner.mask = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        frozen = model.training and self.args.freeze_backbone
        with self._backbone_in_eval_mode() if frozen else contextlib.nullcontext():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    @contextlib.contextmanager
    def _backbone_in_eval_mode(self):
        """A frozen backbone runs without dropout: the exits learn the outputs it gives at inference. The root
        module keeps its training flag (compute_loss reads it to tell training from evaluation)."""
        backbone = [module for name, module in self.student.named_children() if name != AUX]
        for module in backbone:
            module.train(False)
        try:
            yield
        finally:
            for module in backbone:
                module.train(True)

    def _eval_columns(self, columns, student_out, teacher_out, inputs, local) -> None:
        columns.update(self.exit_owner.metric_columns(student_out, inputs))
        super()._eval_columns(columns, student_out, teacher_out, inputs, local)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:  # beside the plain model: from_pretrained ignores them
            heads = self.aux[self.exit_owner.owner]
            save_exits(output_dir or self.args.output_dir, heads, self.exit_owner.pooling, model=self.student)
