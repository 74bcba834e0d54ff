"""EXPERIMENTAL data-free transfer sets for a classifier teacher by inversion in embedding space.

When no text generator exists, optimise the teacher's *input embeddings* instead of pixels: the idea of
DeepInversion (Yin et al. 2020, "Dreaming to Distill", arXiv 1912.08795), which optimises inputs so that the
frozen teacher is confident in a chosen class under an image prior. Text has no BatchNorm statistics to match,
so the prior here is the one used for continuous prompts projected back to words (e.g. PEZ, Wen et al. 2023,
arXiv 2302.03668): the distance of each optimised vector to its nearest token embedding. Per sample i, with
target class c_i = i mod C and free vectors z_i1..z_iL between the fixed [CLS] / [SEP] embeddings:

    loss_i = CE(teacher(z_i), c_i)
           + fluency_weight   * mean_j min_v ||z_ij - E_v||^2 / mean_v ||E_v||^2
           + diversity_weight * mean_{k in group(i), c_k = c_i, k != i} cos(mean_j z_ij, mean_j z_kj)

minimised with Adam; group(i) is the block of `diversity_group` consecutive sample indices holding i, so a
sample depends on its block and not on the batch size. Each vector is finally projected to its nearest token
(Euclidean, special tokens excluded) and the text is decoded, re-tokenised and labelled by the teacher. Expect
word salad: the teacher's confidence on the embeddings rarely survives the projection; provenance.json reports
both (inversion_stats)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from datasets import Dataset, Features, List, Value

from llmkd.data.synthesis.common import (
    LabelFilters,
    RunOptions,
    check_float,
    check_int,
    derive_seed,
    model_identity,
    option,
    special_wrap,
    tokenizer_identity,
)
from llmkd.data.synthesis.decoding import eval_mode
from llmkd.data.synthesis.gibbs import allowed_tokens
from llmkd.data.synthesis.io import (
    finished_dataset,
    open_run,
    provenance,
    read_rows,
    run_shards,
    save_dataset,
)
from llmkd.data.synthesis.zerogen import filter_candidates, label_candidates

logger = logging.getLogger(__name__)
METHOD = "inversion"
PROBS = ("initial_probs", "embedding_probs", "projected_probs", "teacher_probs")


@dataclass
class InversionConfig(RunOptions, LabelFilters):
    """EXPERIMENTAL: optimise input embeddings towards each class, project to tokens (`inversion_dataset`)."""

    num_samples: int = option("Sample budget: sequences to optimise and label before filtering (>= 1).", 1000)
    min_length: int = option("Shortest sequence, in tokens without [CLS]/[SEP] (>= 1).", 8)
    max_length: int = option("Longest sequence (>= min_length); drawn uniformly per sample.", 16)
    steps: int = option("Adam steps per batch (>= 1).", 100)
    learning_rate: float = option("Adam learning rate on the embeddings (> 0).", 0.05)
    fluency_weight: float = option(
        "Weight of the nearest-token distance prior (>= 0); higher keeps vectors near real tokens.", 1.0
    )
    diversity_weight: float = option(
        "Weight of the cosine penalty between same-class samples of one diversity group (>= 0).", 0.1
    )
    diversity_group: int = option(
        "Samples per diversity group: consecutive sample indices (>= 1; must divide batch_size; 1 = off).", 8
    )
    require_agreement: bool = option("Keep only texts the teacher labels as the target class.", False)
    store_embeddings: bool = option(
        "Also store the optimised vectors (length x hidden floats per row).", False
    )

    def __post_init__(self):
        self.check_run_options()
        self.check_label_filters()
        check_int("num_samples", self.num_samples, 1)
        check_int("min_length", self.min_length, 1)
        check_int("max_length", self.max_length, self.min_length)
        check_int("steps", self.steps, 1)
        check_float("learning_rate", self.learning_rate, 0.0, float("inf"), low_open=True)
        check_float("fluency_weight", self.fluency_weight, 0.0, float("inf"))
        check_float("diversity_weight", self.diversity_weight, 0.0, float("inf"))
        check_int("diversity_group", self.diversity_group, 1)
        if self.batch_size % self.diversity_group:
            raise ValueError(
                f"diversity_group ({self.diversity_group}) must divide batch_size ({self.batch_size}) so that a "
                f"group never straddles batches; try diversity_group=1 or batch_size={self.diversity_group}"
            )


def inversion_dataset(teacher, tokenizer, config: InversionConfig) -> Dataset:
    """Inverts the classifier `teacher` into config.output_dir and returns the `datasets.Dataset`. EXPERIMENTAL.

    Columns: sample_index, intended_label (target class), text, token_ids (projected tokens), initial_probs,
    embedding_probs, projected_probs (teacher on the token ids), teacher_probs (on the re-tokenised text),
    label (argmax of teacher_probs) and, with store_embeddings, embeddings. Resumes an interrupted run."""
    logger.warning(
        "method=inversion is EXPERIMENTAL: expect word salad; see inversion_stats in provenance.json"
    )
    embeddings = teacher.get_input_embeddings().weight.detach()
    allowed = allowed_tokens(tokenizer, embeddings.shape[0])
    identities = {"teacher": model_identity(teacher), "tokenizer": tokenizer_identity(tokenizer)}
    fingerprint = (
        config.fingerprint() | identities | {"method": METHOD, "generator_kind": "embedding_inversion"}
    )
    saved = finished_dataset(config.output_dir, open_run(config.output_dir, fingerprint))
    if saved is not None:
        return saved

    def produce(indices):
        for first in range(0, len(indices), config.batch_size):
            batch = list(indices[first : first + config.batch_size])
            yield label_candidates(
                teacher, tokenizer, invert_batch(teacher, tokenizer, batch, config, allowed), config
            )

    progress = run_shards(
        config.output_dir,
        fingerprint,
        produce,
        shard_size=config.shard_size,
        num_samples=config.num_samples,
        row_tokens=lambda row: len(row["token_ids"]),
        progress_bar=config.progress_bar,
        desc="embedding inversion (experimental)",
    )
    candidates = read_rows(config.output_dir, progress)
    kept, stats = filter_candidates(candidates, config, teacher)
    columns = features(config.store_embeddings)
    public = [{k: c[k] for k in columns} for c in kept]
    record = provenance(
        METHOD,
        config,
        identities | {"generator_kind": "embedding_inversion", "experimental": True},
        generation={k: getattr(config, k) for k in ("min_length", "max_length", "steps", "learning_rate")},
        budgets={"num_samples": config.num_samples},
        filter_stats=stats,
        inversion_stats=inversion_stats(candidates),
    )
    return save_dataset(config.output_dir, Dataset.from_list(public, features=columns), record, progress)


def invert_batch(teacher, tokenizer, indices: list[int], config: InversionConfig, allowed) -> list[dict]:
    """Optimises one batch of samples and projects them to tokens; unlabelled rows (teacher_probs come later)."""
    table = teacher.get_input_embeddings().weight.detach()
    num_labels = teacher.config.num_labels
    targets = torch.tensor([i % num_labels for i in indices])
    starts = [initial_tokens(i, config, allowed) for i in indices]
    layout = Layout(tokenizer, table, starts)
    z = layout.content(starts).requires_grad_(True)
    groups = torch.tensor([i // config.diversity_group for i in indices])
    with eval_mode(teacher):
        initial = class_probs_from(teacher, layout, z.detach())
        optimise(teacher, layout, z, targets, groups, config, table[allowed])
        final = class_probs_from(teacher, layout, z.detach())
        token_ids = nearest_tokens(z.detach(), table, allowed)
        projected = class_probs_from(teacher, layout, table[token_ids.to(table.device)])
    rows = []
    for row, index in enumerate(indices):
        ids = token_ids[row, : layout.lengths[row]].tolist()
        rows.append(
            {
                "sample_index": index,
                "intended_label": int(targets[row]),
                "text": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                "token_ids": ids,
                "initial_probs": initial[row].tolist(),
                "embedding_probs": final[row].tolist(),
                "projected_probs": projected[row].tolist(),
            }
        )
        if config.store_embeddings:
            rows[-1]["embeddings"] = z[row, : layout.lengths[row]].detach().cpu().tolist()
    return rows


def initial_tokens(index: int, config: InversionConfig, allowed: torch.Tensor) -> list[int]:
    """Sample `index`'s length and starting tokens from its own 'start' stream."""
    generator = torch.Generator().manual_seed(derive_seed(config.seed, index, "start"))
    length = int(torch.randint(config.min_length, config.max_length + 1, (1,), generator=generator))
    choices = allowed.nonzero().squeeze(-1)
    return choices[torch.randint(len(choices), (length,), generator=generator)].tolist()


class Layout:
    """Right-padded [prefix] z_1..z_L [suffix] [pad]... rows: where the free vectors go in inputs_embeds."""

    def __init__(self, tokenizer, table: torch.Tensor, starts: list[list[int]]):
        prefix, suffix = special_wrap(tokenizer)
        pad = tokenizer.pad_token_id or 0
        self.lengths = [len(s) for s in starts]
        self.table, width = table, max(self.lengths)
        ids = torch.full((len(starts), len(prefix) + width + len(suffix)), pad, dtype=torch.long)
        self.attention = torch.zeros_like(ids)
        self.free = torch.zeros_like(ids, dtype=torch.bool)  # positions taken from z
        self.valid = torch.zeros((len(starts), width), dtype=torch.bool)  # real (unpadded) entries of z
        for row, n in enumerate(self.lengths):
            ids[row, : len(prefix) + n + len(suffix)] = torch.tensor(prefix + starts[row] + suffix)
            self.attention[row, : len(prefix) + n + len(suffix)] = 1
            self.free[row, len(prefix) : len(prefix) + n] = True
            self.valid[row, :n] = True
        device = table.device
        self.ids, self.attention = ids.to(device), self.attention.to(device)
        self.free, self.valid = self.free.to(device), self.valid.to(device)

    def content(self, starts) -> torch.Tensor:
        """(B, max L, hidden) start vectors: the start tokens' embeddings (padding entries stay unused)."""
        z = torch.zeros((len(starts), self.valid.shape[1], self.table.shape[1]), device=self.table.device)
        z[self.valid] = self.table[torch.tensor([t for s in starts for t in s], device=self.table.device)]
        return z.float()

    def inputs_embeds(self, z: torch.Tensor) -> torch.Tensor:
        embeds = self.table[self.ids].to(z.dtype).clone()
        embeds[self.free] = z[self.valid]
        return embeds


def class_probs_from(teacher, layout: Layout, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = teacher(inputs_embeds=layout.inputs_embeds(z), attention_mask=layout.attention).logits
    return logits.float().softmax(-1).cpu()


def optimise(teacher, layout: Layout, z, targets, groups, config: InversionConfig, vocab) -> None:
    """Adam on z over the summed per-sample losses (a sum, so no sample's gradient depends on the batch)."""
    optimizer = torch.optim.Adam([z], lr=config.learning_rate)
    scale = vocab.float().pow(2).sum(-1).mean()
    device = z.device
    targets, groups = targets.to(device), groups.to(device)
    for _ in range(config.steps):
        logits = teacher(
            inputs_embeds=layout.inputs_embeds(z), attention_mask=layout.attention
        ).logits.float()
        loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        if config.fluency_weight:
            loss = loss + config.fluency_weight * (fluency(z, vocab, layout.valid) / scale).sum()
        if config.diversity_weight and config.diversity_group > 1:
            loss = loss + config.diversity_weight * diversity(z, layout.valid, targets, groups).sum()
        (z.grad,) = torch.autograd.grad(loss, z)  # teacher parameters get no .grad
        optimizer.step()


def fluency(z: torch.Tensor, vocab: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B,) mean over a sample's positions of the squared distance to the nearest token embedding."""
    distances = torch.cdist(z, vocab.to(z.dtype).expand(z.shape[0], -1, -1)).pow(2).min(-1).values
    return (distances * valid).sum(-1) / valid.sum(-1)


def diversity(z: torch.Tensor, valid: torch.Tensor, targets, groups) -> torch.Tensor:
    """(B,) mean cosine similarity of a sample's mean vector to the other same-class members of its group."""
    pooled = (z * valid[..., None]).sum(1) / valid.sum(-1, keepdim=True)
    cosine = torch.nn.functional.normalize(pooled, dim=-1) @ torch.nn.functional.normalize(pooled, dim=-1).T
    peers = (groups[:, None] == groups[None]) & (targets[:, None] == targets[None])
    peers.fill_diagonal_(False)
    return (cosine * peers).sum(-1) / peers.sum(-1).clamp_min(1)


def nearest_tokens(z: torch.Tensor, table: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """(B, L) id of the nearest allowed token embedding (Euclidean) to every vector."""
    distances = torch.cdist(z.float(), table.float().expand(z.shape[0], -1, -1))
    return distances.masked_fill(~allowed.to(z.device), torch.inf).argmin(-1).cpu()


def inversion_stats(candidates: list[dict]) -> dict:
    """Mean target-class probability at each stage, and how often the argmax is the target: the honest numbers."""
    out = {}
    for key in PROBS:
        target = [c[key][c["intended_label"]] for c in candidates]
        hits = [max(range(len(c[key])), key=c[key].__getitem__) == c["intended_label"] for c in candidates]
        out[key] = {"mean_target_prob": sum(target) / len(target), "target_is_argmax": sum(hits) / len(hits)}
    return out


def features(store_embeddings: bool) -> Features:
    columns = {
        "sample_index": Value("int64"),
        "intended_label": Value("int64"),
        "text": Value("string"),
        "token_ids": List(Value("int32")),
    }
    columns |= {key: List(Value("float32")) for key in PROBS}
    columns["label"] = Value("int64")
    if store_embeddings:
        columns["embeddings"] = List(List(Value("float32")))
    return Features(columns)
