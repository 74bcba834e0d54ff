"""The offline scheme (Gou et al. 2021, §4.1): a pre-trained, frozen teacher — live or from a logit cache."""

from __future__ import annotations

from llmkd.schemes.base import KDTrainer
from llmkd.schemes.config import DistillationConfig


class DistillationTrainer(KDTrainer):
    """Trains `model` (the student) on a weighted mix of distillation terms from a frozen `teacher` plus the task
    loss (`hard_label_weight`). `teacher` is a transformers model, or a teacher-cache folder / `CachedTeacher`
    (then the teacher is never loaded; logit terms only). See `KDTrainer` for the arguments and guarantees.

    Example::

        args = DistillationConfig(output_dir="out", temperature=2.0, hard_label_weight=0.5,
                                  terms=[{"knowledge": "logits", "loss": "forward_kl"}])
        DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=data,
                            processing_class=tokenizer, teacher_processing_class=teacher_tokenizer).train()
    """

    config_class = DistillationConfig
