"""Logit (response) losses against their authors' released code (DistilBERT, TRL GKD, DistiLLM, TinyBERT): each
function below re-implements, line by line and in float64, the code named in its docstring (never calling the
code under test). Each loss also has a value worked out by hand, and where a convention could be swapped, a
negative control that the swapped one would fail. The relation and feature losses are in
tests/test_losses_reference.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_losses_reference import close, randn
from torch import nn

from llmkd import losses
from llmkd.losses import LOSSES, masked_mean

# ------------------------------------------------------------------ logits (DistilBERT, TRL GKD, DistiLLM, TinyBERT)

# Student p_S = (¾, ¼), teacher p_T = (½, ½): the two-token example worked out by hand below.
HAND_S = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
HAND_T = torch.zeros(1, 2, dtype=torch.float64)


def logits_batch(seed: int):
    zs, zt = randn(2, 4, 9, seed=seed, scale=2.0), randn(2, 4, 9, seed=seed + 1, scale=2.0)
    labels = torch.tensor([[5, 2, -100, -100], [1, 7, 3, 8]])
    return zs, zt, labels


def ours(name, zs, zt, labels, temperature=1.0, **params):
    """What the trainer computes: (T² if soft target) · Σ values over labelled positions / their count."""
    loss = LOSSES["logits"][name]
    scale = temperature**2 if loss.soft_target else 1.0
    return scale * masked_mean(loss(zs, zt, temperature=temperature, **params), labels != -100)


def distilbert_loss_ce(s_logits, t_logits, attention_mask, temperature):
    """distiller.py: masked_select rows, nn.KLDivLoss(reduction="batchmean"), × T²."""
    mask = attention_mask.unsqueeze(-1).expand_as(s_logits).bool()
    s_logits_slct = torch.masked_select(s_logits, mask).view(-1, s_logits.size(-1))
    t_logits_slct = torch.masked_select(t_logits, mask).view(-1, s_logits.size(-1))
    return nn.KLDivLoss(reduction="batchmean")(
        F.log_softmax(s_logits_slct / temperature, dim=-1), F.softmax(t_logits_slct / temperature, dim=-1)
    ) * (temperature**2)


def trl_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0):
    """huggingface/trl trl/trainer/gkd_trainer.py GKDTrainer.generalized_jsd_loss, reduction="batchmean"."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log(1 - beta), teacher_log_probs + torch.log(beta)]), dim=0
        )
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    mask = labels != -100
    return jsd[mask].sum() / mask.sum()


def _distillm_mean(x, labels):
    mask = (labels != -100).int()
    return torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


def distillm(name, logits, teacher_logits, labels, lam=0.1):
    """jongwooko/distillm distillm/losses.py: forward_kl, reverse_kl, tv_distance, skewed_forward_kl,
    skewed_reverse_kl (no logit is ±inf here, so their inf_mask is all false and is left out)."""
    teacher_probs, student_probs = F.softmax(teacher_logits, dim=-1), F.softmax(logits, dim=-1)
    student_logprobs, teacher_logprobs = F.log_softmax(logits, dim=-1), F.log_softmax(teacher_logits, dim=-1)
    if name == "forward_kl":
        return -_distillm_mean(torch.sum(teacher_probs * student_logprobs, dim=-1).view(-1), labels)
    if name == "reverse_kl":
        prod_probs = student_probs * teacher_logprobs - student_probs * student_logprobs
        return -_distillm_mean(torch.sum(prod_probs, dim=-1).view(-1), labels)
    if name == "tv_distance":
        return _distillm_mean(
            torch.sum(0.5 * torch.abs(teacher_probs - student_probs), dim=-1).view(-1), labels
        )
    if name == "skewed_forward_kl":
        mixed_logprobs = torch.log(lam * teacher_probs + (1 - lam) * student_probs)
        return -_distillm_mean(torch.sum(teacher_probs * mixed_logprobs, dim=-1).view(-1), labels)
    mixed_logprobs = torch.log((1 - lam) * teacher_probs + lam * student_probs)  # skewed_reverse_kl
    prod_probs = student_probs * mixed_logprobs - student_probs * student_logprobs
    return -_distillm_mean(torch.sum(prod_probs, dim=-1).view(-1), labels)


def teacher_entropy(zt, labels):
    p = zt.softmax(-1)
    return masked_mean(-(p * p.log()).sum(-1), labels != -100)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_times_t_squared_equals_distilbert_loss_ce(temperature):
    zs, zt, labels = logits_batch(40)
    reference = distilbert_loss_ce(zs, zt, labels != -100, temperature)
    close(ours("forward_kl", zs, zt, labels, temperature), reference)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.7])
def test_jsd_equals_trl_generalized_jsd_loss(beta):
    zs, zt, labels = logits_batch(42)
    mine = ours("jsd", zs, zt, labels, 2.0, beta=beta) / 4  # TRL applies no T²
    close(mine, trl_generalized_jsd_loss(zs, zt, labels, beta, 2.0))
    if beta != 0.5:  # negative control for the β convention: TRL's value at 1 − β differs
        assert abs(mine - trl_generalized_jsd_loss(zs, zt, labels, 1 - beta, 2.0)) > 1e-4


def test_jsd_ends_are_what_trl_computes_at_beta_0_and_1():
    zs, zt, labels = logits_batch(44)
    close(ours("forward_kl", zs, zt, labels), trl_generalized_jsd_loss(zs, zt, labels, beta=0))
    close(ours("reverse_kl", zs, zt, labels), trl_generalized_jsd_loss(zs, zt, labels, beta=1))


@pytest.mark.parametrize(("name", "authors"), [
    ("reverse_kl", "reverse_kl"),
    ("tvd", "tv_distance"),
    ("skew_reverse_kl", "skewed_reverse_kl"),
    ("soft_ce", "forward_kl"),
])  # fmt: skip
def test_logit_loss_equals_distillm(name, authors):
    zs, zt, labels = logits_batch(46)
    close(ours(name, zs, zt, labels), distillm(authors, zs, zt, labels))


@pytest.mark.parametrize("alpha", [0.1, 0.4])
def test_skew_reverse_kl_alpha_is_distillm_lam(alpha):
    zs, zt, labels = logits_batch(48)
    close(
        ours("skew_reverse_kl", zs, zt, labels, alpha=alpha),
        distillm("skewed_reverse_kl", zs, zt, labels, alpha),
    )
    other = distillm(
        "skewed_reverse_kl", zs, zt, labels, 1 - alpha
    )  # negative control: the swapped convention
    assert abs(ours("skew_reverse_kl", zs, zt, labels, alpha=alpha) - other) > 1e-4


@pytest.mark.parametrize("alpha", [0.1, 0.4])
def test_skew_kl_is_distillm_minus_the_teacher_entropy_with_the_same_gradient(alpha):
    zs, zt, labels = logits_batch(50)
    zs.requires_grad_()
    mine = ours("skew_kl", zs, zt, labels, alpha=alpha)
    theirs = distillm("skewed_forward_kl", zs, zt, labels, alpha)
    close(mine + teacher_entropy(zt, labels), theirs)
    assert abs(mine - theirs) > 0.5  # the values differ by H(p_T)
    close(torch.autograd.grad(mine, zs)[0], torch.autograd.grad(theirs, zs)[0])


def test_forward_kl_is_distillm_forward_kl_minus_the_teacher_entropy():
    zs, zt, labels = logits_batch(52)
    close(
        ours("forward_kl", zs, zt, labels) + teacher_entropy(zt, labels),
        distillm("forward_kl", zs, zt, labels),
    )


def test_soft_ce_is_v_times_tinybert_soft_cross_entropy():
    """TinyBERT/task_distill.py soft_cross_entropy: (−p_T · log p_S).mean() over examples and classes."""
    zs, zt = randn(6, 3, seed=54), randn(6, 3, seed=55)
    tinybert = (-F.softmax(zt, dim=-1) * F.log_softmax(zs, dim=-1)).mean()
    close(losses.soft_ce(zs, zt).mean(), 3 * tinybert)


def test_logit_mse_is_distilbert_loss_mse_over_v():
    """distiller.py: MSELoss(reduction="sum")(s_logits_slct, t_logits_slct) / s_logits_slct.size(0)."""
    zs, zt, labels = logits_batch(56)
    rows = labels != -100
    distilbert = nn.MSELoss(reduction="sum")(zs[rows], zt[rows]) / zs[rows].size(0)
    close(ours("mse", zs, zt, labels) * 9, distilbert)


@pytest.mark.parametrize(("name", "params", "expected"), [
    ("forward_kl", {}, 0.14384103622589042),  # ½ log(½/¾) + ½ log(½/¼) = ½ log 4/3
    ("reverse_kl", {}, 0.13081203594113697),  # ¾ log(¾/½) + ¼ log(¼/½)
    ("jsd", {"beta": 0.5}, 0.033822075568605205),  # m = (5/8, 3/8): ½ KL(p_T ‖ m) + ½ KL(p_S ‖ m)
    ("skew_kl", {"alpha": 0.1}, 0.11313672216156873),  # m = (0.725, 0.275): ½ log(½/m₁) + ½ log(½/m₂)
    ("skew_reverse_kl", {"alpha": 0.1}, 0.10704273641095058),  # m = (0.525, 0.475): ¾ log(¾/m₁) + ¼ log(¼/m₂)
    ("tvd", {}, 0.25),  # ½ (¼ + ¼)
    ("soft_ce", {}, 0.8369882167858358),  # −(½ log ¾ + ½ log ¼)
    ("mse", {}, 0.5 * math.log(3.0) ** 2),  # ((log 3)² + 0) / 2
])  # fmt: skip
def test_logit_losses_by_hand(name, params, expected):
    close(LOSSES["logits"][name](HAND_S, HAND_T, **params), [expected])
