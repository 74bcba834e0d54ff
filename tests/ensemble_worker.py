"""Two teachers (one reading the student's ids, one its own tokenisation), combined by `random`, trained 2 steps;
and the tiny models, tokenizers and data of tests/test_ensemble.py.

Run in one process by tests/test_ensemble.py, and as `torchrun --standalone --nproc_per_node 2
tests/ensemble_worker.py OUT_DIR` for the 2-process comparison: every optimizer step sees all 8 examples. Writes
the student's weights, the projector's, and the teacher each process drew at each step.
"""

from __future__ import annotations

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from conftest import (  # noqa: E402
    BertForSequenceClassification,
    bert_config,
    make_tokenizer,
    seeded,
    sentences,
    training_settings,
)
from datasets import Dataset  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import RobertaConfig, RobertaForSequenceClassification  # noqa: E402

from llmkd import DistillationConfig, DistillationTrainer  # noqa: E402
from llmkd.data.loading import tokenize  # noqa: E402
from llmkd.modeling import SEQ_CLS  # noqa: E402
from llmkd.teachers.ensemble import EnsembleTeacher  # noqa: E402

TERMS = [
    {"knowledge": "logits", "loss": "forward_kl"},
    {"knowledge": "hidden", "loss": "mse", "teacher": "bert"},
]


def other_tokenizer():
    """A RoBERTa-style word-level tokenizer: the same words at other ids, a larger vocabulary, pad id 1."""
    from conftest import WORDS
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = ["<s>", "<pad>", "</s>", "<unk>", *reversed(WORDS), *[f"x{i}" for i in range(10)]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )


def roberta(seed: int = 2, **kw):
    config = RobertaConfig(
        vocab_size=len(other_tokenizer()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=70,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.5,
        num_labels=2,
        **kw,
    )
    return seeded(RobertaForSequenceClassification, config, seed)


def bert(seed: int = 0, **kw):
    return seeded(BertForSequenceClassification, bert_config(initializer_range=0.5, **kw), seed)


def small_student(**kw):
    return seeded(BertForSequenceClassification, bert_config(2, 16, initializer_range=0.5, **kw), 1)


def record_draws(source: EnsembleTeacher) -> list:
    """The (step, teacher) pairs `source` draws from now on (each step's draw is asked once per micro-batch)."""
    draws, draw = [], source.draw
    source.draw = lambda step: draws.append((step, draw(step))) or draws[-1][1]
    return draws


def save_tiny_teachers(root) -> None:
    """BERT (labels negative, positive), BERT with the labels in the other order, RoBERTa-style with another
    vocabulary, saved with their tokenizers; jsonl data with a `domain` column naming a teacher per row."""
    labels = ["negative", "positive"]
    saved = {
        "first": (bert(id2label=dict(enumerate(labels))), make_tokenizer("bert")),
        "swapped": (bert(seed=5, id2label=dict(enumerate(reversed(labels)))), make_tokenizer("bert")),
        "other": (roberta(id2label=dict(enumerate(labels))), other_tokenizer()),
    }
    for folder, (model, tok) in saved.items():
        model.save_pretrained(root / folder)
        tok.save_pretrained(root / folder)
    for split, n in (("train", 24), ("validation", 8)):
        rows = [
            {"sentence": s, "label": labels[int("w1" in s)], "domain": ["first", "other"][i % 2]}
            for i, s in enumerate(sentences(n, seed=n))
        ]
        (root / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def raw_data(n: int = 8, seed: int = 3) -> Dataset:
    texts = sentences(n, seed)
    return Dataset.from_dict({"text": texts, "label": [int("w1" in t) for t in texts]})


def ensemble(combination="random", **kw) -> EnsembleTeacher:
    return EnsembleTeacher(
        {"bert": bert(), "roberta": roberta()}, combination, tokenizers={"roberta": other_tokenizer()}, **kw
    )


def trainer_for(teacher, tmp_path, student=None, raw=None, collator=None, **settings):
    tok = make_tokenizer("bert")
    raw = raw if raw is not None else raw_data(8)
    data = tokenize(raw, tok, SEQ_CLS, "text")
    if isinstance(teacher, EnsembleTeacher):
        data = teacher.prepare(data, raw, text_columns="text")
    args = DistillationConfig(
        **training_settings(
            tmp_path, **({"terms": [{"knowledge": "logits", "loss": "forward_kl"}]} | settings)
        )
    )
    return DistillationTrainer(
        model=student or small_student(), teacher=teacher, args=args, train_dataset=data, processing_class=tok,
        data_collator=collator,
    )  # fmt: skip


def loss_and_grads(trainer, rows=8):
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(rows)]))
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def assert_same(a, b, same=True):
    close = math.isclose(a[0], b[0], rel_tol=1e-5) and all(
        torch.allclose(a[1][k], b[1][k], atol=1e-6) for k in a[1]
    )
    assert close is same, (a[0], b[0])


def train_and_dump(out_dir: str, per_device_batch: int, accumulation: int) -> DistillationTrainer:
    student = seeded(
        BertForSequenceClassification, bert_config(layers=2, hidden=16, initializer_range=0.5), 1
    )
    tok = make_tokenizer("bert")
    source = ensemble()
    raw = raw_data()
    train = source.prepare(tokenize(raw, tok, SEQ_CLS, "text"), raw, text_columns="text")
    args = DistillationConfig(
        output_dir=out_dir,
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=accumulation,
        max_steps=2,
        learning_rate=0.1,
        optim="sgd",
        save_strategy="no",
        report_to="none",
        seed=2,  # its draws for steps 0 and 1 differ: both teachers teach
        disable_tqdm=True,
        use_cpu=True,
        terms=TERMS,
        hard_label_weight=0.5,
        logging_steps=1,
    )
    trainer = DistillationTrainer(
        model=student, teacher=source, args=args, train_dataset=train, processing_class=tok
    )
    draws = record_draws(source)
    trainer.train()
    os.makedirs(out_dir, exist_ok=True)
    rank = trainer.args.process_index
    with open(f"{out_dir}/draws-{rank}.json", "w") as handle:
        json.dump(sorted(set(draws)), handle)
    if trainer.is_world_process_zero():
        save_file(
            {k: v.contiguous() for k, v in student.state_dict().items()}, f"{out_dir}/student.safetensors"
        )
        save_file(dict(trainer.auxiliary_modules.state_dict()), f"{out_dir}/projectors.safetensors")
        with open(f"{out_dir}/world_size.txt", "w") as handle:
            handle.write(str(trainer.args.world_size))
    return trainer


if __name__ == "__main__":
    train_and_dump(sys.argv[1], per_device_batch=2, accumulation=2)
    # Leave together: a rank exiting while its peer still talks to gloo can abort the peer (SIGABRT).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
