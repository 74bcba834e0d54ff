"""Datasets for distillation: local csv/tsv/json/jsonl/parquet files or a `datasets` name, tokenised once."""

from __future__ import annotations

import os
from collections.abc import Mapping

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from llmkd.modeling import CAUSAL_LM

FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_raw(train_file=None, validation_file=None, dataset_name=None, dataset_config=None) -> DatasetDict:
    """Splits 'train' and (optionally) 'validation' from local files or a dataset name."""
    if dataset_name:
        data = load_dataset(dataset_name, dataset_config)
        if "validation" not in data and "test" in data:
            data["validation"] = data["test"]
        return DatasetDict({k: v for k, v in data.items() if k in ("train", "validation")})
    if not train_file:
        raise ValueError("no data: set train_file (csv/tsv/json/jsonl/parquet) or dataset_name")
    return read_files({"train": train_file} | ({"validation": validation_file} if validation_file else {}))


def read_files(data_files: Mapping[str, str]) -> DatasetDict:
    """{split: path} of csv/tsv/json/jsonl/parquet files or saved datasets (folders) as a DatasetDict."""
    out = {}
    for split, path in data_files.items():
        if os.path.isdir(path):  # a dataset saved with save_to_disk, e.g. by `llmkd generate`
            out[split] = load_from_disk(path)
            continue
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in FORMATS:
            raise ValueError(f"{split} file {path!r}: use one of {sorted(FORMATS)}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{split} file {path!r} does not exist")
        # GLUE's .tsv files are not quoted: a sentence may start with a quote character (quoting=3 = QUOTE_NONE).
        kwargs = {"delimiter": "\t", "quoting": 3} if suffix == ".tsv" else {}
        out[split] = load_dataset(FORMATS[suffix], data_files={split: path}, split=split, **kwargs)
    return DatasetDict(out)


def tokenize(
    dataset: Dataset,
    tokenizer,
    task: str,
    text_columns,
    label_column="label",
    max_length=128,
    label_names=None,
) -> Dataset:
    """Token ids (+ integer labels for classifiers; names are mapped through `label_names`).

    Causal LMs get their labels from the collator."""
    text_columns = [text_columns] if isinstance(text_columns, str) else list(text_columns)
    needed = text_columns + ([label_column] if task != CAUSAL_LM and label_column else [])
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"columns {missing} are not in the data, which has {dataset.column_names}; set text_columns / "
            "label_column to the right names"
        )
    if len(dataset) == 0:
        raise ValueError("the dataset is empty; check the data files")
    if task == CAUSAL_LM and len(text_columns) != 1:
        raise ValueError(f"causal LM distillation takes one text column, got {text_columns}")

    def encode(batch):
        texts = [batch[c] for c in text_columns]
        out = tokenizer(*texts, truncation=True, max_length=max_length)
        if task != CAUSAL_LM and label_column:
            out["label"] = [label_id(v, label_names) for v in batch[label_column]]
        return out

    keep = [c for c in dataset.column_names if c == "label" and task != CAUSAL_LM]
    remove = [c for c in dataset.column_names if c not in keep]
    return dataset.map(encode, batched=True, remove_columns=remove, desc="tokenising")


def label_id(value, label_names):
    """Integer labels pass through; names are looked up in the model's label order."""
    if not isinstance(value, str):
        return value
    if not label_names or value not in label_names:
        raise ValueError(
            f"label {value!r} is not one of the model's labels {label_names}; use ids or those names"
        )
    return label_names.index(value)


# ---- prompt/completion data (on-policy distillation, sequence-level KD) ---------------------------------------

PROMPT_LENGTH = "prompt_length"


def tokenize_prompt_completion(
    dataset: Dataset,
    tokenizer,
    *,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    max_length: int = 512,
    max_prompt_length: int | None = None,
    add_eos: bool = True,
) -> Dataset:
    """Rows of `input_ids`, `attention_mask`, `labels` (-100 on the prompt) and `prompt_length`.

    The prompt is tokenised with the tokenizer's special tokens (e.g. BOS), the completion without them and
    followed by EOS (`add_eos`), so that the student learns where to stop. Rows with a chat `messages` column
    (and no prompt column) go through the tokenizer's chat template: every message but the last is the prompt
    (with the generation prompt), the last one is the completion. `max_prompt_length` keeps a prompt's last
    tokens; the completion is cut so that the row fits `max_length`."""
    chat = prompt_column not in dataset.column_names and "messages" in dataset.column_names
    needed = ["messages"] if chat else [prompt_column, completion_column]
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"columns {missing} are not in the data, which has {dataset.column_names}; prompt/completion data "
            "needs a prompt and a completion column (set prompt_column / completion_column) or chat 'messages'"
        )
    if len(dataset) == 0:
        raise ValueError("the dataset is empty; check the data files")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the data has chat 'messages' but the tokenizer has no chat_template; use prompt/completion"
        )
    eos = [tokenizer.eos_token_id] if add_eos and not chat and tokenizer.eos_token_id is not None else []

    def encode(batch, indices):
        pairs = (
            _chat_pairs(batch["messages"], tokenizer)
            if chat
            else zip(batch[prompt_column], batch[completion_column])
        )
        out = {"input_ids": [], "attention_mask": [], "labels": [], PROMPT_LENGTH: []}
        for index, (prompt, completion) in zip(indices, pairs):
            prompt_ids = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
            prompt_ids = prompt_ids[-max_prompt_length:] if max_prompt_length else prompt_ids
            if not 0 < len(prompt_ids) < max_length:
                raise ValueError(
                    f"row {index}: the prompt has {len(prompt_ids)} tokens, but it needs at least one and fewer "
                    f"than max_length={max_length}; raise max_length or set max_prompt_length"
                )
            completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
            completion_ids = completion_ids[: max_length - len(prompt_ids)]
            out["input_ids"].append(prompt_ids + completion_ids)
            out["attention_mask"].append([1] * (len(prompt_ids) + len(completion_ids)))
            out["labels"].append([-100] * len(prompt_ids) + completion_ids)
            out[PROMPT_LENGTH].append(len(prompt_ids))
        return out

    return dataset.map(
        encode, batched=True, with_indices=True, remove_columns=dataset.column_names, desc="tokenising"
    )


def _chat_pairs(conversations, tokenizer):
    """(prompt text, completion text) per conversation: the last message is the completion, template included."""
    for messages in conversations:
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError(
                "the chat template renders the conversation without its prompt as a prefix; use prompt/completion"
            )
        yield prompt, full[len(prompt) :]


# ---- one example, two tokenizers (cross-tokenizer distillation) ---------------------------------------------


def encode_example(tokenizer, prompt: str | None, completion: str, max_length: int, add_eos: bool):
    """(input_ids, labels) of one example: the prompt (with the tokenizer's special tokens) is not supervised.

    Without a prompt the whole text is supervised. The two parts are tokenised separately so that the prompt
    boundary is exact on both sides; put the separating space at the start of the completion.
    """
    if prompt is None:
        ids, start = tokenizer(completion)["input_ids"], 0
    else:
        ids = tokenizer(prompt)["input_ids"]
        start = len(ids)
        ids = ids + tokenizer(completion, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    ids = ids[:max_length]
    return ids, [-100] * min(start, len(ids)) + ids[start:]


def tokenize_pairs(
    dataset,
    tokenizer,
    teacher_tokenizer,
    *,
    text_column: str = "text",
    prompt_column: str | None = None,
    completion_column: str | None = None,
    max_length: int = 128,
    add_eos: bool = True,
):
    """Tokenises every row with both tokenizers: input_ids/attention_mask/labels and the teacher_* columns.

    Prompt/completion data (``prompt_column`` and ``completion_column``): only completion tokens are targets.
    Plain text (``text_column``): every token after the first is a target; both tokenizers should then add a
    BOS token (or neither), else the first target of one side is the second word of the other.
    """
    if (prompt_column is None) != (completion_column is None):
        raise ValueError("set both prompt_column and completion_column, or neither (plain text_column)")
    columns = [prompt_column, completion_column] if prompt_column else [text_column]
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"columns {missing} are not in the data, which has {dataset.column_names}")

    def encode(batch):
        prompts = batch[prompt_column] if prompt_column else [None] * len(batch[columns[-1]])
        out = {}
        for prefix, tok in (("", tokenizer), ("teacher_", teacher_tokenizer)):
            pairs = [
                encode_example(tok, p, c, max_length, add_eos) for p, c in zip(prompts, batch[columns[-1]])
            ]
            out[f"{prefix}input_ids"] = [ids for ids, _ in pairs]
            out[f"{prefix}attention_mask"] = [[1] * len(ids) for ids, _ in pairs]
            out[f"{prefix}labels"] = [labels for _, labels in pairs]
        return out

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenising twice")
