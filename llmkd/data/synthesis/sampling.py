"""Data-free transfer sets sampled from a causal-LM teacher.

LLM-QAT (Liu et al. 2023, arXiv 2305.17888): start each sequence from a random vocabulary token, decode the
first few tokens greedily (so the text settles into something the teacher finds likely) and sample the rest.
Magpie (Xu et al. 2024, arXiv 2406.08464): an instruct teacher given only its chat template up to the user's
text writes a plausible user turn itself. Optionally the teacher's top-k log-probabilities are stored per
position, so training can distil from them without running the teacher again."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from datasets import Dataset, Features, List, Value

from llmkd.data.collate import padding_id
from llmkd.data.synthesis.common import (
    GenerationOptions,
    check_choice,
    check_int,
    decoding_record,
    derive_seed,
    model_identity,
    option,
    tokenizer_identity,
)
from llmkd.data.synthesis.decoding import eos_token_ids, sample_batch
from llmkd.data.synthesis.io import (
    finished_dataset,
    open_run,
    provenance,
    read_rows,
    run_shards,
    save_dataset,
)

logger = logging.getLogger(__name__)
STARTS = ("random_token", "chat_template")
METHOD = "teacher_sampling"
SENTINEL = "LLMKDUSERTURNSENTINEL"


@dataclass
class SamplingConfig(GenerationOptions):
    """How to sample a transfer set from a causal-LM teacher (`sample_teacher`)."""

    num_samples: int | None = option(
        "Sample budget: sequences to generate (>= 1); null runs until max_total_tokens is spent.", 1000
    )
    max_total_tokens: int | None = option(
        "Token budget: generated tokens over all rows (>= 1; prompts not counted); null = no token budget. "
        "Rows are kept in sample-index order while they fit; the first that does not fit ends the run.",
        None,
    )
    start: str = option(
        "How a sequence starts: random_token (LLM-QAT: [BOS] + one random non-special token) or chat_template "
        "(Magpie: the chat template up to the user's text, so the teacher writes the user turn).",
        "random_token",
    )
    prepend_bos: bool = option("With start=random_token: put the tokenizer's BOS (if any) before it.", True)
    greedy_tokens: int = option(
        "Decode the first N generated tokens greedily, then sample (LLM-QAT uses 3-5; >= 0).", 3
    )
    store_topk: int = option(
        "Store the teacher's k most likely token ids and log-probs (temperature 1, before top-k/top-p "
        "filtering) at every generated position (>= 0; 0 = off).",
        0,
    )

    def __post_init__(self):
        self.check_generation_options()
        check_int("num_samples", self.num_samples, 1, allow_none=True)
        check_int("max_total_tokens", self.max_total_tokens, 1, allow_none=True)
        if self.num_samples is None and self.max_total_tokens is None:
            raise ValueError("no budget: set num_samples, max_total_tokens, or both (the first reached wins)")
        check_choice("start", self.start, STARTS)
        check_int("store_topk", self.store_topk, 0)


def sample_teacher(teacher, tokenizer, config: SamplingConfig) -> Dataset:
    """Samples a transfer set from `teacher` into config.output_dir and returns it as a `datasets.Dataset`.

    Columns: sample_index, input_ids (prompt + generated, EOS included when produced), prompt_length,
    num_generated, finish_reason ('eos' | 'length'), text (the generated part, special tokens skipped) and,
    with store_topk=k, topk_ids / topk_logprobs of shape (num_generated, k): position j is the teacher's
    distribution over input_ids[prompt_length + j]. Resumes an interrupted run in the same output_dir."""
    eos = eos_token_ids(teacher, tokenizer)
    if not eos:
        logger.warning("the teacher and tokenizer define no EOS token: every row runs to max_new_tokens")
    fingerprint = config.fingerprint() | {
        "method": METHOD,
        "teacher": model_identity(teacher),
        "tokenizer": tokenizer_identity(tokenizer),
        "eos_token_ids": sorted(eos),
    }
    produce = _producer(teacher, tokenizer, config, eos)  # bad start settings fail before any file is written
    saved = finished_dataset(config.output_dir, open_run(config.output_dir, fingerprint))
    if saved is not None:
        return saved
    progress = run_shards(
        config.output_dir,
        fingerprint,
        produce,
        shard_size=config.shard_size,
        num_samples=config.num_samples,
        max_total_tokens=config.max_total_tokens,
        row_tokens=lambda row: row["num_generated"],
        progress_bar=config.progress_bar,
        desc="sampling teacher",
    )
    rows = read_rows(config.output_dir, progress)
    dataset = Dataset.from_list(rows, features=features(config.store_topk))
    record = provenance(
        METHOD,
        config,
        {
            "teacher": model_identity(teacher),
            "tokenizer": tokenizer_identity(tokenizer),
            "generator_kind": "teacher_causal_lm",  # the teacher writes its own transfer set
        },
        generation=_generation_record(config, eos),
        budgets={"num_samples": config.num_samples, "max_total_tokens": config.max_total_tokens},
        filter_stats=_stats(rows),
        num_tokens=progress["tokens"],
    )
    return save_dataset(config.output_dir, dataset, record, progress)


def _producer(teacher, tokenizer, config: SamplingConfig, eos: set[int]):
    """produce(indices) for run_shards: decodes the indices batch by batch, yielding row dicts."""
    pad = padding_id(tokenizer)
    if config.start == "chat_template":
        prefix = chat_template_prefix(tokenizer)
        if config.greedy_tokens or not config.do_sample:
            logger.warning(
                "start=chat_template with greedy steps: every row shares the same prompt, so the first "
                "%s tokens are identical in all rows; set greedy_tokens=0 and do_sample=true",
                config.greedy_tokens if config.do_sample else config.max_new_tokens,
            )
    else:
        candidates = start_candidates(tokenizer, _vocab_size(teacher))

    def produce(indices):
        for first in range(0, len(indices), config.batch_size):
            batch = list(indices[first : first + config.batch_size])
            if config.start == "chat_template":
                prompts = [list(prefix) for _ in batch]
            else:
                prompts = [random_start(tokenizer, candidates, config, i) for i in batch]
            seeds = [derive_seed(config.seed, i, "decode") for i in batch]
            results = sample_batch(
                teacher, prompts, seeds, config, eos_ids=eos, pad_id=pad, store_topk=config.store_topk
            )
            yield [_row(i, p, r, tokenizer) for i, p, r in zip(batch, prompts, results)]

    return produce


def _row(index: int, prompt: list[int], result: dict, tokenizer) -> dict:
    generated = result["generated_ids"]
    row = {
        "sample_index": index,
        "input_ids": prompt + generated,
        "prompt_length": len(prompt),
        "num_generated": len(generated),
        "finish_reason": result["finish_reason"],
        "text": tokenizer.decode(generated, skip_special_tokens=True),
    }
    if "topk_ids" in result:
        row["topk_ids"], row["topk_logprobs"] = result["topk_ids"], result["topk_logprobs"]
    return row


def random_start(tokenizer, candidates: list[int], config: SamplingConfig, index: int) -> list[int]:
    """[BOS] + one token drawn uniformly from `candidates` with sample `index`'s own 'start' stream."""
    generator = torch.Generator().manual_seed(derive_seed(config.seed, index, "start"))
    token = candidates[int(torch.randint(len(candidates), (1,), generator=generator))]
    bos = tokenizer.bos_token_id
    return ([bos] if config.prepend_bos and bos is not None else []) + [token]


def start_candidates(tokenizer, vocab_size: int) -> list[int]:
    """Token ids a sequence may start from: the vocabulary without special or added-special tokens."""
    special = set(tokenizer.all_special_ids)
    special |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    candidates = [i for i in range(min(len(tokenizer), vocab_size)) if i not in special]
    if not candidates:
        raise ValueError("the tokenizer has no non-special tokens to start from; use start=chat_template")
    return candidates


def chat_template_prefix(tokenizer) -> list[int]:
    """Magpie's pre-query template: the chat template rendered up to where the user's text would begin."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "start=chat_template needs a tokenizer with a chat template (an instruct model's); this one has "
            "none. Use start=random_token"
        )
    text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False)
    if SENTINEL not in text:
        raise ValueError("the chat template does not render the user's content; use start=random_token")
    ids = tokenizer(text[: text.index(SENTINEL)], add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the chat template renders nothing before the user's text; use start=random_token")
    return list(ids)


def _vocab_size(model) -> int:
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(model.config.vocab_size)


def features(store_topk: int) -> Features:
    columns = {
        "sample_index": Value("int64"),
        "input_ids": List(Value("int32")),
        "prompt_length": Value("int32"),
        "num_generated": Value("int32"),
        "finish_reason": Value("string"),
        "text": Value("string"),
    }
    if store_topk:
        columns["topk_ids"] = List(List(Value("int32")))
        columns["topk_logprobs"] = List(List(Value("float32")))
    return Features(columns)


def _generation_record(config: SamplingConfig, eos: set[int]) -> dict:
    starts = {"start": config.start, "prepend_bos": config.prepend_bos, "store_topk": config.store_topk}
    return decoding_record(config) | starts | {"eos_token_ids": sorted(eos)}


def _stats(rows: list[dict]) -> dict:
    return {
        "rows": len(rows),
        "finished_eos": sum(r["finish_reason"] == "eos" for r in rows),
        "finished_length": sum(r["finish_reason"] == "length" for r in rows),
    }
