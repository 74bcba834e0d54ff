"""Datasets for distillation: local csv/tsv/json/jsonl/parquet files or a `datasets` name, tokenised once."""

from __future__ import annotations

import os
from collections.abc import Mapping

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding

from llmkd.alignment import CAUSAL_LM

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


def collator_for(task: str, tokenizer):
    if task == CAUSAL_LM:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return DataCollatorWithPadding(tokenizer)
