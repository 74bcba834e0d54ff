"""Cross-tokenizer distillation: ULD vs a float64 reference, the two-tokenizer data path, the trainer."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from conftest import LlamaForCausalLM, llama_config, make_tokenizer, seeded, sentences, training_settings
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from llmkd.data.collate import DistillationCollator
from llmkd.data.loading import tokenize_pairs
from llmkd.knowledge.cross_vocab import aligned_targets
from llmkd.losses import forward_kl, masked_mean
from llmkd.losses.cross_vocab import uld_loss, uld_loss_chunked
from llmkd.schemes import CrossTokenizerConfig, CrossTokenizerTrainer

DIGIT_VOCAB = ["<unk>", "<pad>", "<bos>", "<eos>", "w", *"0123456789"]


def digit_tokenizer() -> PreTrainedTokenizerFast:
    """Another tokenizer for the conftest words: 'w12' -> 'w' '1' '2', other specials and ids (15 tokens)."""
    vocab = {tok: i for i, tok in enumerate(DIGIT_VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


def reference_uld(student_logits, teacher_logits, temperature=1.0) -> np.ndarray:
    """Float64 numpy ULD with explicit zero-padding, written independently of the torch version."""
    out = []
    for zs, zt in zip(np.asarray(student_logits, np.float64), np.asarray(teacher_logits, np.float64)):
        ps, pt = (np.exp(z / temperature - np.max(z / temperature)) for z in (zs, zt))
        ps, pt = np.sort(ps / ps.sum())[::-1], np.sort(pt / pt.sum())[::-1]
        size = max(len(ps), len(pt))
        ps, pt = np.pad(ps, (0, size - len(ps))), np.pad(pt, (0, size - len(pt)))
        out.append(np.abs(ps - pt).sum())
    return np.array(out)


# ---- the loss ------------------------------------------------------------------------------------


@pytest.mark.parametrize("v_s, v_t", [(7, 11), (11, 7), (9, 9)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_uld_matches_float64_reference(v_s, v_t, temperature):
    g = torch.Generator().manual_seed(v_s * 100 + v_t)
    s, t = 3 * torch.randn(6, v_s, generator=g), 3 * torch.randn(6, v_t, generator=g)
    got = uld_loss(s, t, temperature=temperature)
    assert got.dtype == torch.float32 and got.shape == (6,)
    np.testing.assert_allclose(got.numpy(), reference_uld(s, t, temperature), rtol=1e-5, atol=1e-6)
    assert got.min() > 0.05  # random pairs are far apart: the comparison above is not 0 == 0


def test_uld_hand_computed_padding_and_minus_inf():
    student = torch.tensor([[0.0, -float("inf")]])  # p = [1, 0]
    teacher = torch.zeros(1, 4)  # p = [.25] * 4; sorted, student zero-padded: .75 + 3 × .25
    assert uld_loss(student, teacher).item() == pytest.approx(1.5)
    assert uld_loss(teacher, student).item() == pytest.approx(1.5)


def test_uld_is_zero_for_the_same_distribution_and_bounded_by_two():
    z = torch.randn(4, 10)
    assert uld_loss(z, z).abs().max() == 0
    assert uld_loss(z, z[:, torch.randperm(10)]).abs().max() < 1e-6  # same masses, other token ids
    assert uld_loss(z, torch.cat([z, torch.full((4, 5), -float("inf"))], -1)).abs().max() < 1e-6
    one_hot, flat = torch.tensor([[50.0, 0, 0]]), torch.zeros(1, 1000)
    assert 1.9 < uld_loss(one_hot, flat).item() <= 2.0


def test_uld_is_the_l1_distance_minimised_over_token_relabellings():
    """Brute force over all 5! bijections between two 5-token vocabularies: sorting attains the minimum."""
    g = torch.Generator().manual_seed(11)
    s, t = (
        2 * torch.randn(3, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 5, generator=g, dtype=torch.float64),
    )
    ps, pt = s.softmax(-1), t.softmax(-1)
    best = torch.stack([(ps - pt[:, list(p)]).abs().sum(-1) for p in itertools.permutations(range(5))]).min(0)
    torch.testing.assert_close(uld_loss(s, t), best.values)
    assert (best.indices > 0).any()  # the identity relabelling is not the minimiser: sorting does matter


def test_uld_is_invariant_to_permuting_either_vocabulary_but_kl_is_not():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(5, 12, generator=g), torch.randn(5, 8, generator=g)
    ps, pt = torch.randperm(12, generator=g), torch.randperm(8, generator=g)
    base = uld_loss(s, t)
    torch.testing.assert_close(uld_loss(s[:, ps], t), base)
    torch.testing.assert_close(uld_loss(s, t[:, pt]), base)
    torch.testing.assert_close(uld_loss(s[:, ps], t[:, pt]), base)
    # the control: KL compares token k with token k, so relabelling one side changes it
    same = torch.randn(5, 12, generator=g)
    assert (forward_kl(s[:, ps], same) - forward_kl(s, same)).abs().max() > 1e-2


def test_uld_minus_inf_rows_are_finite_with_finite_gradients():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(3, 6, generator=g, requires_grad=True)
    t = torch.randn(3, 9, generator=g)
    t[1] = -float("inf")  # a fully masked teacher row: no distribution, loss and gradient 0
    t[2, :4] = -float("inf")  # a partly masked one: masked entries are probability 0
    blocked = torch.zeros(3, 6, dtype=torch.bool)
    blocked[0, :2] = True
    s_in = s.masked_fill(blocked, -float("inf"))
    value = uld_loss(s_in, t)
    assert torch.isfinite(value).all() and value[1] == 0
    want = reference_uld(s_in[[0, 2]].detach(), t[[0, 2]])
    np.testing.assert_allclose(value[[0, 2]].detach().numpy(), want, rtol=1e-5)
    value.sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad[1].abs().max() == 0 and s.grad[blocked].abs().max() == 0
    assert s.grad[2].abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_uld_half_precision_inputs_are_computed_in_float32(dtype):
    s, t = (4 * torch.randn(4, 300)).to(dtype), (4 * torch.randn(4, 200)).to(dtype)
    got = uld_loss(s, t)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), reference_uld(s.float(), t.float()), rtol=1e-5, atol=1e-6)


def test_uld_masking_through_masked_mean():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    s[~mask] = float("nan")  # padding may hold anything: it must reach neither value nor gradient
    got = masked_mean(uld_loss(s, t), mask)
    want = reference_uld(s[mask], t[mask]).mean()
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_uld_gradcheck_float64():
    g = torch.Generator().manual_seed(7)
    s = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(3, 9, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: uld_loss(a, b, temperature=1.5), (s, t))


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_chunked_uld_gives_the_plain_values_and_gradients(chunk_size):
    g = torch.Generator().manual_seed(13)
    s = torch.randn(7, 11, generator=g, requires_grad=True)
    t, weights = torch.randn(7, 5, generator=g), torch.rand(7, generator=g)
    plain = uld_loss(s, t, temperature=2.0)
    (grad,) = torch.autograd.grad((plain * weights).sum(), s)
    chunked = uld_loss_chunked(s, t, temperature=2.0, chunk_size=chunk_size)
    (grad_chunked,) = torch.autograd.grad((chunked * weights).sum(), s)
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(grad_chunked, grad)
    assert uld_loss_chunked(s[:0], t[:0]).shape == (0,)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        uld_loss_chunked(s, t, chunk_size=0)


def test_uld_rejects_bad_inputs():
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        uld_loss(torch.randn(2, 3), torch.randn(2, 4), temperature=0)
    with pytest.raises(ValueError, match="same positions"):
        uld_loss(torch.randn(2, 3), torch.randn(3, 4))


# ---- data: two token streams, aligned by completion-token index ----------------------------------


def test_aligned_targets_pairs_the_first_min_targets_of_each_row():
    s_labels = torch.tensor([[-100, -100, 5, 6, 7], [-100, 8, 9, -100, -100]])
    t_labels = torch.tensor([[-100, 1, 2, -100], [-100, 3, 4, 5]])
    s_mask, t_mask = aligned_targets(s_labels, t_labels)
    # row 0: student targets at shifted positions 1, 2, 3; teacher at 0, 1 -> the first two pair up
    assert s_mask.tolist() == [[False, True, True, False], [True, True, False, False]]
    assert t_mask.tolist() == [[True, True, False], [True, True, False]]


def pair_data(n=8, seed=0) -> Dataset:
    prompts, completions = sentences(n, seed, 2, 5), sentences(n, seed + 1, 2, 6)
    return Dataset.from_dict({"prompt": prompts, "completion": [" " + c for c in completions]})


def test_tokenize_pairs_masks_the_prompt_on_both_sides_and_the_collator_pads_each():
    student_tok, teacher_tok = make_tokenizer("llama"), digit_tokenizer()
    data = Dataset.from_dict({"prompt": ["w1 w23"], "completion": [" w4 w55"]})
    row = tokenize_pairs(
        data, student_tok, teacher_tok, prompt_column="prompt", completion_column="completion"
    )[0]
    bos, eos, w = 4, 5, (lambda k: 6 + k)  # conftest ids: 6 specials (<s> = 4, </s> = 5), then w0..w55
    assert row["input_ids"] == [bos, w(1), w(23), w(4), w(55), eos]
    assert row["labels"] == [-100, -100, -100, w(4), w(55), eos]
    d = {tok: i for i, tok in enumerate(DIGIT_VOCAB)}
    digits = [d["w"], d["4"], d["w"], d["5"], d["5"], d["<eos>"]]
    assert row["teacher_input_ids"] == [d["<bos>"], d["w"], d["1"], d["w"], d["2"], d["3"], *digits]
    assert row["teacher_labels"] == [-100] * 6 + digits
    batch = DistillationCollator(student_tok, causal_lm=True, teacher_tokenizer=teacher_tok)(
        [row, {"input_ids": [4, 7], "teacher_input_ids": [2, 4, 5]}]
    )
    assert batch["input_ids"].shape == (2, 6) and batch["teacher_input_ids"].shape == (2, 12)
    assert batch["input_ids"][1].tolist() == [4, 7, 0, 0, 0, 0]  # student pad: [PAD] = 0
    assert batch["teacher_input_ids"][1, 3:].eq(d["<pad>"]).all()  # teacher pad: <pad> = 1
    assert batch["labels"][1].tolist() == [4, 7, -100, -100, -100, -100]  # no labels: the ids, padding -100
    assert batch["teacher_attention_mask"][1].tolist() == [1, 1, 1] + [0] * 9


# ---- trainer ---------------------------------------------------------------------------------------


def pair_models(teacher_vocab=15):  # len(DIGIT_VOCAB)
    # A wide initialisation: predictions that vary from position to position, so misalignment shows.
    teacher = seeded(LlamaForCausalLM, llama_config(vocab_size=teacher_vocab, initializer_range=0.5), 0)
    student = seeded(LlamaForCausalLM, llama_config(layers=2, hidden=16, initializer_range=0.5), 1)
    return teacher, student


def make_uld_trainer(teacher, student, tmp_path, data, teacher_tok=None, **overrides):
    settings = training_settings(tmp_path, **({"per_device_eval_batch_size": len(data)} | overrides))
    return CrossTokenizerTrainer(
        model=student,
        teacher=teacher,
        args=CrossTokenizerConfig(**settings),
        train_dataset=data,
        eval_dataset=data,
        processing_class=make_tokenizer("llama"),
        teacher_processing_class=teacher_tok or digit_tokenizer(),
    )


def encoded(n=8, seed=0, teacher_tok=None, max_length=128):
    """Prompt/completion rows tokenised by both tokenizers; the teacher's stream is about 2.5× longer, so a
    short max_length truncates its completions first and rows with n_T < n_S appear beside n_T > n_S ones."""
    return tokenize_pairs(
        pair_data(n, seed),
        make_tokenizer("llama"),
        teacher_tok or digit_tokenizer(),
        prompt_column="prompt",
        completion_column="completion",
        max_length=max_length,
    )


def test_trainer_value_matches_a_per_example_reference(tmp_path):
    """The trainer's ULD on one batch == a plain loop over examples (slice completions, pair, average)."""
    teacher, student = pair_models()
    data = encoded(8, seed=2, max_length=16)
    trainer = make_uld_trainer(teacher, student, tmp_path, data)
    metrics = trainer.evaluate()
    total, count, longer = 0.0, 0, set()
    with torch.no_grad():
        for row in data:
            zs = student(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
            zt = teacher(input_ids=torch.tensor([row["teacher_input_ids"]])).logits[0, :-1]
            s_pos = [i for i, y in enumerate(row["labels"][1:]) if y != -100]
            t_pos = [i for i, y in enumerate(row["teacher_labels"][1:]) if y != -100]
            n = min(len(s_pos), len(t_pos))
            longer.add("student" if len(s_pos) > n else "teacher" if len(t_pos) > n else "same")
            total += reference_uld(zs[s_pos[:n]], zt[t_pos[:n]]).sum()
            count += n
    assert {"student", "teacher"} <= longer  # both truncation sides are exercised
    assert count > 10 and metrics["eval_distill/uld"] == pytest.approx(total / count, rel=1e-4)


def test_same_model_and_tokenizer_give_zero_uld(tmp_path):
    """With one tokenizer and a copy of the student as teacher, every aligned pair is the same position."""
    _, student = pair_models()
    tok = make_tokenizer("llama")
    data = encoded(6, teacher_tok=tok)
    metrics = make_uld_trainer(copy.deepcopy(student), student, tmp_path, data, teacher_tok=tok).evaluate()
    assert metrics["eval_distill/uld"] < 1e-6 and metrics["eval_loss_ce"] > 1.0


def test_trainer_trains_the_student_and_leaves_the_teacher(tmp_path):
    teacher, student = pair_models()
    data = encoded(8)
    teacher_start, student_start = copy.deepcopy(teacher.state_dict()), copy.deepcopy(student.state_dict())
    trainer = make_uld_trainer(teacher, student, tmp_path, data, max_steps=8, learning_rate=3e-2)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    logged = [h for h in trainer.state.log_history if "distill/uld" in h]
    assert logged and all("loss_ce" in h for h in logged)
    assert after["eval_loss"] < before["eval_loss"] - 0.05, (before, after)
    assert after["eval_distill/uld"] < before["eval_distill/uld"]
    assert max((student.state_dict()[k] - v).abs().max().item() for k, v in student_start.items()) > 1e-3
    for k, v in teacher_start.items():
        assert torch.equal(teacher.state_dict()[k], v), k
    assert not teacher.training
    trainer.save_model()  # a plain student checkpoint: nothing of the teacher, nothing missing
    _, info = LlamaForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


class PerBatchMeanTrainer(CrossTokenizerTrainer):
    """The negative control: each micro-batch normalised by its own counts."""

    loss_is_scaled_for_ga = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch=None)


def one_step(tmp_path, batch, accumulation, cls=CrossTokenizerTrainer):
    teacher, student = pair_models()
    start = copy.deepcopy(student.state_dict())
    trainer = make_uld_trainer(
        teacher,
        student,
        tmp_path,
        encoded(4, seed=4, max_length=16),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        max_grad_norm=0.0,
        hard_label_weight=0.5,
        uld_weight=2.0,
        uld_chunk_size=3,  # several checkpointed chunks per micro-batch
    )
    trainer.__class__ = cls
    trainer.train()
    return {k: v - start[k] for k, v in student.state_dict().items() if k in start}


def gap(a, b):
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-12)).item() for k in a)


def test_accumulation_1x4_equals_2x2(tmp_path):
    full = one_step(tmp_path / "a", 4, 1)
    assert max(v.abs().max().item() for v in full.values()) > 1e-4
    assert gap(full, one_step(tmp_path / "b", 2, 2)) < 1e-4
    assert gap(full, one_step(tmp_path / "c", 2, 2, PerBatchMeanTrainer)) > 1e-3


# ---- validation and the base trainer's error ---------------------------------------------------------


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"uld_weight": -1.0}, "uld_weight must be a finite number >= 0, got -1.0"),
        ({"hard_label_weight": float("nan")}, "hard_label_weight must be a finite number >= 0"),
        ({"uld_weight": 0.0, "hard_label_weight": 0.0}, "nothing to train on"),
        ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
        ({"terms": [{"knowledge": "logits", "loss": "forward_kl"}]}, "takes no distillation terms"),
        ({"teacher_dtype": "fp8"}, "teacher_dtype must be one of"),
        ({"uld_chunk_size": 0}, "uld_chunk_size must be a positive integer, got 0"),
    ],
)
def test_config_validation(kw, message):
    with pytest.raises(ValueError, match=message):
        CrossTokenizerConfig(output_dir="unused", report_to="none", use_cpu=True, **kw)


def test_trainer_refuses_single_stream_data(tmp_path):
    teacher, student = pair_models()
    plain = Dataset.from_dict({"input_ids": [[4, 7, 8]], "attention_mask": [[1, 1, 1]]})
    with pytest.raises(ValueError, match=r"has no \[.teacher_input_ids.*tokenize_pairs"):
        make_uld_trainer(teacher, student, tmp_path, plain)


def test_trainer_refuses_classifiers(bert_pair, tmp_path):
    teacher, student = bert_pair
    with pytest.raises(
        ValueError, match="for causal LMs, but the student is a sequence_classification model"
    ):
        make_uld_trainer(teacher, student, tmp_path, encoded(2))
