"""Tiny teachers, students, tokenizers and datasets built from configs: every test runs offline in seconds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# benchmarks/ lives outside the package, beside tests/: its tests import it from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

torch.set_num_threads(1)

WORDS = [f"w{i}" for i in range(56)]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<s>", "</s>"]
VOCAB = len(SPECIALS) + len(WORDS)


def make_tokenizer(kind: str = "bert") -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS: BERT-style ([CLS] … [SEP]) or Llama-style (<s> …)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if kind == "bert":
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        specials = {
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
        }
    else:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
        )
        specials = {
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "model_input_names": ["input_ids", "attention_mask"],
        }
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def bert_config(layers=4, hidden=32, heads=4, **kw) -> BertConfig:
    kw.setdefault("num_labels", 2)
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
        **kw,
    )


def llama_config(layers=4, hidden=32, heads=4, **kw) -> LlamaConfig:
    kw.setdefault("vocab_size", VOCAB)
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=4,
        eos_token_id=5,
        tie_word_embeddings=False,
        **kw,
    )


GLOO_ABORT = "terminate called without an active exception"


def run_launcher(cmd: list[str], *, clean=(), **kwargs):
    """Runs a torchrun / accelerate launch command; reruns it once (after removing `clean`) if a rank died of
    std::terminate inside gloo, a rare crash of gloo's threads on a loaded CPU that is not about our code. Any
    other failure, and any wrong result, still fails the caller's assertions."""
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode != 0 and GLOO_ABORT in done.stderr:
        warnings.warn(f"a rank aborted in gloo ({GLOO_ABORT!r}); running the launch once more", stacklevel=2)
        for path in clean:
            shutil.rmtree(path, ignore_errors=True)
        done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    return done


def training_settings(tmp_path, **overrides) -> dict:
    """TrainingArguments fields the trainer tests share: CPU, seeded, 3 logged steps, nothing saved or reported."""
    common = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        use_cpu=True,
    )
    return common | overrides


def two_step_settings(out_dir, per_device_batch: int, accumulation: int, **overrides) -> dict:
    """The 2-process comparison runs' TrainingArguments: two SGD steps (linear in the gradient: Adam would blow
    float noise in ~0 gradients up to lr-sized steps), seeded, on CPU, nothing saved or reported."""
    common = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=accumulation,
        max_steps=2,
        learning_rate=0.1,
        optim="sgd",
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
        use_cpu=True,
        logging_steps=1,
    )
    return common | overrides


def dump_run(trainer, out_dir, files: dict) -> None:
    """On the main process: each {file name: {key: tensor}} as safetensors in `out_dir`, and the world size."""
    from safetensors.torch import save_file

    if not trainer.is_world_process_zero():
        return
    os.makedirs(out_dir, exist_ok=True)
    for name, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, name))
    with open(os.path.join(out_dir, "world_size.txt"), "w") as handle:
        handle.write(str(trainer.args.world_size))


def leave_together() -> None:
    """End a worker: a rank exiting while its peer still talks to gloo can abort the peer (SIGABRT)."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def seeded(build, config, seed):
    torch.manual_seed(seed)
    return build(config)


@pytest.fixture
def bert_pair():
    """(teacher, student): 4-layer width-32 teacher, 2-layer width-16 student (a projector is needed)."""
    teacher = seeded(BertForSequenceClassification, bert_config(), 0)
    student = seeded(BertForSequenceClassification, bert_config(layers=2, hidden=16), 1)
    return teacher, student


@pytest.fixture
def llama_pair():
    teacher = seeded(LlamaForCausalLM, llama_config(), 0)
    student = seeded(LlamaForCausalLM, llama_config(layers=2, hidden=16), 1)
    return teacher, student


def sentences(n: int, seed: int = 0, min_len: int = 3, max_len: int = 12) -> list[str]:
    """Variable-length sentences over WORDS (lengths differ so padding and token weighting matter)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(0, len(WORDS), (length,), generator=g)
        out.append(" ".join(WORDS[i] for i in ids))
    return out


def classification_dataset(n: int = 16, seed: int = 0) -> Dataset:
    texts = sentences(n, seed)
    tok = make_tokenizer("bert")
    labels = [int(t.count("w1") % 2 == 0) for t in texts]
    enc = tok(texts, truncation=True, max_length=32)
    return Dataset.from_dict(
        {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "token_type_ids": enc["token_type_ids"],
            "label": labels,
        }
    )


def lm_dataset(n: int = 16, seed: int = 0) -> Dataset:
    tok = make_tokenizer("llama")
    enc = tok(sentences(n, seed), truncation=True, max_length=32)
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})


@pytest.fixture
def bert_tokenizer():
    return make_tokenizer("bert")


@pytest.fixture
def llama_tokenizer():
    return make_tokenizer("llama")
