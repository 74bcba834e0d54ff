"""Shared pieces of the synthesis configs: per-sample seeds, the run and decoding options, model identity."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field

from torch import nn

from llmkd.content import teacher_key

SEEDING = (
    "Every sample i draws from its own torch.Generator seeded with derive_seed(seed, i, stream) = the first 8 "
    "bytes of SHA-256('llmkd:<stream>:<seed>:<i>') (little-endian, 63 bits); streams: 'start' (random start "
    "token / prompt choice), 'decode' (one uniform per decoding step, even on greedy steps), 'premise', 'text', 'gibbs' (the "
    "visiting order and one uniform per resampled position). Nothing else draws from these generators, so a sample depends on (seed, i, models, config) and not on the "
    "batch size, its neighbours in the batch, or where a run was resumed. Batches are fixed ranges of sample "
    "indices aligned to shards, so a resumed run also repeats the exact float arithmetic of an uninterrupted one. "
    "Under N processes, process r writes shards r, r + N, ...: the same batches as one process, so the merged "
    "dataset equals a one-process run's."
)

# Keys of a config that do not change what is generated: a resume may differ in these.
RUNTIME_KEYS = ("output_dir", "progress_bar")


def derive_seed(seed: int, index: int, stream: str) -> int:
    """A 63-bit seed for one sample and one random stream, independent of batching (see SEEDING)."""
    digest = hashlib.sha256(f"llmkd:{stream}:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def option(text: str, default=None, factory=None):
    """A dataclass field with its help text (read by the CLI's --help and the docs)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def check_int(name: str, value, low: int, high: float = math.inf, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    if not ok:
        upper = "" if high == math.inf else f" and <= {high}"
        none = " (or null)" if allow_none else ""
        raise ValueError(f"{name} must be an integer >= {low}{upper}{none}, got {value!r}")


def check_float(name: str, value, low: float, high: float, low_open=False, allow_none=False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be a number in {bracket}{low}, {high}], got {value!r}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


@dataclass
class RunOptions:
    """Where a synthesis run writes, its seed and how it batches (shared by every method)."""

    output_dir: str | None = option(
        "Folder for shards, progress.json, the `datasets` dataset (dataset/) and provenance.json. Required."
    )
    seed: int = option("Base seed (>= 0); each sample derives its own seed from (seed, sample index).", 0)
    batch_size: int = option("Samples decoded (or labelled) together (>= 1).", 8)
    shard_size: int = option(
        "Sample indices per shard file (>= 1, a multiple of batch_size); an interrupted run loses at most one "
        "shard of work. Under several processes, process r writes shards r, r + world, r + 2 world, ...",
        256,
    )
    progress_bar: bool = option("Show a tqdm bar with samples/s and tokens/s.", True)

    def check_run_options(self) -> None:
        if not self.output_dir or not isinstance(self.output_dir, str):
            raise ValueError(f"output_dir must be a folder path, got {self.output_dir!r}")
        check_int("seed", self.seed, 0)
        check_int("batch_size", self.batch_size, 1)
        check_int("shard_size", self.shard_size, 1)
        if self.shard_size % self.batch_size:
            raise ValueError(
                f"shard_size ({self.shard_size}) must be a multiple of batch_size ({self.batch_size}) so that "
                f"batches never straddle shards; try shard_size={self.batch_size * max(1, self.shard_size // self.batch_size)}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict:
        """The settings that decide the output: a resume must match them exactly."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_KEYS}


@dataclass
class GenerationOptions(RunOptions):
    """RunOptions plus how a causal LM decodes (teacher sampling, ZeroGen's generator)."""

    max_new_tokens: int = option(
        "Most tokens generated per sequence (>= 1); generation stops earlier at EOS.", 64
    )
    do_sample: bool = option("Sample after the greedy prefix; false decodes every token greedily.", True)
    greedy_tokens: int = option(
        "Decode the first N generated tokens greedily, then sample (LLM-QAT uses 3-5; >= 0).", 0
    )
    temperature: float = option("Sampling temperature (> 0); 1 samples the teacher's distribution.", 1.0)
    top_k: int = option("Sample among the k most likely tokens only (>= 0; 0 = off).", 0)
    top_p: float = option("Nucleus sampling: the smallest set with probability >= top_p (0 < p <= 1).", 1.0)

    def check_generation_options(self) -> None:
        self.check_run_options()
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_int("greedy_tokens", self.greedy_tokens, 0)
        check_float("temperature", self.temperature, 0.0, math.inf, low_open=True)
        check_int("top_k", self.top_k, 0)
        check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)


@dataclass
class LabelFilters:
    """How a classifier teacher labels synthetic texts and which ones are kept (`llmkd.data.synthesis.filters`)."""

    teacher_max_length: int = option("Truncate teacher inputs to this many tokens (>= 1).", 128)
    min_confidence: float = option("Keep texts whose teacher max probability is >= this (0..1).", 0.0)
    min_words: int = option("Drop texts with fewer words (>= 0).", 1)
    max_words: int | None = option("Drop texts with more words (>= min_words; null = no bound).", None)
    min_tokens: int = option("Drop texts with fewer teacher tokens, specials excluded (>= 0).", 1)
    max_tokens: int | None = option(
        "Drop texts with more teacher tokens (>= min_tokens; null = no bound).", None
    )
    deduplicate: bool = option("Drop exact (normalised) and near duplicates, keeping the first.", True)
    near_duplicate_threshold: float | None = option(
        "Near duplicate: character-shingle Jaccard similarity >= this with a kept text (0 < t <= 1; null = "
        "exact duplicates only).",
        0.8,
    )
    shingle_size: int = option("Characters per shingle for near-duplicate detection (>= 1).", 5)
    balance: bool = option("Cap every class at the smallest (non-empty) class's count.", True)
    per_class: int | None = option(
        "Cap every class at this many rows instead (>= 1; null = as balance says).", None
    )
    hard_fraction = 0.0  # not a field: no student mining here, but filters.select reads it

    def check_label_filters(self) -> None:
        check_int("teacher_max_length", self.teacher_max_length, 1)
        check_float("min_confidence", self.min_confidence, 0.0, 1.0)
        check_int("min_words", self.min_words, 0)
        check_int("max_words", self.max_words, self.min_words, allow_none=True)
        check_int("min_tokens", self.min_tokens, 0)
        check_int("max_tokens", self.max_tokens, self.min_tokens, allow_none=True)
        check_float(
            "near_duplicate_threshold", self.near_duplicate_threshold, 0.0, 1.0, True, allow_none=True
        )
        check_int("shingle_size", self.shingle_size, 1)
        check_int("per_class", self.per_class, 1, allow_none=True)


def special_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer puts before and after one text ([CLS] / [SEP], <s> / </s>, ...)."""
    marker = tokenizer.mask_token or tokenizer.unk_token
    marker_id = tokenizer.convert_tokens_to_ids(marker) if marker else None
    ids = list(tokenizer(marker)["input_ids"]) if marker else []
    if marker_id is None or ids.count(marker_id) != 1:
        raise ValueError(
            f"cannot tell which special tokens {type(tokenizer).__name__} wraps a text in: it needs a mask or "
            "unk token that it encodes as one id"
        )
    cut = ids.index(marker_id)
    return ids[:cut], ids[cut + 1 :]


def decoding_record(options: GenerationOptions) -> dict:
    """The decoding settings, for provenance.json's `generation` entry."""
    keys = ("max_new_tokens", "do_sample", "greedy_tokens", "temperature", "top_k", "top_p")
    return {k: getattr(options, k) for k in keys}


def model_identity(model) -> dict:
    """Name, Hub revision, class and a hash of the weights in memory of a model (or the name of a plain callable).

    The weights hash catches a model changed after it was loaded (or built in memory), which its folder's content
    key cannot see; it costs one pass over the parameters (about 0.2 s for a 135M model in bf16).
    """
    config = getattr(model, "config", None)
    if config is None:
        return {"callable": getattr(model, "__qualname__", type(model).__qualname__)}
    return {
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "revision": getattr(config, "_commit_hash", None),
        "class": type(model).__name__,
        "weights": teacher_key(model) if isinstance(model, nn.Module) else None,
    }


def tokenizer_identity(tokenizer) -> dict:
    return {
        "name_or_path": getattr(tokenizer, "name_or_path", None) or None,
        "class": type(tokenizer).__name__,
    }
