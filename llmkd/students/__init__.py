"""Students: from the teacher's layers or config (`from_teacher`), loaded (`loading`), LoRA/QLoRA (`lora`) and
quantisation-aware (`quantize`), pruned by teacher importance (`pruning`, `importance`)."""

from llmkd.students.from_teacher import describe, select_layers, student_from_config, student_from_teacher
from llmkd.students.importance import calibration_batches, importance_scores
from llmkd.students.pruning import candidate_shapes, prune_encoder

__all__ = [
    "calibration_batches",
    "candidate_shapes",
    "describe",
    "importance_scores",
    "prune_encoder",
    "select_layers",
    "student_from_config",
    "student_from_teacher",
]
