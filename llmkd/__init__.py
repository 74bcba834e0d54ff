"""llmkd: knowledge distillation for Hugging Face transformers (Gou et al., 2021 taxonomy)."""

from llmkd.config import DistillationConfig, Term
from llmkd.trainer import DistillationTrainer

__all__ = ["DistillationConfig", "DistillationTrainer", "Term"]
__version__ = "0.1.0"
