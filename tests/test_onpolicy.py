"""On-policy distillation (GKD): prompt/completion data, completion-only loss, counting over the accumulation
window, two processes. Where completions come from (dataset, student or teacher samples, the per-rank choice,
resume) is tests/test_onpolicy_sampling.py, which imports the models, data and settings below."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

import pytest
import torch
from conftest import (
    LlamaForCausalLM,
    bert_config,
    llama_config,
    make_tokenizer,
    run_launcher,
    seeded,
    sentences,
    training_settings,
)
from datasets import Dataset
from safetensors.torch import load_file
from transformers import BertForSequenceClassification

from llmkd import DistillationConfig, DistillationTrainer
from llmkd.data.collate import DistillationCollator
from llmkd.data.loading import tokenize_prompt_completion
from llmkd.schemes.on_policy import (
    OnPolicyConfig,
    OnPolicyTrainer,
    example_seeds,
    prompts_of,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS, PAD = 5, 0
BETA = 0.3


def prompt_completion_data(n: int = 8, seed: int = 0) -> Dataset:
    tok = make_tokenizer("llama")
    rows = {
        "prompt": sentences(n, seed, min_len=1, max_len=5),
        "completion": sentences(n, seed + 100, min_len=1, max_len=6),
    }
    return tokenize_prompt_completion(Dataset.from_dict(rows), tok, max_length=32)


def models():
    teacher = seeded(LlamaForCausalLM, llama_config(), 0)
    student = seeded(LlamaForCausalLM, llama_config(layers=2, hidden=16), 1)
    with torch.no_grad():  # make EOS likely enough that some samples stop early and some hit max_new_tokens
        for model in (teacher, student):
            model.lm_head.weight[EOS] = model.lm_head.weight[EOS] * 4
    return teacher, student


def settings(tmp_path, **overrides) -> dict:
    values = training_settings(
        tmp_path,
        max_steps=2,
        learning_rate=0.5,
        optim="sgd",
        max_grad_norm=0.0,
        terms=[{"knowledge": "logits", "loss": "jsd", "beta": BETA}],
        temperature=1.0,
        hard_label_weight=0.0,
        max_new_tokens=6,
    )
    values |= overrides
    if values.get("lmbda", 0.5) == 0 and not values.get(
        "seq_kd"
    ):  # nothing sampled: a sampling setting is refused
        values.pop("max_new_tokens")
    return values


def make(tmp_path, pair=None, data=None, trainer_cls=OnPolicyTrainer, **overrides):
    teacher, student = pair or models()
    tok = make_tokenizer("llama")
    return trainer_cls(
        model=student,
        teacher=teacher,
        args=OnPolicyConfig(**settings(tmp_path, **overrides)),
        train_dataset=prompt_completion_data() if data is None else data,
        processing_class=tok,
        teacher_processing_class=tok,
    )


def reference_samples(model, prompts, seeds, max_new_tokens, temperature=1.0) -> list[list[int]]:
    """An independent sampler: one row at a time, full forward each step (no cache, no padding)."""
    out = []
    for prompt, seed in zip(prompts, seeds):
        generator, ids = torch.Generator().manual_seed(seed), list(prompt)
        for _ in range(max_new_tokens):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
            cdf = (logits / temperature).softmax(-1).cumsum(-1)
            u = torch.rand((), generator=generator, dtype=torch.float64)
            ids.append(int(torch.searchsorted(cdf, (u * cdf[-1])[None], right=True).clamp(max=len(cdf) - 1)))
            if ids[-1] == EOS:
                break
        out.append(ids[len(prompt) :])
    return out


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_gap(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---- data ---------------------------------------------------------------------------------------


def test_prompt_completion_rows_mask_the_prompt_and_pad_right():
    tok = make_tokenizer("llama")
    raw = Dataset.from_dict({"prompt": ["w1 w2", "w3"], "completion": ["w4", "w5 w6 w7"]})
    data = tokenize_prompt_completion(raw, tok, max_length=5)
    assert data[0]["input_ids"] == [4, 7, 8, 10, EOS] and data[0]["prompt_length"] == 3  # <s> w1 w2 | w4 </s>
    assert data[0]["labels"] == [-100, -100, -100, 10, EOS]
    assert data[1]["input_ids"] == [4, 9, 11, 12, 13] and data[1]["labels"][:2] == [-100, -100]  # cut at 5
    short = {
        "input_ids": [4, 9, 11],
        "attention_mask": [1] * 3,
        "labels": [-100, -100, 11],
        "prompt_length": 2,
    }
    batch = DistillationCollator(tok, causal_lm=True)([data[0], short])
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert batch["input_ids"][1, 3:].tolist() == [PAD, PAD] and batch["labels"][1, 3:].tolist() == [-100] * 2
    assert batch["prompt_length"].tolist() == [3, 2]
    assert prompts_of(batch) == [[4, 7, 8], [4, 9]]
    kept = tokenize_prompt_completion(raw, tok, max_length=8, max_prompt_length=2, add_eos=False)
    assert kept[0]["input_ids"] == [7, 8, 10]  # the prompt's last two tokens, no EOS
    with pytest.raises(ValueError, match="max_length=2"):
        tokenize_prompt_completion(raw, tok, max_length=2)
    with pytest.raises(ValueError, match=r"\['completion'\]"):
        tokenize_prompt_completion(Dataset.from_dict({"prompt": ["w1"]}), tok)


def test_chat_messages_go_through_the_chat_template():
    tok = make_tokenizer("llama")
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}w0 {% endif %}{{ m['content'] }} </s> "
        "{% endfor %}{% if add_generation_prompt %}w0 {% endif %}"
    )
    chat = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]
    row = tokenize_prompt_completion(Dataset.from_dict({"messages": [chat]}), tok)[0]
    assert row["input_ids"] == [7, 8, EOS, 6, 9, EOS]  # w1 w2 </s> w0 | w3 </s>
    assert row["prompt_length"] == 4 and row["labels"] == [-100] * 4 + [9, EOS]


# ---- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("lmbda", 1.5), ("lmbda", -0.1), ("max_new_tokens", 0), ("sampling_temperature", 0.0), ("top_p", 0.0)],
)
def test_bad_settings_fail_before_training(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"{field} must be"):
        OnPolicyConfig(**settings(tmp_path, **{field: value}))


def test_non_causal_student_and_plain_data_are_refused(tmp_path):
    teacher = seeded(BertForSequenceClassification, bert_config(), 0)
    student = seeded(BertForSequenceClassification, bert_config(layers=2, hidden=16), 1)
    with pytest.raises(ValueError, match="must be a causal LM"):
        make(tmp_path, pair=(teacher, student))
    text_only = Dataset.from_dict({"input_ids": [[4, 7, 8]], "attention_mask": [[1, 1, 1]]})
    with pytest.raises(ValueError, match="tokenize_prompt_completion"):
        make(tmp_path, data=text_only)


# ---- the loss covers completion tokens only -----------------------------------------------------


def jsd_reference(student_logits, teacher_logits, mask, beta=BETA) -> torch.Tensor:
    """Float64 GKD JSD(beta) summed over the masked positions, divided by their number."""
    p_s, p_t = student_logits.double().softmax(-1), teacher_logits.double().softmax(-1)
    m = beta * p_t + (1 - beta) * p_s
    values = beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)
    return values[mask].sum() / mask.sum()


@pytest.mark.parametrize("fused", [True, False])
def test_teacher_at_prompt_positions_does_not_change_the_loss(tmp_path, fused):
    trainer = make(tmp_path, lmbda=0.0, fused_logits=fused)
    assert trainer.fused is fused
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    targets = batch["labels"][:, 1:] != -100  # position t predicts token t + 1
    student, teacher = trainer.model.train(), trainer.teacher
    plain_inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = jsd_reference(
            student(**plain_inputs).logits[:, :-1], teacher(**plain_inputs).logits[:, :-1], targets
        )
    plain = trainer._teacher_forward

    def loss_with_teacher_noise_at(positions):
        def noisy(inputs, flags):
            out = plain(inputs, flags)
            noise = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(0)) * 5
            out.logits = out.logits + noise * positions[..., None]
            if out.hidden_states is not None:  # the fused path reads hidden states and the lm_head instead
                *rest, last = out.hidden_states
                out.hidden_states = (*rest, last + 5 * positions[..., None] * torch.randn_like(last))
            return out

        trainer._teacher_forward = noisy
        with torch.no_grad():
            return trainer.compute_loss(student, batch).item()

    off_target = torch.cat([~targets, torch.ones_like(targets[:, :1])], dim=1).float()  # prompt + padding
    clean = loss_with_teacher_noise_at(torch.zeros_like(off_target))
    assert clean == pytest.approx(expected.item(), rel=1e-3)  # float32 vs float64 on a small divergence
    assert loss_with_teacher_noise_at(off_target) == pytest.approx(clean, rel=1e-6)
    assert loss_with_teacher_noise_at(1 - off_target) > 2 * clean  # control: completion positions count


# ---- normalisation over the accumulation window ----------------------------------------------------


class CountsBeforeSampling(OnPolicyTrainer):
    """The pitfall, as a negative control: count the dataset's targets, then swap in the samples."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, counts = DistillationTrainer.get_batch_samples(self, epoch_iterator, num_batches, device)
        return [self.complete_batch(b, i) for i, b in enumerate(batches)], counts


def one_step(tmp_path, batch, accumulation, trainer_cls=OnPolicyTrainer):
    teacher, student = models()
    start = weights(student)
    trainer = make(
        tmp_path,
        pair=(teacher, student),
        data=prompt_completion_data(4, seed=5),
        trainer_cls=trainer_cls,
        lmbda=1.0,
        max_steps=1,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
    )
    trainer.train()
    return {k: v - start[k] for k, v in weights(student).items()}


def materialised_update(tmp_path):
    """Plain DistillationTrainer, one batch of 4, on the completions the initial student samples at step 0."""
    teacher, student = models()
    data = prompt_completion_data(4, seed=5)
    prompts = [row["input_ids"][: row["prompt_length"]] for row in data]
    samples = reference_samples(student, prompts, example_seeds(prompts, "student", 0, 0, Counter()), 6)
    rows = [{"input_ids": p + c, "labels": [-100] * len(p) + c} for p, c in zip(prompts, samples)]
    start = weights(student)
    values = {k: v for k, v in settings(tmp_path, max_steps=1).items() if k != "max_new_tokens"}
    DistillationTrainer(
        model=student,
        teacher=teacher,
        args=DistillationConfig(**values),
        train_dataset=Dataset.from_list(rows),
        data_collator=DistillationCollator(make_tokenizer("llama"), causal_lm=True),
    ).train()
    return {k: v - start[k] for k, v in weights(student).items()}


def test_accumulation_counts_the_sampled_completions(tmp_path):
    reference = materialised_update(tmp_path / "ref")
    assert max(v.abs().max().item() for v in reference.values()) > 1e-4
    for batch, accumulation in ((4, 1), (2, 2), (1, 4)):
        update = one_step(tmp_path / f"{batch}x{accumulation}", batch, accumulation)
        assert max_gap(update, reference) < 1e-4 * max(v.abs().max().item() for v in reference.values())
    broken = one_step(tmp_path / "broken", 2, 2, trainer_cls=CountsBeforeSampling)
    assert max_gap(broken, reference) > 1e-2 * max(v.abs().max().item() for v in reference.values())


@pytest.mark.multiprocess
def test_two_process_ddp_matches_one_process(tmp_path):
    """2 ranks × 2 examples per micro-batch == 1 process × 4: same choices, same samples, same update."""
    from onpolicy_worker import train

    single = train(str(tmp_path / "single"), per_device_batch=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    script = os.path.join(ROOT, "tests", "onpolicy_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script]
    done = run_launcher([*cmd, str(tmp_path / "ddp")], clean=[tmp_path / "ddp"], env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2  # two processes really ran
    choices = [h["onpolicy/student_batches"] for h in single.state.log_history if "loss" in h]
    assert summary["choices"] == choices == [0.5, 0.5]  # one sampled micro-batch of two, in both steps
    ddp = load_file(str(tmp_path / "ddp" / "student.safetensors"))
    for name, tensor in single.model.state_dict().items():
        torch.testing.assert_close(ddp[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
