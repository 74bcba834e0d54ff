"""Data-free transfer sets for a classifier teacher from a masked LM, by Gibbs sampling.

Wang & Cho 2019, "BERT has a Mouth, and It Must Speak: BERT as a Markov Random Field Language Model"
(arXiv 1902.04094): a masked LM defines the conditionals p(x_j | x_-j) of every position given the others,
so repeatedly masking one position and redrawing it from that conditional is a Gibbs sampler over sentences.
Each sample gets a length L ~ U[min_length, max_length] and a start (all [MASK], or random tokens); a sweep
visits each of its L positions once (a fresh random order per sweep, or left to right) and redraws it at
`temperature`. As in the authors' bert-babble code, the first `burn_in` sweeps draw from the full conditional
and later sweeps only from its top_k tokens. The decoded text is re-tokenised with the teacher's own tokenizer
(the student will see text, so the teacher labels the text, not the MLM's ids), soft-labelled, and filtered
and class-balanced exactly like ZeroGen candidates (`llmkd.data.synthesis.filters`)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from datasets import Dataset, Features, List, Value

from llmkd.data.synthesis.common import (
    LabelFilters,
    RunOptions,
    check_choice,
    check_float,
    check_int,
    derive_seed,
    model_identity,
    option,
    special_wrap,
    tokenizer_identity,
)
from llmkd.data.synthesis.decoding import eval_mode, filtered_probs
from llmkd.data.synthesis.io import (
    finished_dataset,
    open_run,
    provenance,
    read_rows,
    run_shards,
    save_dataset,
)
from llmkd.data.synthesis.sampling import start_candidates
from llmkd.data.synthesis.zerogen import filter_candidates, label_candidates

logger = logging.getLogger(__name__)
METHOD = "gibbs"
INITS = ("mask", "random")
ORDERS = ("random", "left_to_right")
UNUSED = re.compile(r"^\[unused\d+\]$")  # BERT's placeholder vocabulary entries: never real text


@dataclass
class GibbsConfig(RunOptions, LabelFilters):
    """How to Gibbs-sample sentences from a masked LM and label them with a classifier (`gibbs_dataset`)."""

    num_samples: int = option("Sample budget: sentences to sample and label before filtering (>= 1).", 1000)
    min_length: int = option("Shortest sentence, in MLM tokens without [CLS]/[SEP] (>= 1).", 8)
    max_length: int = option(
        "Longest sentence, in MLM tokens (>= min_length); drawn uniformly per sample.", 24
    )
    sweeps: int = option(
        "Gibbs sweeps; each redraws every position once (>= 1). Cost: sweeps x length forwards.", 10
    )
    burn_in: int = option(
        "The first N sweeps draw from the full conditional, later ones from its top_k (0 <= N <= sweeps).", 2
    )
    temperature: float = option("Divide the MLM's logits by this before sampling (> 0).", 1.0)
    top_k: int = option("After burn-in, draw among the k most likely tokens only (>= 0; 0 = off).", 100)
    init: str = option("Start from all [MASK] tokens (mask) or uniformly random tokens (random).", "mask")
    order: str = option(
        "Positions per sweep: a fresh random permutation (random) or left_to_right.", "random"
    )
    require_agreement = False  # not a field: an MLM has no intended label to agree with

    def __post_init__(self):
        self.check_run_options()
        self.check_label_filters()
        check_int("num_samples", self.num_samples, 1)
        check_int("min_length", self.min_length, 1)
        check_int("max_length", self.max_length, self.min_length)
        check_int("sweeps", self.sweeps, 1)
        check_int("burn_in", self.burn_in, 0, self.sweeps)
        check_float("temperature", self.temperature, 0.0, float("inf"), low_open=True)
        check_int("top_k", self.top_k, 0)
        check_choice("init", self.init, INITS)
        check_choice("order", self.order, ORDERS)


def check_mlm(mlm, mlm_tokenizer) -> None:
    """Refuses models that cannot fill a [MASK]: no LM head, a causal LM, or a tokenizer without a mask token."""
    head = mlm.get_output_embeddings() if hasattr(mlm, "get_output_embeddings") else None
    name = type(mlm).__name__
    if head is None or name.endswith("ForCausalLM") or getattr(mlm.config, "is_decoder", False):
        raise ValueError(
            f"mlm must be a masked LM with its MLM head (e.g. BertForMaskedLM from bert-base-uncased), got {name}; "
            "a fine-tuned classifier or a causal LM cannot fill a [MASK]. Load it with AutoModelForMaskedLM"
        )
    if mlm_tokenizer.mask_token_id is None:
        raise ValueError(
            f"the MLM's tokenizer {mlm_tokenizer.name_or_path!r} has no mask token; use the MLM's own"
        )


def gibbs_dataset(teacher, tokenizer, mlm, mlm_tokenizer, config: GibbsConfig) -> Dataset:
    """Samples sentences from `mlm`, labels them with the classifier `teacher` (and its `tokenizer`), filters
    and balances them into config.output_dir; returns the `datasets.Dataset`. Resumes an interrupted run.

    Columns: sample_index, text, length (MLM tokens), teacher_probs, label (teacher argmax)."""
    check_mlm(mlm, mlm_tokenizer)
    allowed = allowed_tokens(mlm_tokenizer, mlm.get_output_embeddings().weight.shape[0])
    identities = {
        "teacher": model_identity(teacher),
        "tokenizer": tokenizer_identity(tokenizer),
        "generator_kind": "masked_lm",
        "generator": model_identity(mlm),
        "generator_tokenizer": tokenizer_identity(mlm_tokenizer),
    }
    fingerprint = config.fingerprint() | identities | {"method": METHOD}
    saved = finished_dataset(config.output_dir, open_run(config.output_dir, fingerprint))
    if saved is not None:
        return saved

    def produce(indices):
        for first in range(0, len(indices), config.batch_size):
            batch = list(indices[first : first + config.batch_size])
            rows = sample_texts(mlm, mlm_tokenizer, batch, config, allowed)
            yield label_candidates(teacher, tokenizer, rows, config)

    progress = run_shards(
        config.output_dir,
        fingerprint,
        produce,
        shard_size=config.shard_size,
        num_samples=config.num_samples,
        row_tokens=lambda row: row["length"],
        progress_bar=config.progress_bar,
        desc="gibbs sampling",
    )
    kept, stats = filter_candidates(read_rows(config.output_dir, progress), config, teacher)
    public = [{k: c[k] for k in features()} for c in kept]
    keys = ("min_length", "max_length", "sweeps", "burn_in", "temperature", "top_k", "init", "order")
    record = provenance(
        METHOD,
        config,
        identities,
        generation={k: getattr(config, k) for k in keys},
        budgets={"num_samples": config.num_samples},
        filter_stats=stats,
    )
    return save_dataset(config.output_dir, Dataset.from_list(public, features=features()), record, progress)


def allowed_tokens(tokenizer, vocab_size: int) -> torch.Tensor:
    """Boolean (vocab_size,) mask of the tokens a position may take: no special or [unusedN] tokens."""
    ids = [
        i
        for i in start_candidates(tokenizer, vocab_size)
        if not UNUSED.match(tokenizer.convert_ids_to_tokens(i))
    ]
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[ids] = True
    return mask


def sample_texts(
    mlm, tokenizer, indices: list[int], config: GibbsConfig, allowed: torch.Tensor
) -> list[dict]:
    """One Gibbs chain per sample index, run together; rows with sample_index, text and length."""
    starts = [initial_tokens(i, config, allowed) for i in indices]
    generators = [torch.Generator().manual_seed(derive_seed(config.seed, i, "gibbs")) for i in indices]
    with eval_mode(mlm), torch.inference_mode():
        chains = gibbs_chains(mlm, tokenizer, starts, generators, config, allowed)
    return [
        {
            "sample_index": i,
            "text": tokenizer.decode(ids, skip_special_tokens=True).strip(),
            "length": len(ids),
        }
        for i, ids in zip(indices, chains)
    ]


def initial_tokens(index: int, config: GibbsConfig, allowed: torch.Tensor) -> list[int | None]:
    """Sample `index`'s length and start from its 'start' stream; None marks a [MASK]."""
    generator = torch.Generator().manual_seed(derive_seed(config.seed, index, "start"))
    length = int(torch.randint(config.min_length, config.max_length + 1, (1,), generator=generator))
    if config.init == "mask":
        return [None] * length
    choices = allowed.nonzero().squeeze(-1)
    return choices[torch.randint(len(choices), (length,), generator=generator)].tolist()


def gibbs_chains(mlm, tokenizer, starts, generators, config: GibbsConfig, allowed) -> list[list[int]]:
    """Runs every chain for config.sweeps sweeps; returns each chain's final tokens (specials excluded).

    Right padding keeps absolute positions as in an unpadded forward. Each chain draws, per sweep, its order
    and then one uniform per position from its own generator, so it never depends on its batch neighbours."""
    device = next(mlm.parameters()).device
    prefix, suffix = special_wrap(tokenizer)
    mask_id, pad = tokenizer.mask_token_id, tokenizer.pad_token_id or 0
    lengths = [len(s) for s in starts]
    ids = torch.full((len(starts), len(prefix) + max(lengths) + len(suffix)), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, start in enumerate(starts):
        tokens = prefix + [mask_id if t is None else t for t in start] + suffix
        ids[row, : len(tokens)], attention[row, : len(tokens)] = torch.tensor(tokens), 1
    allowed = allowed.to(device)
    for sweep in range(config.sweeps):
        orders = [_order(n, g, config.order) for n, g in zip(lengths, generators)]
        top_k = config.top_k if sweep >= config.burn_in else 0
        for step in range(max(lengths)):
            active = torch.tensor([row for row, n in enumerate(lengths) if step < n])
            where = torch.tensor([len(prefix) + orders[row][step] for row in active.tolist()])
            batch = ids[active]
            batch[torch.arange(len(active)), where] = mask_id  # the conditional of x_j given all the others
            logits = mlm(input_ids=batch.to(device), attention_mask=attention[active].to(device)).logits
            logits = logits[torch.arange(len(active), device=device), where.to(device)].float()
            uniforms = torch.stack(
                [torch.rand((), generator=generators[r], dtype=torch.float64) for r in active.tolist()]
            )
            ids[active, where] = draw(
                logits.masked_fill(~allowed, -torch.inf), uniforms, config.temperature, top_k
            )
    return [ids[row, len(prefix) : len(prefix) + n].tolist() for row, n in enumerate(lengths)]


def _order(length: int, generator: torch.Generator, order: str) -> list[int]:
    if order == "left_to_right":
        return list(range(length))
    return torch.randperm(length, generator=generator).tolist()


def draw(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """Inverse-CDF sampling from softmax(logits / temperature) restricted to the top_k: one uniform per row."""
    probs = filtered_probs(logits, temperature, top_k, 1.0)
    cdf = probs.double().cumsum(-1)
    picks = torch.searchsorted(cdf, (uniforms.to(cdf.device) * cdf[:, -1])[:, None], right=True)
    return picks.squeeze(-1).clamp(max=logits.shape[-1] - 1).cpu()


def features() -> Features:
    return Features(
        {
            "sample_index": Value("int64"),
            "text": Value("string"),
            "length": Value("int32"),
            "teacher_probs": List(Value("float32")),
            "label": Value("int64"),
        }
    )
