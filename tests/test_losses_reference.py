"""Losses against their authors' released code: each `*_authors` function below re-implements, line by line and in
float64, the code named in its docstring (never calling the code under test). Each loss also has a value worked
out by hand, and where the reduction was once different, a negative control that the old reduction would fail.
Here the relation, hidden-state and attention-map losses; the logit (response) losses are in
tests/test_losses_reference_response.py, which imports `randn` and `close` from here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmkd import losses
from llmkd.losses import LOSSES, masked_mean

INF = float("inf")


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def close(actual, expected, tol: float = 1e-10) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual).double(), torch.as_tensor(expected, dtype=torch.float64), rtol=tol, atol=tol
    )


# ------------------------------------------------------------------ relation (lenscloth/RKD, SP, PKT)


def pdist_authors(e, squared=False, eps=1e-12):
    """lenscloth/RKD metric/utils.py pdist."""
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
    if not squared:
        res = res.sqrt()
    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def rkd_distance_authors(student, teacher):
    """lenscloth/RKD metric/loss.py RkdDistance.forward."""
    t_d = pdist_authors(teacher, squared=False)
    mean_td = t_d[t_d > 0].mean()
    t_d = t_d / mean_td
    d = pdist_authors(student, squared=False)
    mean_d = d[d > 0].mean()
    d = d / mean_d
    return F.smooth_l1_loss(d, t_d, reduction="mean")


def rkd_angle_authors(student, teacher):
    """lenscloth/RKD metric/loss.py RKdAngle.forward."""
    td = teacher.unsqueeze(0) - teacher.unsqueeze(1)
    norm_td = F.normalize(td, p=2, dim=2)
    t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    sd = student.unsqueeze(0) - student.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    return F.smooth_l1_loss(s_angle, t_angle, reduction="mean")


def sp_authors(f_s, f_t):
    """HobbitLong/RepDistiller distiller_zoo/SP.py Similarity.similarity_loss (one layer pair)."""
    bsz = f_s.shape[0]
    f_s, f_t = f_s.view(bsz, -1), f_t.view(bsz, -1)
    g_s = torch.nn.functional.normalize(torch.mm(f_s, torch.t(f_s)))
    g_t = torch.nn.functional.normalize(torch.mm(f_t, torch.t(f_t)))
    g_diff = g_t - g_s
    return (g_diff * g_diff).view(-1, 1).sum(0)[0] / (bsz * bsz)


def pkt_authors(output_net, target_net, eps=0.0000001):
    """passalis/probabilistic_kt nn/pkt.py cosine_similarity_loss."""
    output_net = output_net / (torch.sqrt(torch.sum(output_net**2, dim=1, keepdim=True)) + eps)
    output_net[output_net != output_net] = 0
    target_net = target_net / (torch.sqrt(torch.sum(target_net**2, dim=1, keepdim=True)) + eps)
    target_net[target_net != target_net] = 0
    model_similarity = (torch.mm(output_net, output_net.transpose(0, 1)) + 1.0) / 2.0
    target_similarity = (torch.mm(target_net, target_net.transpose(0, 1)) + 1.0) / 2.0
    model_similarity = model_similarity / torch.sum(model_similarity, dim=1, keepdim=True)
    target_similarity = target_similarity / torch.sum(target_similarity, dim=1, keepdim=True)
    return torch.mean(target_similarity * torch.log((target_similarity + eps) / (model_similarity + eps)))


RELATION_AUTHORS = {
    "rkd_distance": rkd_distance_authors,
    "rkd_angle": rkd_angle_authors,
    "sp": sp_authors,
    "similarity_preserving": sp_authors,
    "pkt": pkt_authors,
}


def test_every_relation_loss_has_an_authors_reference():
    assert set(RELATION_AUTHORS) == set(LOSSES["relation"])


@pytest.mark.parametrize("duplicates", [False, True])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", list(RELATION_AUTHORS))
def test_relation_loss_equals_the_authors_code(name, seed, duplicates):
    student, teacher = randn(12, 5, seed=seed), randn(12, 7, seed=seed + 50, scale=3.0)
    if duplicates:  # repeated examples: distance 0 off the diagonal, clamped by the authors' pdist
        student[3], teacher[3] = student[2], teacher[2]
        student[7] = student[6]
    close(LOSSES["relation"][name](student, teacher), RELATION_AUTHORS[name](student, teacher))
    # float32 inputs: the same value to 1e-6 (relative)
    close(
        LOSSES["relation"][name](student.float(), teacher.float()),
        RELATION_AUTHORS[name](student, teacher),
        1e-6,
    )


def test_rkd_distance_by_hand():
    """Student on a line at 0, 1, 3: distances 1, 3, 2 (mean 2), ψ_S = 0.5, 1.5, 1. Teacher equilateral: ψ_T = 1.
    Huber(±0.5) = 0.125 for 4 of the 9 ordered pairs: 0.5 / 9 = 1/18 (over the 6 pairs i ≠ j it would be 1/12)."""
    student = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    teacher = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=torch.float64)
    close(losses.rkd_distance(student, teacher), 0.05555555555555555)


def test_rkd_distance_is_not_the_mean_over_distinct_pairs():
    """Negative control: the old reduction (mean over the N(N − 1) pairs i ≠ j) is 12/11 × the authors' at N = 12."""
    student, teacher = randn(12, 4, seed=7), randn(12, 6, seed=8)
    reference = rkd_distance_authors(student, teacher)
    off = ~torch.eye(12, dtype=torch.bool)
    ds, dt = (pdist_authors(x) for x in (student, teacher))
    old = F.smooth_l1_loss(ds[off] / ds[off].mean(), dt[off] / dt[off].mean())
    close(old / reference, 12 / 11)
    close(losses.rkd_distance(student, teacher), reference)
    assert abs(losses.rkd_distance(student, teacher) - old) > 1e-3 * old


def test_rkd_angle_by_hand():
    """Student: right triangle (0,0), (1,0), (0,1): cos at its vertices 0, 1/√2, 1/√2. Teacher on a line at 0, 1, 2:
    cos 1, −1, 1. Each vertex has 2 ordered (i, k) pairs: 2·[Huber(−1) + Huber(1/√2 + 1) + Huber(1/√2 − 1)]
    = 2·[0.5 + (1/√2 + 0.5) + (1 − 1/√2)²/2] = 2·1.75; the other 21 of the 27 triplets are 0: 3.5 / 27 = 7/54."""
    student = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    teacher = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    close(losses.rkd_angle(student, teacher), 7 / 54)


def test_similarity_preserving_by_hand():
    """G_S = I; teacher rows both [1]: G_T rows (1, 1)/√2. ‖G_T − G_S‖² = 2(1/√2 − 1)² + 2·½ = 4 − 2√2; / N² = 4."""
    student = torch.eye(2, dtype=torch.float64)
    teacher = torch.ones(2, 1, dtype=torch.float64)
    close(losses.similarity_preserving(student, teacher), 1 - math.sqrt(2) / 2)


def test_pkt_by_hand():
    """Student e1, e2: K = [[1, ½], [½, 1]], P_S rows (2/3, 1/3). Teacher e1, e1: P_T = ½ everywhere.
    Mean over the 4 entries of P_T log(P_T / P_S) = ¼ (log ¾ + log 3/2) = ¼ log 9/8 (ε = 1e-7 moves it by ~1e-7)."""
    student = torch.eye(2, dtype=torch.float64)
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    close(losses.pkt(student, teacher), math.log(9 / 8) / 4, 1e-5)


def test_pkt_keeps_the_authors_eps_where_the_student_gives_zero_probability():
    """Antipodal student vectors give P_S = 0 off the diagonal. Negative control: the old ε-free form, with P_S
    clamped to the smallest normal float, charges ~P_T·708 there instead of the authors' P_T·log((P_T + ε) / ε)."""
    student = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    teacher = randn(3, 4, seed=9)
    close(losses.pkt(student, teacher), pkt_authors(student, teacher))
    kernels = [(F.normalize(x) @ F.normalize(x).T + 1) / 2 for x in (student, teacher)]
    p_s, p_t = (k / k.sum(1, keepdim=True) for k in kernels)
    eps_free = (p_t * (p_t.log() - p_s.clamp_min(torch.finfo(torch.float64).tiny).log())).mean()
    assert eps_free > 10 * losses.pkt(student, teacher)


# ------------------------------------------------------------------ hidden states (TinyBERT, DistilBERT)


def padded_hidden(seed: int):
    hs, ht = randn(3, 5, 8, seed=seed), randn(3, 5, 8, seed=seed + 1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    return hs, ht, mask


def test_hidden_mse_equals_tinybert_without_padding_and_counts_real_tokens_only_with_it():
    """TinyBERT/task_distill.py: rep_loss = MSELoss()(student_rep, teacher_rep), the mean over all B·T·H entries."""
    hs, ht, mask = padded_hidden(10)
    close(masked_mean(losses.hidden_mse(hs, ht)), nn.MSELoss()(hs, ht))
    real = mask.bool().unsqueeze(-1).expand_as(hs)
    close(masked_mean(losses.hidden_mse(hs, ht), mask), nn.MSELoss()(hs[real], ht[real]))
    tinybert_with_pads = nn.MSELoss()(hs, ht)  # padded positions count there
    assert abs(masked_mean(losses.hidden_mse(hs, ht), mask) - tinybert_with_pads) > 1e-3


def test_hidden_mse_by_hand():
    """Token 1: (1² + 2²)/2 = 2.5; token 2 (padding): (0 + 2²)/2 = 2. Ours over real tokens: 2.5; TinyBERT: 9/4."""
    hs = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]], dtype=torch.float64)
    ht = torch.tensor([[[0.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    close(losses.hidden_mse(hs, ht), [[2.5, 2.0]])
    close(masked_mean(losses.hidden_mse(hs, ht), torch.tensor([[1, 0]])), 2.5)
    close(nn.MSELoss()(hs, ht), 2.25)


def hidden_cosine_distilbert(s_hidden_states, t_hidden_states, attention_mask):
    """huggingface/transformers examples/research_projects/distillation/distiller.py, the alpha_cos branch."""
    mask = attention_mask.unsqueeze(-1).expand_as(s_hidden_states).bool()
    dim = s_hidden_states.size(-1)
    s_hidden_states_slct = torch.masked_select(s_hidden_states, mask).view(-1, dim)
    t_hidden_states_slct = torch.masked_select(t_hidden_states, mask).view(-1, dim)
    target = s_hidden_states_slct.new(s_hidden_states_slct.size(0)).fill_(1)
    return nn.CosineEmbeddingLoss(reduction="mean")(s_hidden_states_slct, t_hidden_states_slct, target)


def test_hidden_cosine_equals_distilbert_over_real_tokens():
    hs, ht, mask = padded_hidden(12)
    close(masked_mean(losses.hidden_cosine(hs, ht), mask), hidden_cosine_distilbert(hs, ht, mask))


def test_hidden_cosine_by_hand():
    """cos((1, 0), (1, 1)) = 1/√2; a zero vector has cosine 0, so its loss is 1."""
    hs = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    ht = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    close(losses.hidden_cosine(hs, ht), [[1 - 1 / math.sqrt(2), 1.0]])


# ------------------------------------------------------------------ attention maps (TinyBERT, MiniLM)


def attention_batch(seed: int, lengths=(5, 3), heads: int = 2):
    """Softmax maps of a right-padded batch (padded keys exactly 0, as transformers returns) and its mask."""
    total = max(lengths)
    mask = torch.tensor([[1] * n + [0] * (total - n) for n in lengths])
    scores = randn(len(lengths), heads, total, total, seed=seed, scale=2.0)
    return scores.masked_fill(mask[:, None, None, :] == 0, -INF).softmax(-1), mask


def test_attention_mse_equals_tinybert_on_the_same_maps_without_padding():
    """TinyBERT/task_distill.py: scores <= -1e2 set to 0, then MSELoss() over all B·heads·T·T entries."""
    s_scores, t_scores = randn(2, 3, 4, 4, seed=20), randn(2, 3, 4, 4, seed=21)
    student_att = torch.where(s_scores <= -1e2, torch.zeros_like(s_scores), s_scores)
    teacher_att = torch.where(t_scores <= -1e2, torch.zeros_like(t_scores), t_scores)
    reference = nn.MSELoss()(student_att, teacher_att)
    close(masked_mean(losses.attention_mse(s_scores, t_scores)), reference)
    close(masked_mean(losses.attention_mse(s_scores, t_scores, key_mask=torch.ones(2, 4))), reference)


def test_attention_mse_by_hand():
    """a_S = (½, ½, 0), a_T = (1, 0, 0), key 3 padded: (¼ + ¼) / (1 head · 2 real keys) = ¼; over 3 keys: ⅙."""
    a_s = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64).view(1, 1, 1, 3)
    a_t = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).view(1, 1, 1, 3)
    close(losses.attention_mse(a_s, a_t, key_mask=torch.tensor([[1, 1, 0]])), [[0.25]])
    close(losses.attention_mse(a_s, a_t), [[1 / 6]])


@pytest.mark.parametrize("name", ["mse", "kl"])
def test_attention_losses_are_padding_invariant_with_key_mask(name):
    """The short example padded into a long batch gives its own values; without key_mask, mse would be scaled by
    real keys / padded keys (the negative control)."""
    (a_s, mask), (a_t, _) = attention_batch(30), attention_batch(31)
    loss = LOSSES["attention"][name]
    alone = loss(a_s[1:, :, :3, :3], a_t[1:, :, :3, :3])
    padded = loss(a_s, a_t, key_mask=mask)
    close(padded[1, :3], alone[0])
    close(padded[0], loss(a_s[:1], a_t[:1])[0])
    if name == "mse":
        close(loss(a_s, a_t)[1, :3], alone[0] * 3 / 5)
    else:  # no teacher mass on padded keys: the KL does not change
        close(loss(a_s, a_t)[:, :3], padded[:, :3])


def attention_kl_minilm(a_s, a_t, lengths):
    """MiniLM (arXiv 2002.10957) eq. for L_AT, one sequence at a time: 1/(A_h |x|) Σ_a Σ_t KL(A_T ‖ A_S)."""
    per_sequence = []
    for b, n in enumerate(lengths):
        s, t = a_s[b, :, :n, :n], a_t[b, :, :n, :n]
        per_sequence.append(F.kl_div(s.log(), t, reduction="sum") / (s.shape[0] * n))
    return per_sequence


def test_attention_kl_equals_the_minilm_formula_per_sequence():
    (a_s, mask), (a_t, _) = attention_batch(32), attention_batch(33)
    values = losses.attention_kl(a_s, a_t, key_mask=mask)
    for b, expected in enumerate(attention_kl_minilm(a_s, a_t, (5, 3))):
        close(masked_mean(values[b], mask[b]), expected)
    # Over the batch every real token weighs the same: the token-weighted mean of the per-sequence values.
    expected = sum(v * n for v, n in zip(attention_kl_minilm(a_s, a_t, (5, 3)), (5, 3), strict=True)) / 8
    close(masked_mean(values, mask), expected)


def test_attention_kl_by_hand():
    """a_T = (½, ½, 0), a_S = (¼, ¾, 0): ½ log 2 + ½ log ⅔ = ½ log 4/3, with or without the padded key 3."""
    a_s = torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64).view(1, 1, 1, 3)
    a_t = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64).view(1, 1, 1, 3)
    close(losses.attention_kl(a_s, a_t), [[0.14384103622589042]])
    close(losses.attention_kl(a_s, a_t, key_mask=torch.tensor([[1, 1, 0]])), [[0.14384103622589042]])


def test_masked_keys_never_count_even_under_teacher_mass_or_nan():
    a_t = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64).view(1, 1, 1, 3)
    a_s = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64).view(1, 1, 1, 3).requires_grad_()
    key_mask = torch.tensor([[True, True, False]])
    kl = losses.attention_kl(a_s, a_t, key_mask=key_mask)
    close(kl, [[0.8 * math.log(0.8)]])  # 2 · 0.4 · log(0.4 / 0.5)
    assert losses.attention_kl(a_s, a_t) > 50  # the student's 0 under teacher mass, when the key counts
    garbage = a_s.detach().clone()
    garbage[..., 2] = float("nan")
    garbage.requires_grad_()
    for name in ("kl", "mse"):
        out = LOSSES["attention"][name](garbage, a_t, key_mask=key_mask)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(garbage.grad).all()


def test_key_mask_is_data_not_a_term_parameter_and_its_shape_is_checked():
    assert LOSSES["attention"]["mse"].params == LOSSES["attention"]["kl"].params == frozenset()
    a, _ = attention_batch(34)
    with pytest.raises(ValueError, match=r"key_mask of shape \(2, 4\).*\(2, 2, 5, 5\)"):
        losses.attention_mse(a, a, key_mask=torch.ones(2, 4))


def test_gradcheck_attention_mse_with_key_mask():
    (a_s, mask), (a_t, _) = attention_batch(35), attention_batch(36)
    assert torch.autograd.gradcheck(
        lambda s: losses.attention_mse(s, a_t, key_mask=mask), (a_s.requires_grad_(),)
    )
