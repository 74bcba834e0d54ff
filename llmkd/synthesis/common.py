"""Shared pieces of the synthesis configs: per-sample seeds, the run and decoding options, model identity."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field

SEEDING = (
    "Every sample i draws from its own torch.Generator seeded with derive_seed(seed, i, stream) = the first 8 "
    "bytes of SHA-256('llmkd:<stream>:<seed>:<i>') (little-endian, 63 bits); streams: 'start' (random start "
    "token / prompt choice), 'decode' (one uniform per decoding step, even on greedy steps), 'premise', 'text'. "
    "Nothing else draws from these generators, so a sample depends on (seed, i, models, config) and not on the "
    "batch size, its neighbours in the batch, or where a run was resumed. Batches are fixed ranges of sample "
    "indices aligned to shards, so a resumed run also repeats the exact float arithmetic of an uninterrupted one."
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
class GenerationOptions:
    """Where and how a synthesis run writes, and how a causal LM decodes (shared by every method)."""

    output_dir: str | None = option(
        "Folder for shards, progress.json, the `datasets` dataset (dataset/) and provenance.json. Required."
    )
    seed: int = option("Base seed (>= 0); each sample derives its own seed from (seed, sample index).", 0)
    batch_size: int = option("Samples decoded (or labelled) together (>= 1).", 8)
    shard_size: int = option(
        "Sample indices per shard file (>= 1, a multiple of batch_size); an interrupted run loses at most one "
        "shard of work.",
        256,
    )
    progress_bar: bool = option("Show a tqdm bar with samples/s and tokens/s.", True)
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
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_int("greedy_tokens", self.greedy_tokens, 0)
        check_float("temperature", self.temperature, 0.0, math.inf, low_open=True)
        check_int("top_k", self.top_k, 0)
        check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict:
        """The settings that decide the output: a resume must match them exactly."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_KEYS}


def decoding_record(options: GenerationOptions) -> dict:
    """The decoding settings, for provenance.json's `generation` entry."""
    keys = ("max_new_tokens", "do_sample", "greedy_tokens", "temperature", "top_k", "top_p")
    return {k: getattr(options, k) for k in keys}


def model_identity(model) -> dict:
    """Name, Hub revision and class of a model (or the name of a plain callable)."""
    config = getattr(model, "config", None)
    if config is None:
        return {"callable": getattr(model, "__qualname__", type(model).__qualname__)}
    return {
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "revision": getattr(config, "_commit_hash", None),
        "class": type(model).__name__,
    }


def tokenizer_identity(tokenizer) -> dict:
    return {
        "name_or_path": getattr(tokenizer, "name_or_path", None) or None,
        "class": type(tokenizer).__name__,
    }
