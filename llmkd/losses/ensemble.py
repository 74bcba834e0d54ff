"""Several teachers' logits combined into one target (multi-teacher distillation): weights, then the mixture.

Every mode mixes the teachers' probabilities at the run's temperature T and returns logits

    z = T · log Σ_i w_i · softmax(z_i / T),        w_i ≥ 0,  Σ_i w_i = 1  (per example, or per position),

so that softmax(z / T) is exactly the mixture Σ_i w_i p_i (z / T is normalised already: its logsumexp is 0). A
logit loss at temperature T then compares the student with the mixture; at another temperature it would compare
it with something else, which is why the ensemble source combines at one temperature and refuses logit terms of
several. Raw-logit losses (MSE on logits) have no meaning for a mixture: the raw logits are not kept.

Weights per mode, for n teachers (`COMBINATIONS`):

- ``mean``: w_i = 1/n, the average of the teachers' soft targets (Hinton, Vinyals & Dean 2015, "Distilling the
  Knowledge in a Neural Network", arXiv 1503.02531, §2 and §4 distil an ensemble this way; You, Xu, Xu & Tao
  2017, "Learning from Multiple Teacher Networks", KDD 2017, average the teachers' softened outputs);
- ``weights``: fixed w_i = a_i / Σ_j a_j from the user's non-negative a_i;
- ``confidence``: per example, w_i ∝ max_c softmax(z_i)_c, each teacher's own (T = 1) top probability. A
  label-free form of confidence weighting; Zhang, Chen & Wang 2022 ("Confidence-Aware Multi-Teacher Knowledge
  Distillation", ICASSP 2022, arXiv 2201.00007) measure confidence with the gold labels instead;
- ``entropy``: per example, w = softmax(−H) over the teachers, H_i = −Σ_c p_ic log p_ic (nats) of p_i =
  softmax(z_i): the surer teacher weighs more (after Kwon et al. 2020, "Adaptive Knowledge Distillation Based on
  Entropy", ICASSP 2020);
- ``random``: one teacher per optimizer step, w = one-hot, drawn with probability ∝ a_i (uniform by default)
  from (seed, step) alone, so every process and every resumed run draws the same teacher for the same step
  (Fukuda et al. 2017, "Efficient Knowledge Distillation from an Ensemble of Teachers", Interspeech 2017, pick
  one teacher per mini-batch at random);
- ``route``: per example, w = one-hot of the teacher a data column names (e.g. one teacher per language or
  domain, as in Tan et al. 2019, "Multilingual Neural Machine Translation with Knowledge Distillation", ICLR
  2019, arXiv 1902.10461).

Confidence and entropy read each teacher at T = 1 (its own prediction), so the weights do not move with the
distillation temperature; they are computed without gradient (the teachers are frozen). Shapes: logits
(n, ..., C) — classifiers (n, B, C), causal LMs (n, B, T, V); weights (n,) or (n, ...) over the leading dims.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

Tensor = torch.Tensor

COMBINATIONS = ("mean", "weights", "confidence", "entropy", "random", "route")


def mixture_logits(teacher_logits: Tensor, weights: Tensor, temperature: float) -> Tensor:
    """z = T · log Σ_i w_i softmax(z_i / T): (n, ..., C) logits and (n,) or (n, ...) weights -> (..., C) float32.

    Raises ValueError for T ≤ 0, negative or non-finite weights, or weights that do not sum to 1 over the
    teachers (dim 0). A zero weight drops its teacher exactly (log 0 = -inf inside the logsumexp)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = teacher_logits.shape[0]
    weights = weights.to(device=teacher_logits.device, dtype=torch.float64)
    if weights.shape[0] != n or weights.dim() >= teacher_logits.dim():
        raise ValueError(
            f"weights of shape {tuple(weights.shape)} do not fit {n} teachers' logits {tuple(teacher_logits.shape)}"
        )
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(f"teacher weights must be finite and >= 0, got {weights.tolist()}")
    if not torch.allclose(weights.sum(0), torch.ones((), dtype=weights.dtype), atol=1e-5):
        raise ValueError("teacher weights must sum to 1 over the teachers (dim 0); normalise them")
    dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
    log_p = (teacher_logits.to(dtype) / temperature).log_softmax(-1)
    log_w = weights.log().to(dtype)
    log_w = log_w.view(*log_w.shape, *[1] * (teacher_logits.dim() - log_w.dim()))
    return temperature * torch.logsumexp(log_p + log_w, dim=0)


def fixed_weights(values: Sequence[float]) -> Tensor:
    """(n,) w_i = a_i / Σ a_j; ValueError unless every a_i is a finite number >= 0 and one is > 0."""
    ok = all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        for v in values
    )
    if not values or not ok or not sum(values) > 0:
        raise ValueError(f"teacher weights must be finite numbers >= 0, not all 0; got {list(values)}")
    weights = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return weights / weights.sum()


@torch.no_grad()
def confidence_weights(teacher_logits: Tensor) -> Tensor:
    """(n, ..., C) -> (n, ...): w_i ∝ max_c softmax(z_i)_c, normalised over the teachers."""
    top = teacher_logits.double().softmax(-1).amax(-1)
    return top / top.sum(0, keepdim=True)


@torch.no_grad()
def entropy_weights(teacher_logits: Tensor) -> Tensor:
    """(n, ..., C) -> (n, ...): softmax over the teachers of −H_i, H_i the entropy of softmax(z_i) in nats."""
    log_p = teacher_logits.double().log_softmax(-1)
    entropy = -(log_p.exp() * log_p).nan_to_num(0.0).sum(-1)  # 0 · (-inf) at masked entries counts as 0
    return (-entropy).softmax(0)


def one_hot_weights(index: Tensor, n: int) -> Tensor:
    """(...) teacher indices -> (n, ...) one-hot weights; ValueError for an index outside 0..n-1."""
    index = index.long()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
        raise ValueError(
            f"teacher indices must be in 0..{n - 1}, got {sorted(set(index.flatten().tolist()))}"
        )
    return torch.nn.functional.one_hot(index, n).movedim(-1, 0).double()


def random_teacher(seed: int, step: int, probabilities: Sequence[float]) -> int:
    """The teacher of optimizer step `step`: index i with probability probabilities[i], from (seed, step) alone.

    A SHA-256 of "seed:step" gives a uniform number in [0, 1): no random-number generator's state is read or
    consumed, so every process, and a run resumed at `step`, draws the same teacher."""
    weights = fixed_weights(probabilities)
    digest = hashlib.sha256(f"{int(seed)}:{int(step)}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    cumulative = weights.cumsum(0).tolist()
    return next((i for i, c in enumerate(cumulative) if u < c and weights[i] > 0), len(cumulative) - 1)


def combination_weights(
    teacher_logits: Tensor,
    mode: str,
    *,
    weights: Sequence[float] | None = None,
    route: Tensor | None = None,
    draw: int | None = None,
) -> Tensor:
    """The weights of `mode` (see the module docstring): (n,) for mean/weights/random, (n, ...) otherwise.

    `weights`: a_i for ``weights`` (and the draw probabilities of ``random``); `route`: (B,) teacher indices for
    ``route``; `draw`: the teacher ``random`` drew for this step (None: its expectation, the weighted mean)."""
    n = teacher_logits.shape[0]
    if mode not in COMBINATIONS:
        raise ValueError(f"unknown teacher combination {mode!r}; choose one of {', '.join(COMBINATIONS)}")
    if mode == "confidence":
        return confidence_weights(teacher_logits)
    if mode == "entropy":
        return entropy_weights(teacher_logits)
    if mode == "route":
        if route is None:
            raise ValueError("teacher combination 'route' needs each example's teacher index (route)")
        return one_hot_weights(route, n)
    if mode == "random" and draw is not None:
        return one_hot_weights(torch.tensor(draw), n)
    return fixed_weights(weights if weights is not None and mode != "mean" else [1.0] * n)


def combine_teachers(teacher_logits: Tensor, mode: str, temperature: float, **kwargs) -> Tensor:
    """(n, ..., C) teachers' logits -> (..., C) logits of their mixture at T (`combination_weights` kwargs)."""
    return mixture_logits(teacher_logits, combination_weights(teacher_logits, mode, **kwargs), temperature)
