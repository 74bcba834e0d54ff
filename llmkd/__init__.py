"""llmkd: knowledge distillation for Hugging Face transformers (Gou et al., 2021 taxonomy).

Layout (docs/architecture.md): ``losses`` (how far apart), ``knowledge`` (what is compared), ``teachers`` (where
teacher outputs come from), ``schemes`` (how training is organised), ``students``, ``data``, ``evaluation``,
``cli``.
"""

__version__ = "0.1.0"

# name -> module: imported on first use, so that `import llmkd.losses` does not pay for transformers' Trainer.
_EXPORTS = {
    "DistillationConfig": "llmkd.schemes.config",
    "DistillationTrainer": "llmkd.schemes.offline",
    "OnPolicyConfig": "llmkd.schemes.on_policy",
    "OnPolicyTrainer": "llmkd.schemes.on_policy",
    "CrossTokenizerConfig": "llmkd.schemes.cross_tokenizer",
    "CrossTokenizerTrainer": "llmkd.schemes.cross_tokenizer",
    "MutualConfig": "llmkd.schemes.mutual",
    "MutualTrainer": "llmkd.schemes.mutual",
    "EarlyExitConfig": "llmkd.schemes.early_exit",
    "EarlyExitTrainer": "llmkd.schemes.early_exit",
    "EarlyExitClassifier": "llmkd.students.exits",
    "Term": "llmkd.knowledge.base",
    "CachedTeacher": "llmkd.teachers.cached.reader",
    "EnsembleTeacher": "llmkd.teachers.ensemble",
    "MeanTeacher": "llmkd.teachers.ema",
    "student_from_teacher": "llmkd.students.from_teacher",
    "FinetuneTrainer": "llmkd.publish.trainer",
    "write_model_card": "llmkd.publish.card",
    "last_complete_checkpoint": "llmkd.publish.checkpoints",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llmkd' has no attribute {name!r}")
