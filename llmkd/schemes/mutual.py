"""Deep mutual learning (online distillation): K peer students and no pre-trained teacher; each learns from the others.

Zhang, Xiang, Hospedales & Lu 2018, "Deep Mutual Learning", CVPR 2018, arXiv 1706.00384. Peer k minimises

    L_k = hard_label_weight · CE(y, p_k) + Σ_terms weight · s · 1/(K − 1) · Σ_{l≠k} KL(p_l ‖ p_k)

(the paper's loss for K peers, the default `mutual_target: pairwise`; s = T² at temperature T, and the paper's T
is 1), the other peers' predictions p_l being constants (detached). `mutual_target: mean` is the paper's other
form, one KL from the mean of the others' probabilities: KL(p̄ ‖ p_k), p̄ = 1/(K − 1) · Σ_{l≠k} p_l (its DML_e;
with 2 peers both are the same, so it is refused there).

How it runs (the base trainer keeps the counting, the reduction, metrics and checkpoints):
- the peers live in one `MutualCohort` (llmkd.schemes.cohort), the Trainer's model: one optimizer holds every
  peer, DDP/accelerate wraps and syncs them all, and a step is one cohort forward and one backward of Σ_k L_k.
  L_k reaches peer k's weights only through p_k, so each peer gets exactly its own DML gradient. The paper's
  Algorithm 1 updates the peers in turn, re-predicting after each update; here they update together from the
  same predictions (one forward per step). Gradient clipping (`max_grad_norm`) clips all peers' gradients
  together, as one model.
- `PeerSource` is the teacher source: the peers' detached predictions on the batch the cohort just ran. Each
  term is copied per peer (`PeerTerm`: logged as ``peer{k}/<term>``) and averages over the other peers; the
  weighted, window-normalised sum is the base's `mix_terms`, called once per peer. Terms are logit terms: peers
  exchange predictions. Logs keep loss = Σ_k Σ_terms weight · term. (Summed over the peers, forward and reverse
  KL give the same total, Σ_k Σ_{l≠k} KL(p_l ‖ p_k) being symmetric; each peer's value and gradient differ.)
- evaluation: compute_metrics runs once per peer (``eval_peer{k}_accuracy``); the unprefixed metrics
  (``eval_accuracy``) are peer 0's; ``eval_loss`` is Σ_k L_k.
- saving: ``output_dir/peer-{k}`` is each peer as a plain checkpoint with the tokenizer (`from_pretrained` loads
  it), and ``output_dir`` itself holds peer 0, the peer whose metrics are the main ones, so that `llmkd eval
  output_dir` scores what ``eval_accuracy`` reported. Checkpoints have the same layout; resume loads every peer.
- diversity: identical peers get identical gradients and stay identical (the mutual term is then 0), so they
  are refused. Peers copied from one model (a teacher's layers, one checkpoint) get `peer_heads: reinit`: peer
  k's classification head is re-drawn from seed + k; `llmkd distill` builds peer k from `student_config` with
  seed + k (llmkd.cli.mutual).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, ProcessorMixin
from transformers.trainer_utils import EvalPrediction, align_special_tokens

from llmkd.knowledge import TermValues
from llmkd.losses.bucketed import RAW_LOGIT_LOSSES
from llmkd.modeling import base_model
from llmkd.publish.checkpoints import save_training_args
from llmkd.schemes.base import KDTrainer
from llmkd.schemes.cohort import (
    CohortOutput,
    PeerSource,
    as_cohort,
    check_distinct,
    load_peers,
    mean_prediction,
    peer_name,
    reinit_heads,
    save_peers,
)
from llmkd.schemes.config import DistillationConfig, _field

logger = logging.getLogger(__name__)

TARGETS = ("pairwise", "mean")
PEER_HEADS = ("keep", "reinit")
TEACHER_FIELDS = ("teacher_dtype", "teacher_placement", "vocab_mismatch", "shared_vocab_size")
PEER_TERM = re.compile(r"peer\d+/")


@dataclass
class MutualConfig(DistillationConfig):
    """TrainingArguments for `MutualTrainer`: the peers' terms, how many peers, and how they learn from each other."""

    terms: list = _field(
        [{"knowledge": "logits", "loss": "forward_kl", "weight": 1.0}],
        "Mutual terms, logit terms only: {knowledge: logits, loss: forward_kl (DML's KL(p_l ‖ p_k)), weight: w}; "
        "each peer's term averages over the other peers (mutual_target). weight is the mutual term's weight.",
    )
    temperature: float = _field(
        1.0, "Softmax temperature T (> 0) of the mutual terms, × T²; DML uses 1.", "global_temperature"
    )
    hard_label_weight: float = _field(
        1.0, "Weight (>= 0) of each peer's cross-entropy on gold labels (DML: 1)."
    )
    num_peers: int = _field(
        2, "Number K >= 2 of peers; with model=[...] it must equal the number of models given."
    )
    mutual_target: str = _field(
        "pairwise",
        "pairwise: 1/(K-1) Σ_{l≠k} KL(p_l ‖ p_k), the paper's loss; mean: KL(p̄ ‖ p_k) from the mean p̄ of the "
        "others' probabilities (DML_e; needs K >= 3, for 2 peers it is pairwise).",
    )
    peer_heads: str = _field(
        "keep",
        "keep: the peers as given (they must differ); reinit: re-draw each classifier peer's head (`classifier` / "
        "`score`) from seed + k, N(0, initializer_range²) weights and zero biases, so that peers copied from one "
        "model differ.",
    )

    def __post_init__(self):
        best_direction_given = self.greater_is_better is not None
        super().__post_init__()
        k = self.num_peers
        if not isinstance(k, int) or isinstance(k, bool) or k < 2:
            raise ValueError(f"num_peers must be an integer >= 2, got {k!r}; mutual learning needs peers")
        for name, choices in (("mutual_target", TARGETS), ("peer_heads", PEER_HEADS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.mutual_target == "mean" and k == 2:
            raise ValueError(
                "mutual_target='mean' has no effect with num_peers=2: the mean of the other peers is the other "
                "peer; remove it (default 'pairwise') or use num_peers >= 3"
            )
        self._check_teacher_fields()
        self._check_terms()
        if not best_direction_given and PEER_TERM.match(
            (self.metric_for_best_model or "").removeprefix("eval_")
        ):
            self.greater_is_better = False  # a peer's term is a divergence or a loss

    def _check_teacher_fields(self) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(DistillationConfig)}
        for name in TEACHER_FIELDS:
            if getattr(self, name) != defaults[name]:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} has no effect: mutual learning has no teacher model (the "
                    f"peers teach each other); remove it (default {defaults[name]!r})"
                )

    def _check_terms(self) -> None:
        for i, term in enumerate(self.terms):
            if term.knowledge != "logits":
                raise ValueError(
                    f"terms[{i}]: {term.knowledge} terms are not supported by mutual learning: peers exchange "
                    "their predictions (DML); use {knowledge: logits, loss: forward_kl}"
                )
            if term.teacher is not None:
                raise ValueError(f"terms[{i}]: teacher={term.teacher!r}: every term reads the other peers")
            if self.mutual_target == "mean" and term.loss in RAW_LOGIT_LOSSES:
                raise ValueError(
                    f"terms[{i}]: mutual_target='mean' averages probabilities, but {term.loss!r} compares raw "
                    "logits; use a probability loss (forward_kl, reverse_kl, jsd, ...) or mutual_target='pairwise'"
                )
        if not self.terms:
            logger.warning("terms: [] — no mutual term: the peers train independently on their labels")


class PeerTerm:
    """Peer k's copy of a term (logged as peer{k}/<name>); a term that reads the teacher side averages over the
    other peers: their mean value (pairwise) or its value on their mean distribution (mean)."""

    def __init__(self, inner, peer: int, target: str):
        self.inner, self.peer, self.target = inner, peer, target
        self.name = f"{peer_name(peer)}/{inner.name}"

    def __getattr__(self, name):  # needs, counts, index, term, adapter, temperature_value, …: the term's own
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def values(self, student_out, teacher_out, batch, adapted) -> TermValues:
        if not self.inner.needs:  # the task loss: this peer and the gold labels only
            return self.inner.values(student_out, teacher_out, batch, adapted)
        others = [out for name, out in teacher_out.members.items() if name != peer_name(self.peer)]
        if self.target == "mean":
            mean = mean_prediction(others, self.inner.temperature_value)
            return self.inner.values(student_out, mean, batch, adapted)
        parts = [self.inner.values(student_out, other, batch, adapted) for other in others]
        return TermValues(sum(p.values for p in parts) / len(parts), parts[0].mask, parts[0].count)


class MutualTrainer(KDTrainer):
    """Deep mutual learning: `model` is a list of K peers (or a `MutualCohort`), there is no teacher.

    Example::

        args = MutualConfig(output_dir="out", num_peers=2, peer_heads="reinit")
        MutualTrainer(model=[peer0, peer1], args=args, train_dataset=data, processing_class=tokenizer).train()

    The peers must do the same task with the same labels, read the same token ids and differ (see the module
    docstring). Refused before training: a teacher, num_peers other than the number of peers, FSDP/DeepSpeed,
    neftune_noise_alpha, preprocess_logits_for_metrics and batch_eval_metrics (compute_metrics runs per peer).
    The peers' configs get the tokenizer's special tokens (as Trainer does to its model) and, with
    peer_heads='reinit', new heads: the models given are changed in place. `predict()` returns every peer's
    logits stacked, the peer axis before the classes ((N, K, C), or (N, T, K, V) for causal LMs).
    """

    config_class = MutualConfig

    def __init__(self, model=None, teacher=None, args=None, *, teacher_processing_class=None, **kwargs):
        if not isinstance(args, MutualConfig):
            raise TypeError(f"args must be a MutualConfig, got {type(args).__name__}")
        self.cohort = as_cohort(model)
        self._prepare_peers(args, kwargs.get("processing_class"), teacher_processing_class)
        kwargs = self._per_peer_metrics(args, kwargs)
        super().__init__(self.cohort, teacher, args, **kwargs)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(
                "mutual learning saves and resumes its peers as plain checkpoints, which FSDP / DeepSpeed "
                "states are not; train with DDP (accelerate launch --multi_gpu) or one process"
            )
        metric = (self.args.metric_for_best_model or "").removeprefix("eval_")
        if PEER_TERM.match(metric) and metric not in {t.name for t in self.terms}:
            raise ValueError(
                f"metric_for_best_model={self.args.metric_for_best_model!r} is not logged by this run; its terms "
                f"are {sorted(t.name for t in self.terms)}, its metrics peer<k>_<compute_metrics key>"
            )

    def _prepare_peers(self, args, tokenizer, teacher_tokenizer) -> None:
        """Checks what only the peers' count and settings decide, then makes copies of one model differ."""
        if teacher_tokenizer is not None and teacher_tokenizer is not tokenizer:
            raise ValueError(
                "teacher_processing_class: mutual learning has no teacher; pass processing_class"
            )
        if len(self.cohort.peers) != args.num_peers:
            raise ValueError(
                f"num_peers={args.num_peers} but {len(self.cohort.peers)} peers were given; set "
                f"num_peers={len(self.cohort.peers)}"
            )
        if args.neftune_noise_alpha is not None:
            raise ValueError(
                "neftune_noise_alpha is not supported by mutual learning: it would noise peer 0 only"
            )
        if isinstance(tokenizer, (PreTrainedTokenizerBase, ProcessorMixin)):
            for peer in self.cohort.peers:  # what Trainer does to its model's config, done to every peer's
                align_special_tokens(base_model(peer), tokenizer)
        if args.peer_heads == "reinit":
            reinit_heads(list(self.cohort.peers), args.seed)
        check_distinct(list(self.cohort.peers))

    def _per_peer_metrics(self, args, kwargs: dict) -> dict:
        if kwargs.get("preprocess_logits_for_metrics") is not None:
            raise ValueError(
                "preprocess_logits_for_metrics is not supported by MutualTrainer: it would get every peer's "
                "logits stacked; compute_metrics is called once per peer on its own logits"
            )
        compute = kwargs.get("compute_metrics")
        if compute is not None and args.batch_eval_metrics:
            raise ValueError(
                "batch_eval_metrics: compute_metrics keeps state across batches and would mix the peers' "
                "predictions; set batch_eval_metrics=False"
            )
        if compute is not None:
            kwargs = kwargs | {"compute_metrics": per_peer_metrics(compute, args.num_peers)}
        return kwargs

    # ---- hooks ------------------------------------------------------------------------------------
    def make_source(self, teacher):
        if teacher is not None:
            raise ValueError(
                "mutual learning has no pre-trained teacher: the peers teach each other; remove teacher= (to "
                "build peers from a teacher's layers, use llmkd.students.student_from_teacher)"
            )
        return PeerSource(self.cohort)

    def build_terms(self, args) -> list:
        own = super().build_terms(args)  # one student's terms, the task loss included
        if args.mutual_target == "mean" and self.pair.regression:
            raise ValueError("mutual_target='mean' averages class probabilities; a regression score has none")
        self.peer_terms = [[PeerTerm(t, k, args.mutual_target) for t in own] for k in range(args.num_peers)]
        return [t for terms in self.peer_terms for t in terms]

    def scheme_columns(self) -> list[str]:
        return sorted(set().union(*self.cohort.keys))

    # ---- the loss ---------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training
        local = self.local_counts(inputs)
        window = self.window_counts(local, num_items_in_batch)
        keys = set(self.scheme_columns())
        peers = model(**{k: v for k, v in inputs.items() if k in keys}, **self.forward_flags(training)).peers
        self.source.observe(inputs, peers)
        others = self.source.outputs(inputs, {})
        columns = None if training else {}
        loss = sum(
            self.peer_loss(k, out, others, inputs, window, local, columns) for k, out in enumerate(peers)
        )
        self.source.observe(None, ())
        if not training:
            self._eval_columns(columns, peers[0], None, inputs, local)
        if not return_outputs:
            return loss
        return loss, CohortOutput(logits=torch.stack([o.logits for o in peers], dim=-2), peers=peers)

    def peer_loss(self, k, peer_out, others, inputs, window, local, columns) -> torch.Tensor:
        """L_k through the base's reduction: `mix_terms` sums `self.terms`, which are peer k's during the call."""
        every, self.terms = self.terms, self.peer_terms[k]
        try:
            return self.mix_terms(peer_out, others, {}, inputs, window, local, columns)
        finally:
            self.terms = every

    # ---- checkpoints: every peer a plain model --------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save_peers(self.accelerator.unwrap_model(self.model), output_dir, self.processing_class)
        save_training_args(self.args, output_dir)  # JSON, as every llmkd trainer (llmkd.publish.checkpoints)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        load_peers(model if model is not None else self.model, resume_from_checkpoint)
        self.source.load(resume_from_checkpoint, self)

    def _load_best_model(self):
        load_peers(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)

    @property
    def peers(self) -> list[nn.Module]:
        return list(self.cohort.peers)


def per_peer_metrics(compute, num_peers: int):
    """compute_metrics on each peer's logits: keys peer{k}_<name>, and peer 0's also unprefixed (the main ones)."""

    def metrics(prediction: EvalPrediction) -> dict:
        out = {}
        for k in range(num_peers):
            own = np.take(prediction.predictions, k, axis=-2)
            values = compute(EvalPrediction(own, prediction.label_ids, prediction.inputs, prediction.losses))
            out |= (dict(values) if k == 0 else {}) | {f"{peer_name(k)}_{n}": v for n, v in values.items()}
        return out

    return metrics
