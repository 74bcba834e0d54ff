"""Property tier: padding invariance over knowledge × model family × padding side × pad == EOS.

A padded batch must give every example the same per-example value (its masked sum, before any normaliser) as the
example alone, and count the same items. Batches come from the user-facing collators (transformers' padding
collators with the tokenizer padding on the right or on the left, and llmkd's own), through the trainer.
Negative controls show the old behaviours fail: attention MSE averaged over padded keys, labels made by comparing
ids with a pad id that is also the EOS id, and left-padded batches fed to the models as they are.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import VOCAB, bert_config, llama_config, make_tokenizer, seeded, training_settings
from transformers import (
    BertForSequenceClassification,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from llmkd import DistillationConfig, DistillationTrainer
from llmkd.knowledge.attention import AttentionKnowledge
from llmkd.knowledge.relation import pool
from llmkd.modeling import is_causal
from llmkd.schemes.tally import per_example_sums

TERMS = {
    "logits": {"knowledge": "logits", "loss": "forward_kl"},
    "hidden": {"knowledge": "hidden", "loss": "mse"},  # widths 16 vs 32: through the projector
    "attention_mse": {"knowledge": "attention", "loss": "mse"},
    "attention_kl": {"knowledge": "attention", "loss": "kl"},
}


def gpt2(layers, hidden, seed):
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        bos_token_id=4,
        eos_token_id=5,
    )
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    return seeded(GPT2LMHeadModel, config, seed)


# family -> (build(layers, hidden, seed), tokenizer kind, causal LM)
FAMILIES = {
    "bert-cls": (lambda n, h, s: seeded(BertForSequenceClassification, bert_config(n, h), s), "bert", False),
    "llama-lm": (lambda n, h, s: seeded(LlamaForCausalLM, llama_config(n, h), s), "llama", True),
    "llama-cls": (
        lambda n, h, s: seeded(LlamaForSequenceClassification, llama_config(n, h, num_labels=2), s),
        "llama",
        False,
    ),
    "gpt2-lm": (gpt2, "llama", True),  # absolute position embeddings: left padding moves every position
}
ROWS = [[11, 12, 13], [14, 15, 16, 17, 18, 19, 20, 21, 22, 23], [24, 25, 26, 27, 28]]  # 3, 10 and 5 words


def tokenizer(kind: str, side: str, pad_is_eos: bool):
    tok = make_tokenizer(kind)
    tok.padding_side = side
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    return tok


def rows(kind: str, causal: bool, tok) -> list[dict]:
    """Encoded rows; causal-LM documents end with EOS (so pad == EOS puts real EOS tokens in every row)."""
    out = []
    for i, ids in enumerate(ROWS):
        ids = list(ids) + ([tok.eos_token_id] if causal else [])
        ids = [tok.cls_token_id or tok.bos_token_id, *ids]
        row = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if not causal:
            row["label"] = i % 2
        if kind == "bert":
            row["token_type_ids"] = [0] * len(ids)
        out.append(row)
    return out


def make(family: str, term: str, collator_kind: str, side: str, pad_is_eos: bool, tmp_path, hard=0.0):
    build, kind, causal = FAMILIES[family]
    teacher, student = build(4, 32, 0), build(2, 16, 1)
    for model in (teacher, student):
        model.set_attn_implementation("eager")  # attention terms need the maps; one kernel for every row
        model.config.pad_token_id = make_tokenizer(kind).pad_token_id
    tok = tokenizer(kind, side, pad_is_eos)
    collator = {
        "llmkd": None,
        "hf": DataCollatorForLanguageModeling(tok, mlm=False) if causal else DataCollatorWithPadding(tok),
    }[collator_kind]
    terms = [TERMS[term]] if term else []
    args = DistillationConfig(**training_settings(tmp_path, terms=terms, hard_label_weight=hard))
    trainer = DistillationTrainer(
        model=student, teacher=teacher, args=args, data_collator=collator, processing_class=tok,
        teacher_processing_class=tok, train_dataset=None,
    )  # fmt: skip
    return trainer, rows(kind, causal, tok)


def per_example(trainer, features: list[dict]) -> dict[str, torch.Tensor]:
    """{term: (B,) masked sums, count kind: (B,) items} of one collated batch, as the trainer computes them."""
    batch = trainer._prepare_inputs(trainer.data_collator(features))
    trainer.model.eval()
    with torch.no_grad():
        student_out, adapted = trainer._student_forward(trainer.model, batch, training=False)
        teacher_out = trainer._teacher_forward(batch, training=False)
        out = dict(trainer.local_counts(batch))
        for term in trainer.terms:
            tv = term.values(student_out, teacher_out, batch, adapted.get(str(term.index)))
            out[term.name] = per_example_sums(tv.values, tv.mask, len(features))
    return out


def assert_invariant(trainer, features) -> None:
    together = per_example(trainer, features)
    alone = [per_example(trainer, [row]) for row in features]
    for name, values in together.items():
        for i, single in enumerate(alone):
            torch.testing.assert_close(
                values[i], single[name][0], rtol=1e-5, atol=1e-6, msg=f"{name}, row {i}"
            )


CASES = [
    (family, term, collator, side, pad_is_eos)
    for family, term, collator, side, pad_is_eos in itertools.product(
        FAMILIES, TERMS, ["llmkd", "hf"], ["right", "left"], [False, True]
    )
    if not (pad_is_eos and FAMILIES[family][1] == "bert")  # BERT's tokenizer has no EOS
    and not (
        collator == "llmkd" and side == "left"
    )  # llmkd's collator pads right whatever the tokenizer says
]


@pytest.mark.parametrize(("family", "term", "collator", "side", "pad_is_eos"), CASES)
def test_padded_batch_gives_each_example_its_value_alone(family, term, collator, side, pad_is_eos, tmp_path):
    trainer, features = make(family, term, collator, side, pad_is_eos, tmp_path)
    assert_invariant(trainer, features)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_task_loss_and_counts_are_padding_invariant(family, side, tmp_path):
    pad_is_eos = FAMILIES[family][1] == "llama"
    trainer, features = make(family, None, "hf", side, pad_is_eos, tmp_path, hard=1.0)
    assert [t.name for t in trainer.terms] == ["loss_ce"]
    assert_invariant(trainer, features)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_relation_inputs_are_the_examples_pooled_alone(family, side, tmp_path):
    """A relation loss mixes a batch's examples by nature; what must not depend on padding is each pooled vector."""
    trainer, features = make(family, "logits", "hf", side, False, tmp_path)
    causal = is_causal(
        trainer.teacher
    )  # decoder classifiers pool like decoders: their first token saw nothing
    assert causal is (family != "bert-cls")

    def pooled(rows):
        batch = trainer._prepare_inputs(trainer.data_collator(rows))
        with torch.no_grad():
            hidden = trainer.teacher(
                **{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True
            )
        return pool(hidden.hidden_states[-1], batch["attention_mask"], causal)

    together = pooled(features)
    for i, row in enumerate(features):
        torch.testing.assert_close(together[i], pooled([row])[0], rtol=1e-5, atol=1e-6)


# ---- negative controls: each old behaviour breaks the property ------------------------------------------------


def test_control_attention_mse_over_padded_keys_scales_the_short_row(tmp_path, monkeypatch):
    """The issue's example: rows of 3 and 10 words; averaging over all key columns scales the short row."""
    monkeypatch.setattr(AttentionKnowledge, "__init__", _without_key_mask(AttentionKnowledge.__init__))
    trainer, features = make("bert-cls", "attention_mse", "llmkd", "right", False, tmp_path)
    together, short = per_example(trainer, features[:2]), per_example(trainer, features[:1])
    real, padded = len(features[0]["input_ids"]), len(features[1]["input_ids"])
    ratio = together["distill/attention_mse"][0] / short["distill/attention_mse"][0]
    torch.testing.assert_close(
        ratio, torch.tensor(real / padded), rtol=1e-4, atol=0
    )  # 5/12: a whole class off


def _without_key_mask(init):
    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._key_mask = False

    return patched


def test_control_pad_equal_to_eos_labels_from_ids_drop_every_eos(tmp_path):
    """8 rows with one EOS each: llmkd counts every real target; the id-based rule loses the 8 EOS targets."""
    trainer, _ = make("llama-lm", "logits", "hf", "right", True, tmp_path)
    tok = trainer.processing_class
    features = [{"input_ids": [4, 11 + i, 12, 13, 14, 15, 16, tok.eos_token_id]} for i in range(8)]
    for row in features:
        row["attention_mask"] = [1] * len(row["input_ids"])
    fixed = trainer.data_collator(features)
    raw = trainer.data_collator.collator(features)  # transformers' collator, as the old trainer used it
    count = lambda batch: trainer.local_counts(batch)["targets"].sum().item()  # noqa: E731
    assert count(fixed) == 56 and count(raw) == 48


def test_control_left_padding_fed_as_it_is_changes_the_values(tmp_path):
    trainer, features = make("gpt2-lm", "logits", "hf", "left", False, tmp_path)
    left = trainer.data_collator.collator(features)  # not right-aligned
    assert left["attention_mask"][0, 0] == 0  # the short row really is left-padded
    batch = trainer._prepare_inputs(dict(left))
    with torch.no_grad():
        student_out, _ = trainer._student_forward(trainer.model.eval(), batch, training=False)
        teacher_out = trainer._teacher_forward(batch, training=False)
        tv = trainer.terms[0].values(student_out, teacher_out, batch, None)
    raw = per_example_sums(tv.values, tv.mask, len(features))
    alone = per_example(trainer, features[:1])["distill/logits_forward_kl"][0]
    assert not torch.allclose(raw[0], alone, rtol=1e-3)
