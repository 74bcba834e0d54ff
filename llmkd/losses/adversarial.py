"""Adversarial losses: a discriminator D tells teacher outputs ("real") from student outputs ("fake").

D maps one item's features to a logit a; D(x) = σ(a) is its probability that x came from the teacher. Written
with softplus(x) = log(1 + eˣ), so −log σ(a) = softplus(−a) and −log(1 − σ(a)) = softplus(a) stay finite for any
logit (no log of a probability rounded to 0). Inputs are D's logits per item, any shape (..., one per example or
per token); outputs have that shape, in float32 (float64 for float64 inputs); the trainer does the reduction.

Goodfellow et al. 2014, "Generative Adversarial Nets", arXiv 1406.2661 (§3: the non-saturating generator loss);
applied to distillation by Xu, Hsu & Huang 2018, "Training Shallow and Thin Networks for Acceleration via
Knowledge Distillation with Conditional Adversarial Networks", ICLR workshop, arXiv 1709.00513 (D on logits);
Belagiannis, Farshad & Galasso 2018, "Adversarial Network Compression", ECCV workshops, arXiv 1803.10750 (D on
features); Wang, Zhang, Sun & Qi 2018, "KDGAN: Knowledge Distillation with Generative Adversarial Networks",
NeurIPS 2018 (D on class distributions).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llmkd.losses.common import upcast

Tensor = torch.Tensor

WHATS = ("logits", "pooled")


def _same_shape(real_logits: Tensor, fake_logits: Tensor) -> tuple[Tensor, Tensor]:
    if real_logits.shape != fake_logits.shape:
        raise ValueError(
            f"discriminator logits for teacher and student items must have one shape, got "
            f"{tuple(real_logits.shape)} and {tuple(fake_logits.shape)}; give D the same items from both sides"
        )
    return upcast(real_logits, fake_logits)


def discriminator_bce(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator loss L_D = −[log D(t) + log(1 − D(s))] per item: binary cross-entropy, teacher = 1.

    = softplus(−a_t) + softplus(a_s) with a_t = D's logit on the teacher's item, a_s on the student's (the
    student's features detached: L_D trains D only). Shapes (...) and (...) -> (...), in nats; 2·log 2 for a
    D that cannot tell (a = 0). Raises ValueError if the shapes differ. Goodfellow et al. 2014, arXiv 1406.2661.
    """
    real_logits, fake_logits = _same_shape(real_logits, fake_logits)
    return F.softplus(-real_logits) + F.softplus(fake_logits)


def nonsaturating_generator(fake_logits: Tensor) -> Tensor:
    """The student's (generator's) term L_adv = −log D(s) = softplus(−a_s) per item, in nats.

    The non-saturating form (Goodfellow et al. 2014, §3): its gradient stays large while D rejects the student,
    where log(1 − D(s)) would vanish. Only the student learns from it: D's parameters must be detached in a_s.
    Shape (...) -> (...).
    """
    (fake_logits,) = upcast(fake_logits)
    return F.softplus(-fake_logits)


def discriminator_accuracy(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Per item, the fraction of D's two calls that are right: (1[a_t > 0] + 1[a_s < 0]) / 2, in [0, 1].

    0.5 is chance. Shapes (...) and (...) -> (...); no gradient. Raises ValueError if the shapes differ.
    """
    real_logits, fake_logits = _same_shape(real_logits.detach(), fake_logits.detach())
    return ((real_logits > 0).to(real_logits.dtype) + (fake_logits < 0).to(real_logits.dtype)) / 2


def check_game(
    what: str, discriminator_width: int, discriminator_lr: float, temperature: float = 1.0
) -> None:
    """The discriminator's settings, checked when a term is parsed (ValueError naming the value and the fix)."""
    if what not in WHATS:
        raise ValueError(f"what must be one of {WHATS} (what D compares), got {what!r}")
    if (
        not isinstance(discriminator_width, int)
        or isinstance(discriminator_width, bool)
        or discriminator_width < 1
    ):
        raise ValueError(
            f"discriminator_width must be a positive integer (D's hidden units), got {discriminator_width!r}"
        )
    finite = isinstance(discriminator_lr, (int, float)) and not isinstance(discriminator_lr, bool)
    if not (finite and math.isfinite(discriminator_lr) and discriminator_lr > 0):
        raise ValueError(
            f"discriminator_lr must be a finite number > 0 (D's Adam step size), got {discriminator_lr!r}"
        )
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def nonsaturating_gan(
    fake_logits: Tensor,
    *,
    temperature: float = 1.0,
    what: str = "logits",
    discriminator_width: int = 64,
    discriminator_lr: float = 2e-4,
) -> Tensor:
    """The registry entry of the ``adversarial`` knowledge: the student's term `nonsaturating_generator`.

    Its keywords set up the game, not the formula: what D compares (``logits``: softmax(z / temperature);
    ``pooled``: a layer's first-token hidden state), D's hidden width and its Adam learning rate. They are
    checked here so that a bad value fails when the term is parsed (the registry's dry run). (...) -> (...).
    """
    check_game(what, discriminator_width, discriminator_lr, temperature)
    return nonsaturating_generator(fake_logits)


ADVERSARIAL_LOSSES = {"nonsaturating": nonsaturating_gan}
