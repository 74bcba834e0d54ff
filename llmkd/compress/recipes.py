"""The recipes `llmkd compress` runs, as plain recipe mappings (each is also written as YAML beside the run, so
`llmkd distill OUT/recipes/NAME.yaml` repeats it).

- teacher: fine-tunes a base encoder into the classifier teacher. Its length adapts to the data: about
  TEACHER_STEPS optimizer steps (2-10 epochs: a 2,700-row task gets 10 epochs where the demo's one-epoch recipe
  gave 85 steps and a teacher worse than a labels-only student), cut to the share of the budget it may take; it
  is evaluated on the search slice after every epoch and the best epoch is kept (load_best_model_at_end).
- search: a candidate's short distillation (soft targets + last-layer hidden-state cosine + the task loss, as the
  demo) at a constant learning rate after a fixed warm-up, so that a round resumes the previous round's checkpoint
  and a candidate's score after s steps is the same whether it was trained in one call or several.
- final: two runs on the winner. Features first (Jiao et al. 2020, TinyBERT: intermediate-layer distillation
  before prediction-layer distillation): hidden-state MSE on uniformly mapped layers + MiniLMv2's self-attention
  relations of the last layer (Wang et al. 2021), no labels; then soft targets (Hinton et al. 2015) + last-layer
  hidden cosine + the task loss with a linear decay.
- control: the same student folder (shape and initial weights), as many steps as both final runs together (one
  warm-up and linear decay over them), batch and learning rate, the task loss alone: what distillation adds.
"""

from __future__ import annotations

import math

TEACHER_STEPS = 1000  # optimizer steps the teacher's fine-tuning aims at, whatever the data size
TEACHER_EPOCHS = (2, 10)
FEATURE_SHARE = 0.25  # of the final steps, spent on the feature stage
WARMUP_SHARE = 0.06
SEARCH_WARMUP = 20  # steps of warm-up in every search run (round 0 is at least this long)
EVAL_BATCH = 128


def _data(data: dict, validation: str, max_length: int, seed: int, batch_size: int) -> dict:
    return {
        "train_file": data["files"]["train"],
        "validation_file": data["files"][validation],
        "text_columns": list(data["text_columns"]),
        "label_column": "label",
        "max_length": int(max_length),
        "per_device_train_batch_size": batch_size,
        "per_device_eval_batch_size": EVAL_BATCH,
        "report_to": "none",
        "seed": seed,
        "logging_steps": 25,
        "diagnostics": False,
    }


def steps_per_epoch(rows: int, batch_size: int) -> int:
    return max(1, math.ceil(rows / batch_size))


def teacher_recipe(config, data: dict, base: str, out: str, max_steps: int | None) -> dict:
    """Fine-tuning of `base` on the training rows, the best epoch on the search slice kept."""
    per_epoch = steps_per_epoch(data["rows"]["train"], config.batch_size)
    epochs = int(min(max(math.ceil(TEACHER_STEPS / per_epoch), TEACHER_EPOCHS[0]), TEACHER_EPOCHS[1]))
    if max_steps is not None:  # the budget's share: at least one epoch, so that one evaluation happens
        epochs = max(1, min(epochs, max_steps // per_epoch))
    recipe = _data(data, "search", data["max_length"], config.seed, config.batch_size)
    recipe.pop("diagnostics")
    return recipe | {
        "model": base,
        "class_names": [str(c) for c in data["classes"]],
        "output_dir": out,
        "num_train_epochs": epochs,
        "learning_rate": config.teacher_learning_rate,
        "warmup_steps": WARMUP_SHARE,
        "weight_decay": 0.01,
        "eval_strategy": "epoch",
        "save_strategy": "epoch",
        "save_total_limit": 1,
        "load_best_model_at_end": True,
        "metric_for_best_model": "accuracy",
    }


def _student(config, data: dict, teacher: str, student: str, out: str, validation: str) -> dict:
    recipe = _data(data, validation, data["max_length"], config.seed, config.batch_size)
    return recipe | {
        "teacher": teacher,
        "student": student,
        "output_dir": out,
        "learning_rate": config.learning_rate,
        "weight_decay": 0.01,
        "temperature": config.temperature,
        "eval_strategy": "no",
    }


SOFT_TARGETS = [
    {"knowledge": "logits", "loss": "forward_kl", "weight": 1.0},
    {"knowledge": "hidden", "loss": "cosine", "weight": 1.0, "layer_map": "last"},
]
FEATURES = [
    {"knowledge": "hidden", "loss": "mse", "weight": 1.0, "layer_map": "uniform"},
    {"knowledge": "attention_relation", "loss": "kl", "weight": 1.0, "layer_map": "last"},
]


def search_recipe(config, data, teacher: str, student: str, out: str, steps: int, warmup: int) -> dict:
    """`steps` steps of soft-target distillation, scored on the search slice; a checkpoint at the last step."""
    return _student(config, data, teacher, student, out, "search") | {
        "terms": SOFT_TARGETS,
        "hard_label_weight": 0.5,
        "max_steps": int(steps),
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": int(warmup),
        "save_strategy": "steps",
        "save_steps": int(steps),
        "save_total_limit": 1,
    }


def final_steps(total: int) -> tuple[int, int]:
    """(feature-stage steps, prediction-stage steps) of `total`."""
    features = max(1, round(FEATURE_SHARE * total)) if total >= 8 else 0
    return features, total - features


def _long_run(steps: int) -> dict:
    """A linear schedule with checkpoints about every fifth of the run (the unit of resume)."""
    return {
        "max_steps": int(steps),
        "warmup_steps": max(1, round(WARMUP_SHARE * steps)),
        "save_strategy": "steps",
        "save_steps": max(1, math.ceil(steps / 5)),
        "save_total_limit": 1,
    }


def _final_run(config, data, teacher, student, out, steps, scored_on: str, terms: list, hard: float) -> dict:
    recipe = _student(config, data, teacher, student, out, scored_on) | _long_run(steps)
    return recipe | {"terms": terms, "hard_label_weight": hard}


def feature_recipe(config, data, teacher: str, student: str, out: str, steps: int) -> dict:
    """Intermediate-layer knowledge only (no labels), scored on the search slice."""
    return _final_run(config, data, teacher, student, out, steps, "search", FEATURES, 0.0)


def prediction_recipe(config, data, teacher: str, student: str, out: str, steps: int) -> dict:
    """Soft targets + last-layer hidden cosine + half the task loss, scored on the validation rows."""
    return _final_run(config, data, teacher, student, out, steps, "validation", SOFT_TARGETS, 0.5)


def control_recipe(config, data, teacher: str, student: str, out: str, steps: int) -> dict:
    """The task loss alone (the teacher only lent its layers to the student's initial weights)."""
    return _final_run(config, data, teacher, student, out, steps, "validation", [], 1.0)
