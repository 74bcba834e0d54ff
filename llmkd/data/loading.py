"""Datasets for distillation: local csv/tsv/json/jsonl/parquet files or a `datasets` name, tokenised once."""

from __future__ import annotations

import codecs
import difflib
import functools
import os
from collections import Counter
from collections.abc import Mapping

import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Value, load_dataset, load_from_disk
from datasets.exceptions import DatasetGenerationError

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
        if not _has_content(path):
            raise ValueError(f"{split} file {path!r} is empty; write its rows or point elsewhere")
        # GLUE's .tsv files are not quoted: a sentence may start with a quote character (quoting=3 = QUOTE_NONE).
        kwargs = {"delimiter": "\t", "quoting": 3} if suffix == ".tsv" else {}
        try:
            out[split] = load_dataset(FORMATS[suffix], data_files={split: path}, split=split, **kwargs)
            out[split].data.table.validate(full=True)  # Arrow's JSON reader lets bytes that are not UTF-8 in
        except (ValueError, DatasetGenerationError) as err:  # UnicodeDecodeError, ArrowInvalid: ValueErrors
            raise ValueError(_unreadable(split, path, FORMATS[suffix], err)) from err
        if len(out[split]) == 0:
            raise ValueError(f"{split} file {path!r} has no rows, only a header; write its rows")
    return DatasetDict(out)


def _has_content(path: str) -> bool:
    """Whether the file holds anything but whitespace (read until the first other byte)."""
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 16):
            if chunk.strip():
                return True
    return False


def _unreadable(split: str, path: str, kind: str, err: Exception) -> str:
    """Why a data file could not be read, with the fix: its first byte that is not UTF-8, or the reader's cause."""
    decoder, offset, line = codecs.getincrementaldecoder("utf-8")(), 0, 1
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 16):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as bad:
                line += chunk[: bad.start].count(b"\n")
                return (
                    f"{split} file {path!r} is not UTF-8 text: byte {chunk[bad.start]:#04x} on line {line} (byte "
                    f"{offset + bad.start}); re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8 IN > OUT"
                )
            offset, line = offset + len(chunk), line + chunk.count(b"\n")
    with open(path, "rb") as handle:
        lines = sum(1 for line in handle if line.strip())
    if kind == "csv" and lines <= 1:
        return f"{split} file {path!r} has no rows, only a header; write its rows"
    cause = err
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    expected = {"csv": "a header row, then one row per line", "json": "one JSON object per line (.jsonl)"}
    return (
        f"{split} file {path!r} could not be read as {kind}: {type(cause).__name__}: {cause}; check that it "
        f"holds {expected.get(kind, 'a ' + kind + ' table')}"
    )


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
    if message := missing_columns(dataset, needed):
        raise ValueError(message)
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


def missing_columns(dataset: Dataset, needed, where: str = "the data") -> str | None:
    """The message for `needed` columns that `dataset` lacks (with the closest names it has), else None."""
    missing = [c for c in needed if c not in dataset.column_names]
    if not missing:
        return None
    close = {c: difflib.get_close_matches(c, dataset.column_names, n=1) for c in missing}
    hints = [f"{c!r} (did you mean {m[0]!r}?)" if m else repr(c) for c, m in close.items()]
    return (
        f"{where}: {'column' if len(hints) == 1 else 'columns'} {', '.join(hints)} not in the data, which has {dataset.column_names}; set "
        "text_columns / label_column to the data's names (or rename the file's columns)"
    )


def check_texts(dataset: Dataset, text_columns, task: str, where: str = "the data") -> list[str]:
    """The text column names, checked: one (causal LMs) or one or two (classifiers) string columns, present, and
    no row without text (classifiers: nor a row whose texts are all blank). Raises ValueError naming the rows."""
    columns = [text_columns] if isinstance(text_columns, str) else text_columns
    most = 1 if task == CAUSAL_LM else 2
    names = isinstance(columns, (list, tuple)) and all(isinstance(c, str) for c in columns)
    if not names or not 1 <= len(columns) <= most:
        raise ValueError(
            f"text_columns={text_columns!r}: give {'one column name' if most == 1 else 'one or two column names'}"
            " (a sentence or a sentence pair), e.g. text_columns: [sentence]"
        )
    if message := missing_columns(dataset, columns, where):
        raise ValueError(message)
    for column in columns:
        feature = dataset.features[column]
        if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
            raise ValueError(f"{where}: text column {column!r} holds {feature}, not text; name a text column")
    table = dataset.select_columns(columns).with_format("arrow")[:]  # Arrow compute: no Python strings
    missing = [pc.is_null(table[c]) for c in columns]
    blank = [pc.fill_null(pc.equal(pc.utf8_trim_whitespace(table[c]), ""), True) for c in columns]
    bad = functools.reduce(pc.or_, missing)
    if task != CAUSAL_LM:  # causal LMs drop blank lines themselves (wikitext has many)
        bad = pc.or_(bad, functools.reduce(pc.and_, blank))
    empty = pc.indices_nonzero(bad).to_pylist()
    if empty:
        raise ValueError(
            f"{where}: {len(empty)} of {len(dataset)} rows have no text in {columns} (rows {empty[:5]}"
            f"{', ...' if len(empty) > 5 else ''}); fill them in or delete those rows"
        )
    return list(columns)


def check_labels(
    dataset: Dataset, column: str, num_labels: int, label_names=None, where: str = "the data", unlabelled=True
) -> Dataset:
    """`dataset` with its `column` checked against a classifier's label set (whole-number floats cast to int64).

    Valid labels: ids 0..num_labels-1, the model's `label_names`, and -1 for a row without a gold label (as in
    GLUE's test splits; `unlabelled=False` refuses it) unless -1 looks like a class: labelled rows exist but a
    class never occurs among them (e.g. -1/1 labels for two classes). Regression (num_labels = 1): numbers.
    Raises ValueError naming the bad values, how many rows hold them, the label set and the fix.
    """
    feature = dataset.features[column]
    if not isinstance(feature, Value):
        raise ValueError(f"{where}: label column {column!r} holds {feature}; labels are class ids or names")
    names = list(label_names or [])
    ids = {v: _class_id(v, num_labels, names, unlabelled) for v in dataset.unique(column)}
    bad = [v for v, i in ids.items() if i is None]
    seen = {i for i in ids.values() if i is not None and i >= 0}
    absent = sorted(set(range(num_labels)) - seen) if num_labels > 1 else []
    if -1 in ids.values() and seen and absent:  # -1/1 labels: -1 is a class here, not "no label"
        bad.append(next(v for v, i in ids.items() if i == -1))
    if bad:
        counts = Counter(dataset[column])
        rows = sum(counts[v] for v in bad)
        shown = ", ".join(repr(v) for v in sorted(bad, key=repr)[:8])
        space = "numbers (a regression score)" if num_labels == 1 else _label_set(num_labels, names)
        raise ValueError(
            f"{where}: labels {shown} ({rows} of {len(dataset)} rows) are not in the model's label set, {space}; "
            + _label_fix(bad, num_labels, names, absent if unlabelled else [])
        )
    if num_labels > 1 and feature.dtype.startswith("float"):
        return dataset.cast_column(column, Value("int64"))
    return dataset


def _class_id(value, num_labels: int, names: list, unlabelled: bool):
    if isinstance(value, str):
        return names.index(value) if value in names else None
    if value is None or isinstance(value, bool):
        return None
    if num_labels == 1:
        return value
    if isinstance(value, float):
        if not value.is_integer():
            return None
        value = int(value)
    return value if 0 <= value < num_labels or (value == -1 and unlabelled) else None


def _label_set(num_labels: int, names: list) -> str:
    if names:
        return "{" + ", ".join(f"{i}: {n!r}" for i, n in enumerate(names)) + "}"
    return f"ids 0..{num_labels - 1} (no class names)"


def _label_fix(bad: list, num_labels: int, names: list, absent: list) -> str:
    if num_labels == 1:
        return "a regression model reads one number per row: fill in or convert those labels"
    hints = []
    if any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bad):
        hints.append(f"map them to ids 0..{num_labels - 1} (e.g. -1/1 -> 0/1, or 1/2 -> 0/1)")
        if -1 in bad and absent:
            hints.append(f"-1 would mean 'no gold label', but class {absent[0]} never occurs")
    if any(isinstance(v, str) for v in bad):
        unnamed = "the model's classes have no names (LABEL_0, ...): map the text labels to ids, or name them"
        hints.append(f"use the names {names} or their ids" if names else unnamed)
    if any(v is None or isinstance(v, bool) for v in bad):
        hints.append("fill in empty labels (-1 marks a row without a gold label); write ids, not true/false")
    return "; ".join(hints) + "; or give the model the data's classes (class_names for llmkd finetune)"


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
