"""The peers of mutual learning as one module, their predictions as a teacher source, and their checks and files.

A `MutualCohort` is the Trainer's model (one optimizer, DDP/accelerate and checkpoints see every peer); `PeerSource`
serves the peers' detached predictions on the batch the cohort just ran. Peers must do one task with one label set,
read one token stream and differ (`check_peers`, `check_distinct`; `reinit_heads` makes copies of one model
differ). Every peer is saved as a plain checkpoint in ``<folder>/peer-{k}`` and peer 0 also in ``<folder>``
(`save_peers`); `load_peers` restores them on resume. Used by llmkd.schemes.mutual (Zhang et al. 2018, arXiv
1706.00384).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file
from torch import nn
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, ModelOutput

from llmkd.modeling import SEQ_CLS, base_model, forward_keys, is_causal, output_rows, task_of, text_config
from llmkd.schemes.setup import check_labels
from llmkd.teachers import TeacherOutputs, TeacherSource


def peer_name(k: int) -> str:
    return f"peer{k}"


@dataclass
class CohortOutput(ModelOutput):
    """The cohort's forward: each peer's output; in evaluation also their logits stacked (peer axis before the
    classes: (B, K, C) or (B, T, K, V)), which is what prediction_step hands to compute_metrics."""

    logits: torch.Tensor | None = None
    peers: tuple | None = None


class MutualCohort(nn.Module):
    """The peers as one module: the Trainer's model, so the optimizer, DDP/accelerate and checkpoints see them all.

    Where llmkd needs one model (the task, the labels, the collator's pad id, `trainer.student`), the first peer
    stands for the cohort: `config` is its config and `get_base_model()` (read by llmkd.modeling.base_model, as
    for peft wrappers) returns it.
    """

    def __init__(self, peers):
        super().__init__()
        peers = list(peers)
        if len(peers) < 2 or not all(isinstance(p, nn.Module) for p in peers):
            raise ValueError(
                f"a cohort needs >= 2 peer models (nn.Module), got {[type(p).__name__ for p in peers]}"
            )
        self.peers = nn.ModuleList(peers)
        self.keys = [forward_keys(p) for p in peers]

    @property
    def config(self):
        return base_model(self.peers[0]).config

    def get_base_model(self) -> nn.Module:
        return self.peers[0]

    def forward(self, labels=None, **inputs) -> CohortOutput:
        # `labels` is declared so that the Trainer keeps the column; the task loss is one of llmkd's terms.
        outputs = []
        for peer, keys in zip(self.peers, self.keys):
            outputs.append(peer(**{k: v for k, v in inputs.items() if k in keys or k.startswith("output_")}))
        return CohortOutput(peers=tuple(outputs))

    def activation_checkpointing_enable(self, **kwargs) -> None:
        """`activation_checkpointing: true` (Trainer) checkpoints every peer."""
        for peer in self.peers:
            peer.activation_checkpointing_enable(**kwargs)


class PeerSource(TeacherSource):
    """The other peers as teachers: the predictions every peer made on the batch the cohort just ran (`observe`),
    detached, so a peer learns from the others' predictions and never trains them."""

    provides = frozenset({"logits"})
    trainable = shares_weights = True  # the teachers are the students being trained

    def __init__(self, cohort: MutualCohort):
        self.cohort = cohort
        self.task, self.config = task_of(cohort.peers[0]), base_model(cohort.peers[0]).config
        self._batch, self._logits = None, ()

    def check(self, pair) -> None:
        check_peers(list(self.cohort.peers), pair.student_tokenizer)

    def observe(self, batch: dict | None, peer_outputs) -> None:
        self._batch, self._logits = batch, tuple(self.prediction(o) for o in peer_outputs)

    @staticmethod
    def prediction(output) -> torch.Tensor:
        return output.logits.detach()

    def outputs(self, batch: dict, flags: dict) -> TeacherOutputs:
        if batch is not self._batch:
            raise RuntimeError("PeerSource.outputs: call observe(batch, peer outputs) with this batch first")
        members = {peer_name(k): TeacherOutputs(logits=z) for k, z in enumerate(self._logits)}
        return TeacherOutputs(members=members)


def as_cohort(model) -> MutualCohort:
    if isinstance(model, MutualCohort):
        return model
    if isinstance(model, (list, tuple)):
        return MutualCohort(model)
    raise ValueError(
        f"MutualTrainer needs its peers as model=[peer0, peer1, ...] (or a MutualCohort), got "
        f"{type(model).__name__}"
    )


# ---- the peers: checks, heads, files ---------------------------------------------------------------------------


def check_peers(peers: list, tokenizer) -> None:
    """Peers do one task with one label set and read one token stream; none shares parameters with another."""
    first, seen = peers[0], set()
    for k, peer in enumerate(peers):
        params = {id(p) for p in peer.parameters()}
        if params & seen:
            raise ValueError(
                f"peer {k} shares parameters with an earlier peer; give every peer its own model"
            )
        seen |= params
        if task_of(peer) != task_of(first):
            raise ValueError(f"peer {k} is a {task_of(peer)} model, peer 0 a {task_of(first)} model")
        config, rows = text_config(peer), output_rows(peer)
        if task_of(peer) == SEQ_CLS:
            try:
                check_labels(config, text_config(first))
            except ValueError as err:
                raise ValueError(f"peer {k} vs peer 0: {err}") from None
        if config.pad_token_id != text_config(first).pad_token_id:
            raise ValueError(
                f"peer {k} has pad_token_id={config.pad_token_id}, peer 0 {text_config(first).pad_token_id}: "
                "batches are padded with one id; give every peer the tokenizer's pad id"
            )
        if config.pad_token_id is None and task_of(peer) == SEQ_CLS and is_causal(peer):
            raise ValueError(f"peer {k} is a decoder classifier without config.pad_token_id; set it")
        if rows != output_rows(first):
            raise ValueError(f"peer {k} has {rows} logit rows, peer 0 {output_rows(first)}: they must match")
        embeddings = base_model(peer).get_input_embeddings()
        if tokenizer is not None and embeddings is not None and len(tokenizer) > embeddings.weight.shape[0]:
            raise ValueError(
                f"peer {k}'s embedding has {embeddings.weight.shape[0]} rows, the tokenizer {len(tokenizer)} "
                "tokens: every peer reads the tokenizer's ids"
            )


def check_distinct(peers: list) -> None:
    """Identical peers get identical gradients and stay identical: the mutual term would teach nothing."""
    states = [p.state_dict() for p in peers]
    for k, state in enumerate(states):
        for j in range(k):
            same = state.keys() == states[j].keys() and all(
                torch.equal(v, states[j][n]) for n, v in state.items()
            )
            if same:
                raise ValueError(
                    f"peers {j} and {k} have identical weights: they would get identical gradients and stay "
                    "alike, so the mutual term teaches nothing; set peer_heads='reinit' (classifiers), or build "
                    "the peers from different seeds (student_config) or layers"
                )


def reinit_heads(peers: list, seed: int) -> None:
    """Each peer's classification head drawn anew: N(0, initializer_range²) Linear weights from seed + k, zero
    biases (transformers' init for BERT- and Llama-style heads), on the CPU so every device and rank agrees."""
    for k, peer in enumerate(peers):
        base = base_model(peer)
        head = next(
            (m for n in ("classifier", "score") if isinstance(m := getattr(base, n, None), nn.Module)), None
        )
        if task_of(peer) != SEQ_CLS or head is None:
            raise ValueError(
                f"peer_heads='reinit' re-draws a sequence classifier's head (`classifier` / `score`), which peer "
                f"{k} ({type(base).__name__}) has not; use peer_heads='keep' with peers built from different "
                "seeds or layers"
            )
        std = float(getattr(text_config(peer), "initializer_range", 0.02))
        generator = torch.Generator().manual_seed(seed + k)
        with torch.no_grad():
            for module in head.modules():
                if isinstance(module, nn.Linear):
                    drawn = torch.empty(module.weight.shape).normal_(0.0, std, generator=generator)
                    module.weight.copy_(drawn)
                    if module.bias is not None:
                        module.bias.zero_()


def peer_folder(folder: str, k: int) -> str:
    return os.path.join(folder, f"peer-{k}")


def save_peers(cohort: MutualCohort, folder: str, tokenizer) -> None:
    """output_dir/peer-{k}: each peer with the tokenizer; `folder` itself: peer 0 (the main metrics' peer)."""
    for k, peer in enumerate(cohort.peers):
        for target in [folder, peer_folder(folder, k)] if k == 0 else [peer_folder(folder, k)]:
            peer.save_pretrained(target)
            if tokenizer is not None:
                tokenizer.save_pretrained(target)


def load_peers(cohort: MutualCohort, folder: str) -> None:
    """Every peer's weights from `folder`/peer-{k}; keys missing only because they are tied to a loaded one."""
    for k, peer in enumerate(cohort.peers):
        state = read_weights(peer_folder(folder, k))
        result = peer.load_state_dict(state, strict=False)
        own = peer.state_dict()
        loaded = {own[key].data_ptr() for key in state if key in own}
        missing = [key for key in result.missing_keys if own[key].data_ptr() not in loaded]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{peer_folder(folder, k)} does not fit peer {k}: missing {missing[:5]}, unexpected "
                f"{result.unexpected_keys[:5]}; resume with the peers this checkpoint was written from"
            )


def read_weights(folder: str) -> dict:
    index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, SAFE_WEIGHTS_NAME)):
        files = [SAFE_WEIGHTS_NAME]
    else:
        raise FileNotFoundError(
            f"{folder} has no {SAFE_WEIGHTS_NAME}: the checkpoint lacks this peer's weights; resume from a "
            "checkpoint written by MutualTrainer with the same num_peers"
        )
    state = {}
    for name in files:
        state |= load_file(os.path.join(folder, name))
    return state


def mean_prediction(others: list, temperature: float) -> TeacherOutputs:
    """p̄ = mean_l softmax(z_l / T) as logits T · log p̄, which a loss at temperature T turns back into p̄."""
    log_p = torch.stack([torch.log_softmax(o.logits.float() / temperature, dim=-1) for o in others])
    return TeacherOutputs(logits=temperature * (torch.logsumexp(log_p, dim=0) - math.log(len(others))))
