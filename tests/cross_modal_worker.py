"""Tiny paired data and models for the cross-modal tests: a text teacher (BERT) and students that read audio
(wav2vec 2.0 on samples, w2v-BERT on log-mel features), images (ViT) or another tokenisation of the text.

Run in one process by the tests, and as `torchrun --standalone --nproc_per_node 2 tests/cross_modal_worker.py OUT`
for the 2-process comparison: both see the same 8 examples in each optimizer step.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from conftest import (  # noqa: E402
    BertForSequenceClassification,
    bert_config,
    dump_run,
    leave_together,
    make_tokenizer,
    seeded,
    sentences,
    two_step_settings,
)
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    SeamlessM4TFeatureExtractor,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
    Wav2Vec2BertConfig,
    Wav2Vec2BertForSequenceClassification,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForSequenceClassification,
)

from llmkd.data.paired import encode_pairs  # noqa: E402
from llmkd.schemes import CrossModalConfig, CrossModalTrainer  # noqa: E402

RATE = 16_000
LABELS = {"id2label": {0: "neg", 1: "pos"}, "label2id": {"neg": 0, "pos": 1}}
TERMS = [
    {"knowledge": "logits", "loss": "forward_kl"},
    {"knowledge": "pooled", "loss": "cosine", "weight": 0.5},
    {"knowledge": "aligned", "loss": "mse", "weight": 0.5},
]

# No randomness in the forward (dropout, layer drop, time masking): runs compare exactly.
QUIET = dict(
    mask_time_prob=0.0,
    layerdrop=0.0,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    feat_proj_dropout=0.0,
    final_dropout=0.0,
)


def w2v_bert_student(seed: int = 1):
    config = Wav2Vec2BertConfig(
        feature_projection_input_dim=160,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        conv_depthwise_kernel_size=5,
        classifier_proj_size=8,
        conformer_conv_dropout=0.0,
        **QUIET,
        position_embeddings_type="relative_key",
        left_max_position_embeddings=16,
        right_max_position_embeddings=4,
        num_labels=2,
        **LABELS,
    )
    return seeded(Wav2Vec2BertForSequenceClassification, config, seed), SeamlessM4TFeatureExtractor()


def wav2vec2_student(seed: int = 1):
    config = Wav2Vec2Config(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8, 8),
        conv_kernel=(10, 4, 4),
        conv_stride=(5, 4, 4),
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer",  # group norm over time would count the padding
        do_stable_layer_norm=True,
        classifier_proj_size=8,
        **QUIET,
        num_labels=2,
        **LABELS,
    )
    extractor = Wav2Vec2FeatureExtractor(return_attention_mask=True, do_normalize=True)
    return seeded(Wav2Vec2ForSequenceClassification, config, seed), extractor


def vit_student(seed: int = 1):
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **LABELS,
    )
    processor = ViTImageProcessorPil(size={"height": 16, "width": 16})
    return seeded(ViTForImageClassification, config, seed), processor


def text_student(seed: int = 1):
    """A BERT classifier reading the Llama-style tokenisation (other special tokens, other lengths)."""
    return seeded(
        BertForSequenceClassification, bert_config(layers=2, hidden=16, **LABELS), seed
    ), make_tokenizer("llama")


STUDENTS = {
    "w2v_bert": w2v_bert_student,
    "wav2vec2": wav2vec2_student,
    "vit": vit_student,
    "text": text_student,
}
COLUMN = {"w2v_bert": "audio", "wav2vec2": "audio", "vit": "image", "text": "text"}


def teacher(seed: int = 0):
    return seeded(BertForSequenceClassification, bert_config(**LABELS), seed), make_tokenizer("bert")


def clip(text: str, index: int) -> np.ndarray:
    """A stand-in for a spoken sentence: one tone per word, 0.06 s each (lengths differ with the text)."""
    rng = np.random.default_rng(index)
    parts = [np.sin(np.arange(960) * (0.02 + 0.002 * int(w[1:]))) for w in text.split()]
    return (np.concatenate(parts) * 0.5 + 0.01 * rng.standard_normal(960 * len(parts))).astype(np.float32)


def image(text: str, index: int) -> np.ndarray:
    rng = np.random.default_rng(index + 1000 * len(text))
    return rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)


def raw_pairs(n: int = 8, seed: int = 3) -> Dataset:
    texts = sentences(n, seed)
    return Dataset.from_dict(
        {
            "text": texts,
            "audio": [clip(t, i) for i, t in enumerate(texts)],
            "image": [image(t, i) for i, t in enumerate(texts)],
            "label": [int(t.count("w1") % 2 == 0) for t in texts],
        }
    )


def paired(kind: str, n: int = 8, seed: int = 3):
    student, processor = STUDENTS[kind]()
    model, tokenizer = teacher()
    data = encode_pairs(
        raw_pairs(n, seed), processor, tokenizer, student_column=COLUMN[kind], teacher_column="text"
    )
    return student, processor, model, tokenizer, data


def build_trainer(kind: str, args: CrossModalConfig, n: int = 8):
    """A CrossModalTrainer of the BERT teacher and a `kind` student on `n` paired rows; (trainer, data)."""
    student, processor, model, tokenizer, data = paired(kind, n=n)
    trainer = CrossModalTrainer(
        model=student,
        teacher=model,
        args=args,
        train_dataset=data,
        processing_class=processor,
        teacher_processing_class=tokenizer,
    )
    return trainer, data


def train_and_dump(out_dir: str, per_device_batch: int, accumulation: int, kind: str = "w2v_bert"):
    args = CrossModalConfig(
        **two_step_settings(out_dir, per_device_batch, accumulation), terms=TERMS, hard_label_weight=0.5
    )
    trainer, _ = build_trainer(kind, args)
    trainer.train()
    student = trainer.student
    state = {k: v.detach().clone() for k, v in student.state_dict().items() if not k.startswith("llmkd_aux")}
    dump_run(
        trainer,
        out_dir,
        {"student.safetensors": state, "aux.safetensors": dict(trainer.aux.modules.state_dict())},
    )
    return trainer


if __name__ == "__main__":
    train_and_dump(sys.argv[1], per_device_batch=2, accumulation=2, kind=sys.argv[2])
    leave_together()
