"""Students: from the teacher's layers or config (`from_teacher`), loaded (`loading`), LoRA/QLoRA (`lora`) and
quantisation-aware (`quantize`)."""

from llmkd.students.from_teacher import describe, select_layers, student_from_config, student_from_teacher

__all__ = ["describe", "select_layers", "student_from_config", "student_from_teacher"]
