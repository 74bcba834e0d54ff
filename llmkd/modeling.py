"""What llmkd reads off a transformers model: its task, its text config, its output head and forward inputs.

The bottom layer of the package: everything else may import it, it imports nothing of llmkd.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

CAUSAL_LM, SEQ_CLS = "causal_lm", "sequence_classification"
# One label per example, whatever the modality: text, audio and image classifiers share the classifier task.
CLASSIFIER_MAPPINGS = (
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
)
# The main input of each modality, in the order a batch is searched for its size (llmkd.knowledge.counts).
INPUT_COLUMNS = ("input_ids", "input_values", "input_features", "pixel_values")


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
    if any(name in mapping.values() for mapping in CLASSIFIER_MAPPINGS):
        return SEQ_CLS
    raise ValueError(
        f"{name} is neither a causal LM nor a classifier; load it with AutoModelForCausalLM, "
        "AutoModelForSequenceClassification, AutoModelForAudioClassification or AutoModelForImageClassification"
    )


def modality(model: nn.Module) -> str:
    """ "audio", "image" or "text": what the model reads (from its class: audio and image classifiers; else text)."""
    name = type(base_model(model)).__name__
    if name in MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES.values():
        return "audio"
    return "image" if name in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.values() else "text"


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
    if head is not None:
        return int(head.weight.shape[0])
    config = text_config(model)
    if modality(model) != "text":  # audio, image classifiers: their classes
        return int(config.num_labels)  # (a speech model's vocab_size is its CTC head's, unused here)
    return int(config.vocab_size)


def forward_keys(model: nn.Module) -> set[str]:
    """The keyword inputs a model's forward takes (labels excluded: llmkd computes the task loss itself)."""
    params = inspect.signature(base_model(model).forward).parameters
    return {k for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"labels"}


def select_inputs(inputs: dict, keys: set[str]) -> dict:
    return {k: v for k, v in inputs.items() if k in keys}


def main_input(model: nn.Module) -> str:
    """The forward input that carries an example (input_ids, input_values, input_features or pixel_values)."""
    keys = forward_keys(model)
    found = [k for k in INPUT_COLUMNS if k in keys]
    if not found:
        raise ValueError(f"{type(base_model(model)).__name__}'s forward takes none of {INPUT_COLUMNS}")
    return found[0]


def position_mask(
    model: nn.Module, attention_mask: torch.Tensor | None, states: torch.Tensor
) -> torch.Tensor:
    """(B, T) bool: which positions of the model's (B, T, H) hidden `states` hold real input.

    Text models: the attention mask itself. Speech models whose convolutional front end shortens the input
    (wav2vec 2.0, HuBERT, WavLM, …): the mask of the frames, from the model's own length arithmetic
    (``_get_feature_vector_attention_mask``). No mask (images, unpadded batches): every position.
    Raises ValueError when the mask's length matches neither the states nor a known front end."""
    batch, length = states.shape[:2]
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=states.device)
    if attention_mask.shape[-1] == length:
        return attention_mask.bool()
    base = base_model(model)
    frames = getattr(base, "_get_feature_vector_attention_mask", None)
    if frames is None:
        raise ValueError(
            f"{type(base).__name__}: the attention mask has {attention_mask.shape[-1]} positions but the hidden "
            f"states {length}, and the model has no rule that maps one onto the other"
        )
    return frames(length, attention_mask).bool()


@torch.no_grad()
def is_causal(model: nn.Module) -> bool:
    """Whether the first position's last hidden state ignores the tokens after it (a decoder), measured on one
    tiny forward: two 3-token inputs that differ only in their last token, one at a time (a classifier without a pad
    id refuses batches). Decoder *classifiers* are causal too, which the task alone cannot tell. Encoder-decoder
    models are not: their encoder reads every token."""
    if is_encoder_decoder(model) or "input_ids" not in forward_keys(model):
        return False  # audio and image encoders read their whole input
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
    """Whether the model returns encoder and decoder states apart (an audio classifier of an encoder-decoder
    family, such as WhisperForAudioClassification, runs the encoder only)."""
    if modality(model) == "audio":
        return False
    return bool(getattr(base_model(model).config, "is_encoder_decoder", False))
