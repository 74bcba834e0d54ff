"""On-policy distillation (GKD): the student learns from the teacher on sequences the student itself samples.

Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"
(GKD, arXiv 2306.13649); sequence-level KD: Kim & Rush 2016, "Sequence-Level Knowledge Distillation"
(arXiv 1606.07947). See docs/onpolicy.md.

Where the completions are replaced: in `get_batch_samples`, before the trainer counts the window's target tokens,
so that the loss is still a sum over the window's (generated) completion tokens divided by their number.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from llmkd import modeling as A
from llmkd.data.collate import DistillationCollator, padding_id
from llmkd.data.loading import PROMPT_LENGTH
from llmkd.data.synthesis.decoding import eos_token_ids, sample_batch
from llmkd.schemes.base import KDTrainer
from llmkd.schemes.config import DistillationConfig, _field, is_number

logger = logging.getLogger(__name__)

SOURCES = ("dataset", "teacher", "student")

SEEDING = (
    "Which batches are on-policy: micro-batch i of the window of optimizer step s uses student samples when "
    "u < lmbda, u the first float64 of a torch.Generator seeded with SHA-256('llmkd:onpolicy:choice:<seed>:<s>:<i>'). "
    "It depends on (seed, step, i) only, so every rank makes the same choice without a collective. "
    "Each example's completion draws from its own generator seeded with SHA-256 of (source, seed, step, prompt "
    "token ids, occurrence of that prompt earlier in the window), so a sample does not depend on the batch "
    "size, its neighbours or the rank."
)


def _seed(*parts) -> int:
    digest = hashlib.sha256(":".join(["llmkd", "onpolicy", *map(str, parts)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def completion_source(seed: int, step: int, micro_batch: int, lmbda: float, seq_kd: bool) -> str:
    """'student' with probability lmbda, else 'teacher' (seq_kd) or 'dataset'; identical on every rank."""
    generator = torch.Generator().manual_seed(_seed("choice", seed, step, micro_batch))
    if torch.rand((), generator=generator, dtype=torch.float64).item() < lmbda:
        return "student"
    return "teacher" if seq_kd else "dataset"


def example_seeds(prompts: list[list[int]], source: str, seed: int, step: int, seen: Counter) -> list[int]:
    """One decoding seed per prompt; `seen` counts prompts earlier in the window so duplicates differ."""
    seeds = []
    for prompt in prompts:
        key = tuple(prompt)
        seeds.append(_seed("sample", source, seed, step, seen[key], ",".join(map(str, prompt))))
        seen[key] += 1
    return seeds


def _check(name: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


@dataclass
class OnPolicyConfig(DistillationConfig):
    """`DistillationConfig` plus where each batch's completions come from and how they are sampled (GKD)."""

    terms: list = field(
        default_factory=lambda: [{"knowledge": "logits", "loss": "jsd", "beta": 0.5}],
        metadata={
            "help": "Distillation terms, as for DistillationTrainer. Default: GKD's generalised JSD(beta) on the "
            "completion tokens; set beta in the term (0 < beta < 1; forward_kl / reverse_kl for the ends)."
        },
    )
    temperature: float = _field(
        1.0, "Softmax temperature of the logit terms (> 0); GKD uses 1 (no softening).", "global_temperature"
    )
    hard_label_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight (>= 0) of cross-entropy on the completion tokens; on sampled batches these are the "
            "sampler's own tokens, so GKD leaves it at 0."
        },
    )
    lmbda: float = field(
        default=0.5,
        metadata={
            "help": "Probability in [0, 1] that a micro-batch's completions are sampled from the current student "
            "(GKD's student-data fraction lambda); 0 = supervised KD on fixed completions, 1 = fully on-policy."
        },
    )
    seq_kd: bool = _field(
        False,
        "Sequence-level KD (Kim & Rush 2016): batches that are not on-policy use completions sampled from the "
        "teacher instead of the dataset's.",
        "dataset_batches",
    )
    max_new_tokens: int = _field(
        128, "Most tokens sampled per completion (>= 1); sampling stops earlier at EOS.", "sampling"
    )
    sampling_temperature: float = _field(
        1.0, "Temperature (> 0) when sampling completions; 1 samples the model's distribution.", "sampling"
    )
    top_k: int = _field(0, "Sample among the k most likely tokens (>= 0; 0 = off).", "sampling")
    top_p: float = _field(1.0, "Nucleus sampling mass (0 < top_p <= 1; 1 = off).", "sampling")

    def __post_init__(self):
        super().__post_init__()
        _check("lmbda", self.lmbda, is_number(self.lmbda) and 0 <= self.lmbda <= 1, "a probability in [0, 1]")
        _check("seq_kd", self.seq_kd, isinstance(self.seq_kd, bool), "true or false")
        is_int = isinstance(self.max_new_tokens, int) and not isinstance(self.max_new_tokens, bool)
        _check("max_new_tokens", self.max_new_tokens, is_int and self.max_new_tokens >= 1, "an integer >= 1")
        temp = self.sampling_temperature
        _check(
            "sampling_temperature", temp, is_number(temp) and temp > 0, "> 0 (1 = the model's distribution)"
        )
        is_int = isinstance(self.top_k, int) and not isinstance(self.top_k, bool)
        _check("top_k", self.top_k, is_int and self.top_k >= 0, "an integer >= 0 (0 = off)")
        _check("top_p", self.top_p, is_number(self.top_p) and 0 < self.top_p <= 1, "in (0, 1] (1 = off)")
        if self.hard_label_weight > 0 and self.lmbda > 0:
            logger.warning(
                "hard_label_weight=%s with lmbda=%s: on sampled batches the task loss trains the student on its "
                "own samples; set hard_label_weight=0 to distil from the teacher alone",
                self.hard_label_weight,
                self.lmbda,
            )

    def sampling_options(self) -> SimpleNamespace:
        """The decoding options of `llmkd.data.synthesis.decoding.sample_batch`."""
        return SimpleNamespace(
            max_new_tokens=self.max_new_tokens,
            do_sample=True,
            greedy_tokens=0,
            temperature=self.sampling_temperature,
            top_k=self.top_k,
            top_p=self.top_p,
        )


class OnPolicyTrainer(KDTrainer):
    """Distillation on prompt/completion data whose completions may be sampled on the fly (GKD).

    Each micro-batch's completions are the dataset's, the teacher's samples (`seq_kd`) or, with probability
    `lmbda`, the current student's samples; the loss covers completion tokens only. The data must come from
    `llmkd.data.loading.tokenize_prompt_completion` (right-padded by llmkd's collator, the default).
    Evaluation always uses the dataset's completions.
    """

    config_class = OnPolicyConfig

    def __init__(self, model=None, teacher=None, args=None, *, teacher_processing_class=None, **kwargs):
        if model is not None and A.task_of(model) != A.CAUSAL_LM:
            raise ValueError(
                f"on-policy distillation samples text, so the student must be a causal LM; got "
                f"{type(A.base_model(model)).__name__}: load it with AutoModelForCausalLM or use DistillationTrainer"
            )
        for split in ("train_dataset", "eval_dataset"):
            _check_prompt_columns(split, kwargs.get(split))
        tokenizer = kwargs.get("processing_class")
        super().__init__(model, teacher, args, teacher_processing_class=teacher_processing_class, **kwargs)
        self._check_distributed()
        no_tokenizer = SimpleNamespace(eos_token_id=None)
        self.eos_ids = eos_token_ids(A.base_model(model), tokenizer or no_tokenizer)
        self.pad_id = padding_id(tokenizer) if tokenizer is not None else min(self.eos_ids, default=0)
        if not self.eos_ids and (args.lmbda > 0 or args.seq_kd):
            logger.warning("no EOS token id found: every sampled completion runs to max_new_tokens")

    def _check_distributed(self) -> None:
        if not (self.args.lmbda > 0 or self.args.seq_kd):
            return
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if self.is_fsdp_enabled or is_deepspeed_zero3_enabled():
            raise ValueError(
                "sampling completions (lmbda > 0 or seq_kd) with FSDP or ZeRO-3 needs every rank to run the same "
                "number of forward passes, which the sampler does not do yet; train with DDP (or ZeRO-1/2), or "
                "set lmbda=0 and seq_kd=false"
            )

    def scheme_columns(self) -> list[str]:
        return [PROMPT_LENGTH]  # how prompts are cut out for sampling

    def scheme_facts(self) -> dict[str, bool]:
        return {"sampling": self.args.lmbda > 0 or self.args.seq_kd, "dataset_batches": self.args.lmbda < 1}

    # ---- completions: replaced before the window's targets are counted ---------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        seen = Counter()  # prompt occurrences in this window: duplicates get different samples
        batches = [self.complete_batch(b, i, seen) for i, b in enumerate(batches)]
        return batches, self._get_num_items_in_batch(batches, device)

    def complete_batch(self, batch: dict, micro_batch: int, seen: Counter | None = None) -> dict:
        """The batch with its completions from the source chosen for (seed, global step, micro-batch)."""
        step, seed = self.state.global_step, self.args.seed
        source = completion_source(seed, step, micro_batch, self.args.lmbda, self.args.seq_kd)
        if source != "dataset":
            prompts = prompts_of(batch)
            seeds = example_seeds(prompts, source, seed, step, Counter() if seen is None else seen)
            sampler = (
                self.teacher if source == "teacher" else self.accelerator.unwrap_model(self.model_wrapped)
            )
            rows = sample_batch(
                sampler,
                prompts,
                seeds,
                self.args.sampling_options(),
                eos_ids=self.eos_ids,
                pad_id=self.pad_id,
            )
            batch = with_completions(
                prompts, [r["generated_ids"] for r in rows], self.pad_id, self.args.device
            )
        completion = (batch["labels"] != -100).sum()  # on the device: logs are reduced there
        one = torch.ones((), device=completion.device)
        self.tally.add("train", "onpolicy/student_batches", one * (source == "student"), one)
        self.tally.add("train", "onpolicy/completion_tokens", completion, one * len(batch["labels"]))
        return batch


def _check_prompt_columns(split: str, data) -> None:
    columns = getattr(data, "column_names", None)
    if columns is not None and PROMPT_LENGTH not in columns:
        raise ValueError(
            f"the {split} has columns {columns} but no {PROMPT_LENGTH!r}: on-policy distillation needs "
            "prompt/completion data; tokenise it with llmkd.data.loading.tokenize_prompt_completion"
        )


def prompts_of(batch: dict) -> list[list[int]]:
    """Each row's prompt token ids (rows are right-padded, the prompt first)."""
    if PROMPT_LENGTH not in batch:
        raise KeyError(
            f"the batch has no {PROMPT_LENGTH!r} (keys: {sorted(batch)}); collate tokenize_prompt_completion rows "
            "with llmkd.data.collate.DistillationCollator"
        )
    ids, lengths = batch["input_ids"].tolist(), batch[PROMPT_LENGTH].tolist()
    return [row[:n] for row, n in zip(ids, lengths)]


def with_completions(prompts, completions, pad_id: int, device) -> dict:
    """A right-padded batch of prompt + completion, labels -100 on the prompt (the loss sees completions only)."""
    rows = [
        {"input_ids": p + c, "labels": [-100] * len(p) + c, PROMPT_LENGTH: len(p)}
        for p, c in zip(prompts, completions)
    ]
    batch = DistillationCollator(SimpleNamespace(pad_token_id=pad_id), causal_lm=True)(rows)
    return {k: v.to(device) for k, v in batch.items()}
