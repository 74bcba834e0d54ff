"""Early-exit classifiers: one model with adjustable speed (FastBERT's adaptive inference).

Liu, Zhou, Wang, Zhao, Deng & Ju 2020, "FastBERT: a Self-distilling BERT with Adaptive Inference Time" (ACL,
arXiv 2004.02178): a sequence classifier gets a small classifier (an *exit*) on some intermediate layers; at
inference an example leaves at the first exit whose prediction is certain enough, so easy examples run fewer
layers. The exits are trained by `trainer: early_exit` (llmkd.schemes.early_exit) from the model's own final layer.

Files, beside a plain checkpoint that ``AutoModelForSequenceClassification.from_pretrained`` loads unchanged:

- ``llmkd_exits.safetensors``: the exit heads' weights (``"<layer>.bottleneck.weight"``, …);
- ``llmkd_exits.json``: exit layers, pooling, default threshold and the shapes they were trained for.

The decision rule (FastBERT §3.3, "uncertainty"): u = −Σ_c p_c log p_c / log C ∈ [0, 1], the entropy of the exit's
class probabilities normalised by its maximum; an example leaves at the first exit with u < threshold. So threshold
0 never leaves early (the full model's logits, exactly), and threshold ≥ 1 always leaves at the first exit.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save
from torch import nn

from llmkd.atomic import atomic_write, write_json
from llmkd.modeling import num_layers, text_config

Tensor = torch.Tensor

EXITS_WEIGHTS = "llmkd_exits.safetensors"
EXITS_CONFIG = "llmkd_exits.json"
FORMAT = "llmkd-exits/1"
# FastBERT's "speed" knob. At 0.1 a two-class exit must be ~98.8% sure (u(0.988) ≈ 0.1) before an example leaves:
# conservative; pick another point of `llmkd.evaluation.exits.exit_curve` for more speed.
DEFAULT_THRESHOLD = 0.1
POOLINGS = ("first", "last", "mean")


class ExitHead(nn.Module):
    """One exit: the pooled state x (B, H) of its layer -> (logits (B, C), feature (B, H)).

    feature = W_b·x + b_b (the bottleneck of Zhang et al. 2019, "Be Your Own Teacher", arXiv 1905.08094, through
    which the optional hint pulls the exit's features towards the final layer's; the identity at the start) and
    logits = W_c·tanh(W_d·feature + b_d) + b_c (the shape of BERT's pooler + classifier).
    """

    def __init__(self, width: int, num_labels: int, init_std: float = 0.02):
        super().__init__()
        self.bottleneck = nn.Linear(width, width)
        self.dense = nn.Linear(width, width)
        self.classifier = nn.Linear(width, num_labels)
        with torch.no_grad():
            self.bottleneck.weight.copy_(torch.eye(width))
            for layer in (self.dense, self.classifier):
                layer.weight.normal_(0.0, init_std)
            for layer in (self.bottleneck, self.dense, self.classifier):
                layer.bias.zero_()

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        feature = self.bottleneck(pooled)
        return self.classifier(torch.tanh(self.dense(feature))), feature


def make_exit_heads(width: int, num_labels: int, layers, init_std: float = 0.02) -> nn.ModuleDict:
    """One `ExitHead` per exit layer, keyed by the layer number as a string."""
    return nn.ModuleDict({str(layer): ExitHead(width, num_labels, init_std) for layer in layers})


def pool_states(hidden: Tensor, attention_mask: Tensor | None, pooling: str) -> Tensor:
    """(B, T, H) -> (B, H): the first token (encoders: [CLS]), each row's last real token (decoders, whose
    classifiers read their last token; found from the attention mask, so either padding side works), or the mean
    of the real tokens ("mean": sentence-embedding backbones, whose lower layers' [CLS] carries little)."""
    if pooling == "first":
        return hidden[:, 0]
    if pooling == "mean":
        if attention_mask is None:
            return hidden.mean(dim=1)
        weights = attention_mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    if attention_mask is None:
        return hidden[:, -1]
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    last = (attention_mask.to(hidden.device).bool() * positions).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def uncertainty(logits: Tensor) -> Tensor:
    """FastBERT's uncertainty, the normalised entropy u = −Σ_c p_c log p_c / log C; (B, C) -> (B,) in [0, 1].

    p = softmax(logits) in float32; 0·log 0 counts as 0 (`torch.special.entr`). Raises ValueError for C < 2.
    """
    classes = logits.shape[-1]
    if classes < 2:
        raise ValueError(f"uncertainty needs at least 2 classes, got logits of shape {tuple(logits.shape)}")
    return torch.special.entr(logits.float().softmax(-1)).sum(-1) / math.log(classes)


def check_threshold(threshold) -> float:
    ok = isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and math.isfinite(threshold)
    if not ok or threshold < 0:
        raise ValueError(
            f"threshold must be a finite number >= 0 (0: never exit early, >= 1: always at the first exit), "
            f"got {threshold!r}"
        )
    return float(threshold)


def save_exits(folder, heads: nn.ModuleDict, pooling: str, threshold: float = DEFAULT_THRESHOLD, model=None):
    """Writes llmkd_exits.safetensors and llmkd_exits.json into `folder` (beside the model's own files)."""
    first = next(iter(heads.values()))
    meta = {
        "format": FORMAT,
        "exit_layers": sorted(int(k) for k in heads),
        "pooling": pooling,
        "threshold": check_threshold(threshold),
        "hidden_size": first.bottleneck.in_features,
        "num_labels": first.classifier.out_features,
    }
    if model is not None:
        meta["num_hidden_layers"] = num_layers(model)
    state = {k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
    atomic_write(os.path.join(folder, EXITS_WEIGHTS), lambda handle: handle.write(save(state)), "wb")
    write_json(os.path.join(folder, EXITS_CONFIG), meta)


def load_exits(folder, model) -> tuple[nn.ModuleDict, dict]:
    """(heads, meta) from a folder written by `save_exits`, checked against `model` (the folder's classifier)."""
    path = os.path.join(folder, EXITS_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: {folder} has no early exits; train them with trainer: early_exit"
        )
    with open(path, encoding="utf-8") as handle:
        meta = json.load(handle)
    config = text_config(model)
    expected = {
        "format": FORMAT,
        "hidden_size": config.hidden_size,
        "num_labels": config.num_labels,
        "num_hidden_layers": config.num_hidden_layers,
    }
    wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if wrong or meta.get("pooling") not in POOLINGS:
        raise ValueError(
            f"{path} does not fit the model in {folder} ((found, expected): {wrong}, pooling "
            f"{meta.get('pooling')!r}); retrain the exits for this model"
        )
    heads = make_exit_heads(config.hidden_size, config.num_labels, meta["exit_layers"])
    heads.load_state_dict(load_file(os.path.join(folder, EXITS_WEIGHTS)))
    reference = next(model.parameters())
    return heads.to(device=reference.device, dtype=reference.dtype), meta


@dataclass
class EarlyExitOutput:
    """logits (B, C): each example's logits where it left; exit_layer (B,): the layer it left at (L: the end)."""

    logits: Tensor
    exit_layer: Tensor


class _AllExited(Exception):
    """Raised inside the forward once every example has left: the remaining layers never run."""


@dataclass
class _Batch:
    mask: Tensor | None
    logits: Tensor | None
    exit_layer: Tensor
    done: Tensor


class EarlyExitClassifier(nn.Module):
    """A sequence classifier with exits: `forward` stops at the first exit where every example has left.

    Hooks on the exit layers read each layer's output (the model's own ``hidden_states[l]``) while the model runs,
    so any family whose layers are one `nn.ModuleList` works (BERT-like encoders pool [CLS], decoder classifiers
    their last real token). Per example: it leaves at the first exit with uncertainty < threshold, else it gets
    the final logits. Batch 1 is the latency case; a batch runs until all its examples have left (each example's
    result is still its own first exit), so batching trades the per-example saving for throughput. Right-pad
    batches, as the model was trained.

    Example::

        model = EarlyExitClassifier.from_pretrained("runs/methods/early-exit", threshold=0.2)
        with torch.inference_mode():
            out = model(**tokenizer("a fine film", return_tensors="pt"))   # out.logits, out.exit_layer
    """

    def __init__(self, model: nn.Module, heads: nn.ModuleDict, pooling: str, threshold=DEFAULT_THRESHOLD):
        super().__init__()
        self.model, self.heads, self.pooling = model, heads, pooling
        self.threshold = check_threshold(threshold)
        self.num_layers = num_layers(model)
        self.exit_layers = sorted(int(k) for k in heads)
        if pooling not in POOLINGS or not all(0 < layer < self.num_layers for layer in self.exit_layers):
            raise ValueError(
                f"exit layers {self.exit_layers} must lie in 1..{self.num_layers - 1} and pooling in {POOLINGS}, "
                f"got pooling={pooling!r}"
            )
        from llmkd.students.from_teacher import find_layer_list  # its package imports the knowledge types

        try:
            _, layers = find_layer_list(model)
        except ValueError as err:
            raise ValueError(f"early exits read each layer's output, but: {err}") from None
        self._batch: _Batch | None = None
        for layer in self.exit_layers:
            layers[layer - 1].register_forward_hook(functools.partial(self._at_exit, layer))

    @classmethod
    def from_pretrained(cls, folder, threshold: float | None = None, **model_kwargs) -> EarlyExitClassifier:
        """The classifier in `folder` with its exits, in eval mode; `threshold` None: the folder's default."""
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(os.fspath(folder), **model_kwargs)
        heads, meta = load_exits(os.fspath(folder), model)
        chosen = meta["threshold"] if threshold is None else threshold
        return cls(model, heads, meta["pooling"], chosen).eval()

    def save_pretrained(self, folder) -> None:
        """The plain model and its exits, with the current threshold as the folder's default."""
        self.model.save_pretrained(folder)
        save_exits(folder, self.heads, self.pooling, self.threshold, self.model)

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **inputs) -> EarlyExitOutput:
        size = input_ids.shape[0]
        full = torch.full((size,), self.num_layers, dtype=torch.long, device=input_ids.device)
        done = torch.zeros(size, dtype=torch.bool, device=input_ids.device)
        # Threshold 0 never exits: the hooks stay idle and the result is the plain model's forward.
        self._batch = _Batch(attention_mask, None, full, done) if self.threshold > 0 else None
        batch = self._batch
        try:
            final = self.model(input_ids=input_ids, attention_mask=attention_mask, **inputs).logits
        except _AllExited:
            return EarlyExitOutput(batch.logits, batch.exit_layer)
        finally:
            self._batch = None
        if batch is None or batch.logits is None:
            return EarlyExitOutput(final, full)
        return EarlyExitOutput(torch.where(batch.done[:, None], batch.logits, final), batch.exit_layer)

    def _at_exit(self, layer: int, module, args, output):
        batch = self._batch
        if batch is None:
            return None
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        logits = self.heads[str(layer)](pool_states(hidden, batch.mask, self.pooling))[0]
        # u <= 1 always; >= 1 means "leave at the first exit" even for a uniform prediction (u == 1).
        certain = (uncertainty(logits) < self.threshold) | (self.threshold >= 1)
        leave = certain & ~batch.done
        if batch.logits is None:
            batch.logits = torch.zeros_like(logits)
        batch.logits[leave] = logits[leave]
        batch.exit_layer[leave] = layer
        batch.done |= leave
        if bool(batch.done.all()):
            raise _AllExited
        return None
