"""Data-free transfer sets for a classifier teacher: ZeroGen (Ye et al. 2022, arXiv 2202.07922).

A generator LM writes task-like text from label-descriptive prompts ('The movie review in positive sentiment
is: "'); for pair tasks it first writes a premise, then a hypothesis from a prompt that states the intended
relation. The classifier teacher soft-labels every candidate, the filters of `llmkd.data.synthesis.filters` keep
the good ones, and an optional student steers part of each class towards where it disagrees most with the
teacher. Generation and labelling are sharded and resumable; filtering runs once over all candidates."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch
from datasets import Dataset, Features, List, Value

from llmkd.data.collate import DistillationCollator, padding_id
from llmkd.data.synthesis import filters
from llmkd.data.synthesis.common import (
    GenerationOptions,
    LabelFilters,
    check_float,
    check_int,
    decoding_record,
    derive_seed,
    model_identity,
    option,
    tokenizer_identity,
)
from llmkd.data.synthesis.decoding import eos_token_ids, eval_mode, sample_batch
from llmkd.data.synthesis.io import (
    finished_dataset,
    open_run,
    provenance,
    read_rows,
    run_shards,
    save_dataset,
)

logger = logging.getLogger(__name__)
METHOD = "zerogen"
SENTIMENT_PROMPTS = {
    "negative": ['The movie review in negative sentiment is: "', 'A negative movie review: "'],
    "positive": ['The movie review in positive sentiment is: "', 'A positive movie review: "'],
}
NLI_PREMISE_PROMPTS = ['Sentence 1: "']
NLI_PROMPTS = {
    "entailment": ['Sentence 1: "{premise}"\nSentence 2, which is implied by sentence 1: "'],
    "neutral": ['Sentence 1: "{premise}"\nSentence 2, which may or may not be true given sentence 1: "'],
    "contradiction": ['Sentence 1: "{premise}"\nSentence 2, which contradicts sentence 1: "'],
}


@dataclass
class ZeroGenConfig(GenerationOptions, LabelFilters):
    # The filter fields (teacher_max_length, min_confidence, lengths, dedup, balance, per_class) are LabelFilters'.
    """How to generate, label and filter a classifier transfer set (`zerogen_dataset`)."""

    num_candidates: int = option("Candidates to generate and label before filtering (>= 1).", 1000)
    label_prompts: dict = option(
        "Per teacher label (a name from the teacher's id2label, or an id): a prompt or a list of prompts. "
        "Pair tasks put {premise} in every prompt. Candidate i is meant to be of the (i mod n)-th label.",
        factory=lambda: {k: list(v) for k, v in SENTIMENT_PROMPTS.items()},
    )
    premise_prompts: list | None = option(
        "Pair tasks (NLI): prompts for the first sentence, which fills {premise}; null = single sentences.",
        None,
    )
    stop_strings: list = option(
        "Generated text is cut at the first of these (the prompts open a quote, so a closing quote ends it).",
        factory=lambda: ['"', "\n"],
    )
    max_new_tokens: int = option("Most tokens the generator writes per text (>= 1).", 40)
    top_p: float = option("Generator nucleus sampling (0 < p <= 1; ZeroGen uses 0.9).", 0.9)
    require_agreement: bool = option("Keep only candidates the teacher labels as the prompt intended.", False)
    hard_fraction: float = option(
        "With a student: this fraction (0..1) of each class's kept rows are those with the highest "
        "KL(teacher || student); matters when a class cap binds.",
        0.0,
    )

    def __post_init__(self):
        self.check_generation_options()
        check_int("num_candidates", self.num_candidates, 1)
        _check_prompts(self.label_prompts, self.premise_prompts)
        if not isinstance(self.stop_strings, (list, tuple)) or not all(
            isinstance(s, str) and s for s in self.stop_strings
        ):
            raise ValueError(f"stop_strings must be a list of non-empty strings, got {self.stop_strings!r}")
        self.check_label_filters()
        check_float("hard_fraction", self.hard_fraction, 0.0, 1.0)


def _check_prompts(label_prompts, premise_prompts) -> None:
    if not isinstance(label_prompts, dict) or not label_prompts:
        raise ValueError(
            f"label_prompts must map labels to prompts, e.g. {SENTIMENT_PROMPTS}, got {label_prompts!r}"
        )
    pair = premise_prompts is not None
    if pair and (not isinstance(premise_prompts, (list, tuple)) or not premise_prompts):
        raise ValueError(
            f"premise_prompts must be a non-empty list of prompts or null, got {premise_prompts!r}"
        )
    for label, prompts in label_prompts.items():
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if (
            not isinstance(prompts, (list, tuple))
            or not prompts
            or any(not isinstance(p, str) for p in prompts)
        ):
            raise ValueError(f"label_prompts[{label!r}] must be a prompt or a non-empty list of prompts")
        for prompt in prompts:
            if pair != ("{premise}" in prompt):
                need = "must contain {premise}" if pair else "contains {premise} but premise_prompts is null"
                raise ValueError(f"label_prompts[{label!r}] prompt {prompt!r} {need}")


class ModelGenerator:
    """A causal LM as a ZeroGen generator: (prompts, seeds) -> texts, one seeded random stream per text."""

    def __init__(self, model, tokenizer, options):
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.eos = eos_token_ids(model, tokenizer)
        self.pad = padding_id(tokenizer)

    def __call__(self, prompts: list[str], seeds: list[int]) -> list[str]:
        ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        results = sample_batch(self.model, ids, seeds, self.options, eos_ids=self.eos, pad_id=self.pad)
        return [self.tokenizer.decode(r["generated_ids"], skip_special_tokens=True) for r in results]


def zerogen_dataset(
    teacher,
    tokenizer,
    generator,
    config: ZeroGenConfig,
    *,
    generator_tokenizer=None,
    student=None,
    student_tokenizer=None,
) -> Dataset:
    """Generates, labels and filters a classifier transfer set into config.output_dir; returns the dataset.

    `generator` is a causal LM (with `generator_tokenizer`) or any callable (prompts, seeds) -> texts. Columns:
    sample_index, text (+ text_pair for pair tasks), label (teacher argmax), teacher_probs, intended_label,
    prompt and, with a student, teacher_student_kl and hard (chosen for its KL). Resumes an interrupted run."""
    labels = resolve_labels(config.label_prompts, teacher.config)
    write = _as_callable(generator, generator_tokenizer, config)
    if student is None and config.hard_fraction > 0:
        logger.warning("hard_fraction=%s does nothing without a student; pass student=", config.hard_fraction)
    if student is not None and student.config.num_labels != teacher.config.num_labels:
        raise ValueError(
            f"the student has {student.config.num_labels} labels and the teacher {teacher.config.num_labels}; "
            "hard-sample mining needs the same label set"
        )
    identities = {
        "teacher": model_identity(teacher),
        "tokenizer": tokenizer_identity(tokenizer),
        "generator_kind": "causal_lm" if isinstance(write, ModelGenerator) else "callable",
        "generator": model_identity(generator),
        "generator_tokenizer": None
        if generator_tokenizer is None
        else tokenizer_identity(generator_tokenizer),
        "student": None if student is None else model_identity(student),
    }
    fingerprint = config.fingerprint() | identities | {"method": METHOD, "label_ids": [i for i, _ in labels]}
    saved = finished_dataset(config.output_dir, open_run(config.output_dir, fingerprint))
    if saved is not None:
        return saved
    progress = run_shards(
        config.output_dir,
        fingerprint,
        lambda indices: _batches(teacher, tokenizer, write, config, labels, indices),
        shard_size=config.shard_size,
        num_samples=config.num_candidates,
        row_tokens=lambda row: sum(row["num_tokens"]),
        progress_bar=config.progress_bar,
        desc="zerogen candidates",
    )
    kept, stats = filter_candidates(
        read_rows(config.output_dir, progress), config, teacher, student, student_tokenizer or tokenizer
    )
    dataset = Dataset.from_list([_public(c) for c in kept], features=features(config, student is not None))
    generation = decoding_record(config) | {"stop_strings": list(config.stop_strings)}
    if isinstance(write, ModelGenerator):
        generation["eos_token_ids"] = sorted(write.eos)
    budgets = {"num_candidates": config.num_candidates}
    record = provenance(
        METHOD, config, identities, generation=generation, budgets=budgets, filter_stats=stats
    )
    return save_dataset(config.output_dir, dataset, record, progress)


def filter_candidates(candidates, config, teacher, student=None, student_tokenizer=None) -> tuple[list, dict]:
    """Screens the labelled candidates, scores survivors against the student, balances; (kept, stats)."""
    stats = filters.new_stats(len(candidates))
    survivors = filters.screen(candidates, config, stats)
    if student is not None:
        add_student_kl(survivors, student, student_tokenizer, config)
    return filters.select(survivors, config, teacher.config.num_labels, stats), stats


def resolve_labels(label_prompts: dict, model_config) -> list[tuple[int, list[str]]]:
    """(teacher label id, prompts) per label_prompts key, keyed by the teacher's names or by ids."""
    names = {str(name): int(i) for name, i in (model_config.label2id or {}).items()}
    out = []
    for key, prompts in label_prompts.items():
        if isinstance(key, int) or str(key).isdigit():
            label = int(key)
        else:
            label = names.get(str(key), names.get(str(key).lower(), -1))
        if not 0 <= label < model_config.num_labels:
            raise ValueError(
                f"label_prompts key {key!r} is not one of the teacher's labels {model_config.id2label}; use "
                "those names or ids"
            )
        out.append((label, [prompts] if isinstance(prompts, str) else list(prompts)))
    return out


def _as_callable(generator, generator_tokenizer, config):
    if isinstance(generator, torch.nn.Module):
        if generator_tokenizer is None:
            raise ValueError("a generator model needs its tokenizer: pass generator_tokenizer=")
        return ModelGenerator(generator, generator_tokenizer, config)
    if not callable(generator):
        raise ValueError(
            f"generator must be a causal LM or a callable (prompts, seeds) -> texts, got {generator!r}"
        )
    return generator


def _batches(teacher, tokenizer, write, config, labels, indices):
    for first in range(0, len(indices), config.batch_size):
        batch = list(indices[first : first + config.batch_size])
        yield label_candidates(teacher, tokenizer, write_candidates(write, config, labels, batch), config)


def write_candidates(write, config: ZeroGenConfig, labels, indices: list[int]) -> list[dict]:
    """Unlabelled candidates: intended label round-robin by sample index, prompt chosen by its 'start' stream."""
    rows, premise_prompts = [], []
    for index in indices:
        rng = random.Random(derive_seed(config.seed, index, "start"))
        label, prompts = labels[index % len(labels)]
        rows.append({"sample_index": index, "intended_label": label, "prompt": rng.choice(prompts)})
        if config.premise_prompts:
            premise_prompts.append(rng.choice(config.premise_prompts))
    if config.premise_prompts:
        premises = _generate(write, premise_prompts, config, indices, "premise")
        for row, premise in zip(rows, premises):
            row["prompt"] = row["prompt"].replace("{premise}", premise)
            row["text"] = premise
    texts = _generate(write, [r["prompt"] for r in rows], config, indices, "text")
    for row, text in zip(rows, texts):
        row["text_pair" if config.premise_prompts else "text"] = text
    return rows


def _generate(write, prompts, config, indices, stream) -> list[str]:
    texts = write(prompts, [derive_seed(config.seed, i, stream) for i in indices])
    if len(texts) != len(prompts) or not all(isinstance(t, str) for t in texts):
        raise ValueError(
            f"the generator must return one string per prompt; got {texts!r} for {len(prompts)} prompts"
        )
    return [cut_at_stop(t, config.stop_strings) for t in texts]


def cut_at_stop(text: str, stop_strings) -> str:
    """The text before the first stop string, stripped."""
    cut = min((text.find(s) for s in stop_strings if s in text), default=len(text))
    return text[:cut].strip()


def label_candidates(teacher, tokenizer, rows: list[dict], config) -> list[dict]:
    """Adds teacher_probs, label (argmax) and word / token counts of every text."""
    pair = "text_pair" in rows[0]
    probs = class_probs(teacher, tokenizer, rows, config.teacher_max_length, config.batch_size)
    for row, p in zip(rows, probs.tolist()):
        texts = [row["text"]] + ([row["text_pair"]] if pair else [])
        row["teacher_probs"] = p
        row["label"] = int(max(range(len(p)), key=p.__getitem__))
        row["num_words"] = [len(t.split()) for t in texts]
        row["num_tokens"] = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return rows


def class_probs(model, tokenizer, rows, max_length: int, batch_size: int) -> torch.Tensor:
    """Softmax class probabilities (float32, CPU) of the rows' text (and text_pair), batch by batch."""
    device = next(model.parameters()).device
    out = []
    with eval_mode(model), torch.inference_mode():
        for first in range(0, len(rows), batch_size):
            batch = rows[first : first + batch_size]
            pairs = [r["text_pair"] for r in batch] if "text_pair" in batch[0] else None
            encoded = tokenizer([r["text"] for r in batch], pairs, truncation=True, max_length=max_length)
            padded = DistillationCollator(tokenizer, config=model.config)(
                [dict(zip(encoded, r)) for r in zip(*encoded.values())]
            )
            out.append(model(**{k: v.to(device) for k, v in padded.items()}).logits.float().softmax(-1).cpu())
    return torch.cat(out) if out else torch.empty(0)


def add_student_kl(rows: list[dict], student, tokenizer, config) -> None:
    """teacher_student_kl = KL(teacher || student) in float64: high where the student is most wrong."""
    if not rows:
        return
    student_probs = class_probs(
        student, tokenizer, rows, config.teacher_max_length, config.batch_size
    ).double()
    teacher_probs = torch.tensor([r["teacher_probs"] for r in rows], dtype=torch.float64)
    log_ratio = teacher_probs.clamp_min(1e-300).log() - student_probs.clamp_min(1e-300).log()
    kl = (teacher_probs * log_ratio).sum(-1).clamp_min(0.0)  # p_t = 0 terms add 0
    for row, value in zip(rows, kl.tolist()):
        row["teacher_student_kl"] = value


def _public(candidate: dict) -> dict:
    drop = ("num_words", "num_tokens")
    return {k: v for k, v in candidate.items() if k not in drop}


def features(config: ZeroGenConfig, mined: bool) -> Features:
    columns = {
        "sample_index": Value("int64"),
        "intended_label": Value("int64"),
        "prompt": Value("string"),
        "text": Value("string"),
    }
    if config.premise_prompts:
        columns["text_pair"] = Value("string")
    columns |= {"teacher_probs": List(Value("float32")), "label": Value("int64")}
    if mined:
        columns |= {"teacher_student_kl": Value("float64"), "hard": Value("bool")}
    return Features(columns)
