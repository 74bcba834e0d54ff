"""What llmkd reads off a transformers model: its task, its text config, its output head and forward inputs.

The bottom layer of the package: everything else may import it, it imports nothing of llmkd.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

CAUSAL_LM, SEQ_CLS = "causal_lm", "sequence_classification"


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP/accelerate/peft wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def task_of(model: nn.Module) -> str:
    """CAUSAL_LM or SEQ_CLS from the model class; a ValueError names the Auto class to load it with."""
    name = type(base_model(model)).__name__
    if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return CAUSAL_LM
    if name in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values():
        return SEQ_CLS
    raise ValueError(
        f"{name} is neither a causal LM nor a sequence classifier; load it with AutoModelForCausalLM or "
        "AutoModelForSequenceClassification"
    )


def text_config(model: nn.Module):
    config = base_model(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers(model: nn.Module) -> int:
    return int(text_config(model).num_hidden_layers)


def hidden_width(model: nn.Module) -> int:
    return int(text_config(model).hidden_size)


def output_head(model: nn.Module) -> nn.Module | None:
    return base_model(model).get_output_embeddings()


def output_rows(model: nn.Module) -> int:
    """Rows of the output head (the logit width), else the config's vocab_size."""
    head = output_head(model)
    return int(head.weight.shape[0]) if head is not None else int(text_config(model).vocab_size)


def forward_keys(model: nn.Module) -> set[str]:
    """The keyword inputs a model's forward takes (labels excluded: llmkd computes the task loss itself)."""
    params = inspect.signature(base_model(model).forward).parameters
    return {k for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"labels"}


def select_inputs(inputs: dict, keys: set[str]) -> dict:
    return {k: v for k, v in inputs.items() if k in keys}


@torch.no_grad()
def is_causal(model: nn.Module) -> bool:
    """Whether the first position's last hidden state ignores the tokens after it (a decoder), measured on one
    tiny forward: two 3-token inputs that differ only in their last token, one at a time (a classifier without a pad
    id refuses batches). Decoder *classifiers* are causal too, which the task alone cannot tell. Encoder-decoder
    models are not: their encoder reads every token."""
    if is_encoder_decoder(model):
        return False
    base = base_model(model)
    vocab = int(text_config(model).vocab_size)
    device = next(base.parameters()).device
    was_training = base.training
    base.eval()
    try:
        firsts = []
        for last in (3, 4):
            ids = torch.tensor([[1, 2, last]], device=device) % vocab
            out = base(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
            firsts.append(out.hidden_states[-1][0, 0])
    finally:
        base.train(was_training)
    return bool(torch.allclose(firsts[0], firsts[1]))


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(base_model(model).config, "is_encoder_decoder", False))
