"""Property tier: every config field takes effect or is refused before training, in every kind of run.

For each field of llmkd's configs (and the TrainingArguments fields whose effect lives in the loss path llmkd
replaces), a non-default value is tried in every run kind below. Either building the trainer raises a ValueError
(refused), or an observable of the run differs from the run with the default value (effect): the loss of one
fixed batch, the path taken, the teacher's dtype, the sampled batch. `test_every_field_is_in_the_table` makes a
new field without an entry here fail.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import (
    BertForSequenceClassification,
    LlamaForCausalLM,
    bert_config,
    classification_dataset,
    llama_config,
    lm_dataset,
    make_tokenizer,
    seeded,
    training_settings,
)
from test_cross_tokenizer import digit_tokenizer, encoded, pair_models
from test_onpolicy import models, prompt_completion_data
from transformers import TrainingArguments

from llmkd import (
    CrossTokenizerConfig,
    CrossTokenizerTrainer,
    DistillationConfig,
    DistillationTrainer,
    OnPolicyConfig,
    OnPolicyTrainer,
)
from llmkd.schemes import EarlyExitConfig, EarlyExitTrainer
from llmkd.schemes.mutual import MutualConfig, MutualTrainer

LOGITS, HIDDEN = {"knowledge": "logits", "loss": "forward_kl"}, {"knowledge": "hidden", "loss": "mse"}

# run kind -> (trainer, config, models(), data(), tokenizer kind, settings)
RUNS = {
    "cls": ("distill", lambda: _bert(), classification_dataset, "bert", {"terms": [LOGITS, HIDDEN]}),
    "lm": ("distill", lambda: _llama(), lambda: lm_dataset(4), "llama", {"terms": [LOGITS], "hard_label_weight": 0}),
    "lm_hidden": ("distill", lambda: _llama(), lambda: lm_dataset(4), "llama", {"terms": [HIDDEN], "hard_label_weight": 0}),
    "lm_padded_vocab": ("distill", lambda: _llama(teacher_vocab=70), lambda: lm_dataset(4), "llama",
                        {"terms": [LOGITS], "hard_label_weight": 0.5, "vocab_mismatch": "slice"}),
    "on_policy": ("on_policy", lambda: models(), lambda: prompt_completion_data(4), "llama", {"lmbda": 1.0}),
    "on_policy_off": ("on_policy", lambda: models(), lambda: prompt_completion_data(4), "llama", {"lmbda": 0.0}),
    "cross_tokenizer": ("cross_tokenizer", lambda: pair_models(), lambda: encoded(4), "llama", {}),
    "mutual": ("mutual", lambda: (None, [seeded(BertForSequenceClassification, bert_config(2, 16, initializer_range=0.5), s)
                                         for s in (1, 2)]), classification_dataset, "bert",
               {"terms": [{**LOGITS, "weight": 0.5}]}),  # 2 peers, no teacher; forward and reverse KL give the
    # same total over the peers (Σ_k KL(p_l ‖ p_k) is symmetric; only each peer's gradient differs): a weight shows it
    "early_exit": ("early_exit", lambda: _self_taught(), classification_dataset, "bert", {"exit_layers": [1, 2]}),
}  # fmt: skip
SCHEMES = {
    "distill": (DistillationTrainer, DistillationConfig),
    "on_policy": (OnPolicyTrainer, OnPolicyConfig),
    "cross_tokenizer": (CrossTokenizerTrainer, CrossTokenizerConfig),
    "mutual": (MutualTrainer, MutualConfig),
    "early_exit": (EarlyExitTrainer, EarlyExitConfig),
}

# field -> the non-default value tried
ALTERNATIVES = {
    "diagnostics": False,
    "terms": [{"knowledge": "logits", "loss": "reverse_kl"}],
    "temperature": 3.0,
    "hard_label_weight": 0.9,
    "teacher_dtype": "bfloat16",
    "teacher_placement": "replicate",
    "vocab_mismatch": "slice",
    "fused_logits": False,
    "logit_chunk_size": 3,
    "shared_vocab_size": 40,
    "lmbda": 0.25,
    "seq_kd": True,
    "max_new_tokens": 2,
    "sampling_temperature": 0.2,
    "top_k": 2,
    "top_p": 0.3,
    "uld_weight": 0.5,
    "uld_chunk_size": 3,
    "num_peers": 3,
    "mutual_target": "mean",
    "peer_heads": "reinit",
    "exit_layers": [1],
    "exit_loss": "reverse_kl",
    "exit_kd_weight": 0.5,
    "exit_hint_weight": 0.5,
    "exit_label_weight": 0.5,
    "exit_pooling": "mean",
    "freeze_backbone": False,  # observed through dropout: a frozen backbone runs in eval mode
    "label_smoothing_factor": 0.2,  # TrainingArguments: applied by Trainer inside the compute_loss llmkd replaces
    "label_names": ["my_labels"],
}


def _bert():  # wide initialisations: logits far enough apart that a KL term moves the loss
    teacher = seeded(BertForSequenceClassification, bert_config(initializer_range=0.5), 0)
    return teacher, seeded(
        BertForSequenceClassification, bert_config(layers=2, hidden=16, initializer_range=0.5), 1
    )


def _self_taught():  # trainer early_exit: the model is its own teacher (passed as both)
    config = bert_config(num_labels=3, initializer_range=0.5)
    config.hidden_dropout_prob = 0.2
    model = seeded(BertForSequenceClassification, config, 0)
    return model, model


def _llama(teacher_vocab=None):
    extra = {"vocab_size": teacher_vocab} if teacher_vocab else {}
    return seeded(LlamaForCausalLM, llama_config(**extra), 0), seeded(
        LlamaForCausalLM, llama_config(2, 16), 1
    )


def build(run: str, tmp_path, **overrides):
    scheme, make_models, data, kind, settings = RUNS[run]
    trainer_cls, config_cls = SCHEMES[scheme]
    teacher, student = make_models()
    tok = make_tokenizer(kind)
    values = training_settings(tmp_path, max_steps=1, **settings)
    if scheme == "on_policy":
        values |= {"terms": [{"knowledge": "logits", "loss": "jsd", "beta": 0.5}], "temperature": 1.0}
    args = config_cls(**(values | overrides))
    teacher_tok = digit_tokenizer() if scheme == "cross_tokenizer" else tok
    return trainer_cls(
        model=student, teacher=teacher, args=args, train_dataset=data(), processing_class=tok,
        teacher_processing_class=teacher_tok,
    )  # fmt: skip


def observe(trainer) -> dict:
    """What a setting can change: the loss of one fixed (sampled) batch, the path, the teacher's dtype."""
    torch.manual_seed(0)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    if hasattr(trainer, "complete_batch"):  # on-policy: the sources of 8 micro-batches, then the first one
        batches = [trainer.complete_batch(batch, i) for i in range(8)]
        batch = batches[0] | {"all": [b["input_ids"].tolist() for b in batches]}
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, {k: v for k, v in batch.items() if k != "all"}).item()
    teacher = getattr(trainer.source, "model", None)
    chunk = [getattr(t, "chunk_size", None) for t in trainer.terms if getattr(t, "fused", False)]
    chunk += [t.chunk_size for t in trainer.terms if t.term.knowledge == "cross_vocab"]
    return {
        "loss": loss,  # unrounded: a small term (a KL between tiny random models) moves it little
        "batch": batch.get("all", batch["input_ids"].tolist()),
        "fused": trainer.fused,
        "chunk": chunk,
        "teacher_dtype": None if teacher is None else next(teacher.parameters()).dtype,
        "logged": sorted(trainer.tally.store["train"]),  # diagnostics: the names tallied beside the terms
        "guard": trainer.diagnostics.enabled,
    }


def outcome(run: str, tmp_path, **overrides):
    try:
        return observe(build(run, tmp_path, **overrides))
    except ValueError as err:
        return f"refused: {err}"


def fields(config_cls) -> set[str]:
    return {f.name for f in dataclasses.fields(config_cls) if f.init} - {
        f.name for f in dataclasses.fields(TrainingArguments)
    }


def test_every_field_is_in_the_table():
    own = set().union(*(fields(config) for _, config in SCHEMES.values()))
    assert own == set(ALTERNATIVES) - {"label_smoothing_factor", "label_names"}


CASES = [
    (field, run)
    for field in ALTERNATIVES
    for run, (scheme, *_) in RUNS.items()
    if field in fields(SCHEMES[scheme][1]) or field in ("label_smoothing_factor", "label_names")
]


@pytest.mark.parametrize(("field", "run"), CASES)
def test_a_setting_takes_effect_or_is_refused(field, run, tmp_path):
    if field == "terms" and RUNS[run][0] == "cross_tokenizer":
        pytest.skip("cross_tokenizer's terms must stay empty: a non-empty list is refused by its config")
    default = outcome(run, tmp_path / "default")
    assert not isinstance(default, str), default  # every run kind builds with its defaults
    value = ALTERNATIVES[field]
    if RUNS[run][-1].get(field) == value:  # the run kind sets this value itself: try the default instead
        value = next(f for f in dataclasses.fields(SCHEMES[RUNS[run][0]][1]) if f.name == field).default
    changed = outcome(run, tmp_path / "changed", **{field: value})
    if isinstance(changed, str):
        assert field in changed or "refused" in changed, changed
        return
    assert changed != default, f"{field}={value!r} changed nothing in a {run} run"


def test_refusals_name_the_field_the_reason_and_the_fix(tmp_path):
    message = outcome("lm_hidden", tmp_path, temperature=3.0)
    assert "temperature=3.0 has no effect: no logit term uses the config's temperature" in message
    assert "remove it" in message
    message = outcome("lm", tmp_path, label_smoothing_factor=0.2)
    assert "label_smoothing_factor=0.2 has no effect" in message and "hard_label_weight is 0" in message


def test_control_label_smoothing_was_ignored_before(tmp_path):
    """The issue's example: with hard labels, label smoothing now changes the loss (it was silently dropped)."""
    plain, smoothed = (observe(build("cls", tmp_path / str(e), label_smoothing_factor=e)) for e in (0.0, 0.2))
    assert smoothed["loss"] != plain["loss"]


def test_a_terms_own_temperature_takes_effect(tmp_path):
    """The issue's example: a term's temperature used to crash at the first step ("multiple values")."""
    term = {**LOGITS, "temperature": 4.0}
    own = observe(build("cls", tmp_path / "a", terms=[term, HIDDEN]))
    config_wide = observe(build("cls", tmp_path / "b", terms=[LOGITS, HIDDEN], temperature=4.0))
    default = observe(build("cls", tmp_path / "c"))
    assert own["loss"] == config_wide["loss"] != default["loss"]


@pytest.mark.parametrize("run", ["cls", "lm_hidden"])
def test_same_size_tokenizers_with_other_ids_are_refused_for_every_knowledge(run, tmp_path):
    """The teacher reads the student's ids: another token -> id map is refused, not only for causal logit terms."""
    scheme, make_models, data, kind, settings = RUNS[run]
    teacher, student = make_models()
    tok, other = make_tokenizer(kind), make_tokenizer(kind)
    vocab = other.get_vocab()
    swapped = {"w0": vocab["w1"], "w1": vocab["w0"]}  # same size, two ids exchanged
    other = _with_vocab(other, {**vocab, **swapped})
    args = DistillationConfig(**training_settings(tmp_path, max_steps=1, **settings))
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        DistillationTrainer(
            model=student, teacher=teacher, args=args, train_dataset=data(), processing_class=tok,
            teacher_processing_class=other,
        )  # fmt: skip


def _with_vocab(tokenizer, vocab: dict):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def test_trainer_arguments_that_would_be_bypassed_are_refused(tmp_path):
    teacher, student = _bert()
    args = DistillationConfig(**training_settings(tmp_path))
    with pytest.raises(ValueError, match="compute_loss_func is not used"):
        DistillationTrainer(model=student, teacher=teacher, args=args, compute_loss_func=lambda *a, **k: 0)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)  # built before the projector exists
    terms = [HIDDEN]
    args = DistillationConfig(**training_settings(tmp_path, terms=terms))
    with pytest.raises(ValueError, match="auxiliary modules"):
        DistillationTrainer(model=student, teacher=teacher, args=args, optimizers=(optimizer, None))


@pytest.mark.parametrize(
    ("metric", "greater"),
    [("eval_distill/logits_forward_kl", False), ("loss_ce", False), ("agreement", True)],
)
def test_best_checkpoint_direction_follows_the_metric(metric, greater, tmp_path):
    """transformers guesses "greater is better" unless the name ends with 'loss': wrong for llmkd's terms."""
    args = DistillationConfig(**training_settings(tmp_path, metric_for_best_model=metric))
    assert args.greater_is_better is greater


def test_context_and_sequence_parallelism_are_refused(tmp_path):
    """They shard every sequence; llmkd's terms, counts and teacher see whole ones."""
    from types import SimpleNamespace

    from llmkd.schemes.config import check_settings

    args = DistillationConfig(**training_settings(tmp_path))
    check_settings(args, {})  # the control: nothing to refuse
    args.parallelism_config = SimpleNamespace(cp_enabled=True, sp_enabled=False)
    with pytest.raises(ValueError, match="parallelism_config=.*context / sequence parallelism"):
        check_settings(args, {})
