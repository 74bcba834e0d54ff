"""llmkd: knowledge distillation for Hugging Face transformers (Gou et al., 2021 taxonomy)."""

__all__ = ["DistillationConfig", "DistillationTrainer", "Term"]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so that `llmkd.data` or `llmkd.losses` do not pay for importing transformers' Trainer.
    if name in ("DistillationConfig", "Term"):
        from llmkd import config

        return getattr(config, name)
    if name == "DistillationTrainer":
        from llmkd.trainer import DistillationTrainer

        return DistillationTrainer
    raise AttributeError(f"module 'llmkd' has no attribute {name!r}")
