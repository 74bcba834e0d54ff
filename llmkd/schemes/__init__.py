"""Schemes (the extension point "how is training organised"), listed in `SCHEMES`: name -> (trainer, config).

Every scheme is a `transformers.Trainer` subclass of `KDTrainer` (counting, the weighted mix, metrics, auxiliary
modules) with its own config dataclass. A recipe's ``trainer:`` key picks one. To add a scheme: a module with the
two classes and one entry here.
"""

from __future__ import annotations

from llmkd.schemes.base import KDTrainer
from llmkd.schemes.config import DistillationConfig
from llmkd.schemes.cross_modal import CrossModalConfig, CrossModalTrainer
from llmkd.schemes.cross_tokenizer import CrossTokenizerConfig, CrossTokenizerTrainer
from llmkd.schemes.early_exit import EarlyExitConfig, EarlyExitTrainer
from llmkd.schemes.mutual import MutualConfig, MutualTrainer
from llmkd.schemes.offline import DistillationTrainer
from llmkd.schemes.on_policy import OnPolicyConfig, OnPolicyTrainer

SCHEMES: dict[str, tuple[type[KDTrainer], type[DistillationConfig]]] = {
    "distill": (DistillationTrainer, DistillationConfig),
    "on_policy": (OnPolicyTrainer, OnPolicyConfig),
    "cross_tokenizer": (CrossTokenizerTrainer, CrossTokenizerConfig),
    "cross_modal": (CrossModalTrainer, CrossModalConfig),
    "early_exit": (EarlyExitTrainer, EarlyExitConfig),
    "mutual": (MutualTrainer, MutualConfig),
}


def scheme(name: str) -> tuple[type[KDTrainer], type[DistillationConfig]]:
    """(trainer class, config class) for a recipe's ``trainer:`` key; a ValueError lists the choices."""
    if name not in SCHEMES:
        raise ValueError(f"trainer={name!r}: choose one of {sorted(SCHEMES)}")
    return SCHEMES[name]


__all__ = [
    "SCHEMES",
    "CrossModalConfig",
    "CrossModalTrainer",
    "CrossTokenizerConfig",
    "CrossTokenizerTrainer",
    "DistillationConfig",
    "DistillationTrainer",
    "EarlyExitConfig",
    "EarlyExitTrainer",
    "KDTrainer",
    "MutualConfig",
    "MutualTrainer",
    "OnPolicyConfig",
    "OnPolicyTrainer",
    "scheme",
]
