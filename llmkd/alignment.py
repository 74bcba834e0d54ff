"""Teacher–student alignment: task detection, layer maps, projectors, pooling and compatibility checks.

Everything here runs before training so that a mismatched pair fails with a message naming both values.
"""

from __future__ import annotations

import inspect
import logging
import os

import torch
from safetensors.torch import load_file, save
from torch import nn
from transformers import TrainerCallback

from llmkd.atomic import atomic_write
from llmkd.modeling import (  # noqa: F401 - re-exported while the trainer moves to llmkd.schemes
    CAUSAL_LM,
    SEQ_CLS,
    base_model,
    forward_keys,
    hidden_width,
    num_layers,
    output_head,
    output_rows,
    select_inputs,
    task_of,
    text_config,
)

logger = logging.getLogger(__name__)


def resolve_layer_map(layer_map, n_student: int, n_teacher: int, knowledge: str) -> list[tuple[int, int]]:
    """Student↔teacher index pairs. Hidden states have L+1 entries (0 = embeddings), attentions have L.

    'uniform' is TinyBERT's mapping g(m) = m·L_T/L_S, embeddings to embeddings; 'last' pairs the final layers.
    """
    offset = 0 if knowledge == "attention" else 1  # hidden_states carries the embedding output first
    top_s, top_t = n_student - 1 + offset, n_teacher - 1 + offset
    if layer_map == "last":
        return [(top_s, top_t)]
    if layer_map == "uniform":
        if knowledge == "attention":
            return [(j, round((j + 1) * n_teacher / n_student) - 1) for j in range(n_student)]
        return [(i, round(i * n_teacher / n_student)) for i in range(n_student + 1)]
    what = "attention maps" if knowledge == "attention" else "hidden_states (0 = embeddings)"
    for s, t in layer_map:
        for role, idx, top in (("student", s, top_s), ("teacher", t, top_t)):
            if not 0 <= idx <= top:
                raise ValueError(
                    f"{knowledge} layer_map pair [{s}, {t}]: {role} index {idx} is out of range; the {role} has "
                    f"{top + 1} {what}, valid indices 0..{top}"
                )
    return [tuple(p) for p in layer_map]


def build_projectors(terms, student: nn.Module, teacher: nn.Module) -> nn.ModuleDict:
    """A learnable linear map H_S → H_T per hidden term when widths differ (TinyBERT's W_h, shared by layers)."""
    h_s, h_t = hidden_width(student), hidden_width(teacher)
    projectors = nn.ModuleDict()
    if h_s != h_t:
        for i, term in enumerate(terms):
            if term.knowledge == "hidden":
                projectors[str(i)] = nn.Linear(h_s, h_t)
    return projectors


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """Sentence representation for relation terms: first token for encoders, mean of valid positions for decoders."""
    if not causal:
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def ensure_attention_weights(model: nn.Module, role: str) -> None:
    """Attention terms need the probabilities; sdpa/flash kernels silently return an empty tuple instead."""
    config = base_model(model).config
    current = getattr(config, "_attn_implementation", None)
    if current != "eager":
        logger.warning(
            "attention distillation: switching the %s from attn_implementation=%r to 'eager', the only "
            "implementation that returns attention weights (slower; load it with attn_implementation='eager' "
            "to silence this)",
            role,
            current,
        )
        base_model(model).set_attn_implementation("eager")


def check_heads(student: nn.Module, teacher: nn.Module) -> None:
    h_s = text_config(student).num_attention_heads
    h_t = text_config(teacher).num_attention_heads
    if h_s != h_t:
        raise ValueError(
            f"attention terms compare maps head by head, but the student has {h_s} heads and the teacher {h_t}; "
            "use a student with the teacher's head count, or distil hidden states instead"
        )


def check_labels(student: nn.Module, teacher: nn.Module) -> None:
    """Sequence classifiers must predict the same classes in the same order."""
    cs, ct = text_config(student), text_config(teacher)
    if cs.num_labels != ct.num_labels:
        raise ValueError(
            f"label mismatch: student num_labels={cs.num_labels}, teacher num_labels={ct.num_labels}; build the "
            f"student with num_labels={ct.num_labels} and the teacher's label2id"
        )
    default = {f"LABEL_{i}": i for i in range(ct.num_labels)}
    ls, lt = dict(cs.label2id or default), dict(ct.label2id or default)
    if ls != lt and default not in (ls, lt):
        raise ValueError(
            f"label mismatch: student label2id={ls}, teacher label2id={lt}; give the student the teacher's "
            "label2id/id2label so that logit k means the same class in both"
        )


def check_vocab(student: nn.Module, teacher: nn.Module, mismatch: str, shared: int | None) -> int | None:
    """Returns the number of logit rows to keep (None = all). Padded vocabularies are sliced only on opt-in."""
    v_s, v_t = output_rows(student), output_rows(teacher)
    if v_s == v_t and shared is None:
        return None
    if mismatch != "slice":
        raise ValueError(
            f"vocabulary mismatch: the student has {v_s} logit rows, the teacher {v_t}. If they share a tokenizer "
            "and only the lm_head padding differs, set vocab_mismatch=slice (optionally shared_vocab_size=N); "
            "otherwise the pair needs " + CROSS_TOKENIZER_HINT
        )
    size = shared if shared is not None else min(v_s, v_t)
    if not 0 < size <= min(v_s, v_t):
        raise ValueError(
            f"shared_vocab_size={size} must be in 1..{min(v_s, v_t)} (student {v_s}, teacher {v_t})"
        )
    return size


# Where a pair with different tokenizers should go instead (named by the mismatch errors).
CROSS_TOKENIZER_HINT = (
    "a cross-tokenizer loss (ULD, Boizard et al. 2024) for such pairs: `trainer: cross_tokenizer` in a recipe, or "
    "llmkd.cross_tokenizer.CrossTokenizerTrainer with a CrossTokenizerConfig (uld_weight, hard_label_weight) "
    "on data tokenised by both tokenizers (llmkd.cross_tokenizer.tokenize_pairs); see docs/cross_tokenizer.md"
)


def check_tokenizers(student_tok, teacher_tok) -> None:
    """Logit distillation compares token ids: both sides must map every token to the same id."""
    if student_tok is None or teacher_tok is None or student_tok is teacher_tok:
        return
    vs, vt = student_tok.get_vocab(), teacher_tok.get_vocab()
    if vs != vt:
        differing = sorted(k for k in set(vs) | set(vt) if vs.get(k) != vt.get(k))[:5]
        raise ValueError(
            f"tokenizer mismatch: student ({len(vs)} tokens) and teacher ({len(vt)} tokens) map tokens to "
            f"different ids, e.g. {differing}; use the teacher's tokenizer for the student, or "
            + CROSS_TOKENIZER_HINT
        )


# Heads that do more than h @ W.T + b (soft-capping, scaling): the fused path would compute other logits.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def fused_logits_apply(student: nn.Module, teacher: nn.Module, terms, args) -> bool:
    """Whether logit terms can be computed from hidden states and lm_head weights (llmkd.losses.kernels)."""
    if args.hard_label_weight > 0 or not terms or any(t.knowledge != "logits" for t in terms):
        return False  # the task loss and feature terms need the full outputs anyway
    for model in (student, teacher):
        if task_of(model) != CAUSAL_LM or output_head(model) is None:
            return False
        # A LoRA-adapted, fake-quantised or 4-bit head computes its logits from more than `.weight`.
        if type(output_head(model)) not in (nn.Linear, nn.Embedding):
            return False
        if any(getattr(text_config(model), k, None) not in (None, 1.0) for k in LOGIT_TRANSFORMS):
            return False
        if "logits_to_keep" not in inspect.signature(base_model(model).forward).parameters:
            return False
    return True


def check_not_shared(student: nn.Module, teacher: nn.Module) -> None:
    if student is teacher:
        raise ValueError("the teacher is the same object as the student; load or copy a separate teacher")
    student_params = {id(p) for p in student.parameters()}
    if any(id(p) in student_params for p in teacher.parameters()):
        raise ValueError("the teacher shares parameters with the student; give the teacher its own copy")


PROJECTORS_FILE = "llmkd_projectors.safetensors"


def save_projectors(projectors: nn.ModuleDict, folder: str) -> None:
    """Beside a checkpoint, never inside the student's weights (the output stays a plain checkpoint)."""
    state = {k: v.detach().cpu().contiguous() for k, v in projectors.state_dict().items()}
    atomic_write(os.path.join(folder, PROJECTORS_FILE), lambda handle: handle.write(save(state)), "wb")


def load_projectors(projectors: nn.ModuleDict, folder: str, device) -> None:
    path = os.path.join(folder, PROJECTORS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: this checkpoint has no projector weights to resume from")
    projectors.load_state_dict(load_file(path, device=str(device)))


class ZeroProjectorGrads(TrainerCallback):
    """Trainer zeroes only the student's gradients after a step; without this the projectors' would pile up."""

    def __init__(self, projectors: nn.ModuleDict):
        self.projectors = projectors

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.projectors.zero_grad(set_to_none=True)
