"""Kept so that `from llmkd.models import student_from_teacher` (the README's first example) still works."""

from llmkd.students.from_teacher import describe, select_layers, student_from_config, student_from_teacher
from llmkd.students.loading import detect_task, load_model, resolve_path

__all__ = [
    "describe",
    "detect_task",
    "load_model",
    "resolve_path",
    "select_layers",
    "student_from_config",
    "student_from_teacher",
]
