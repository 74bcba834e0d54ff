"""Cross-tokenizer distillation with the Universal Logit Distillation loss (ULD).

Boizard, El Haddad, Hudelot & Colombo 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit
Distillation Loss for LLMs", arXiv 2402.12030.

When teacher and student tokenise differently, logit k means a different token on each side and the two
sequences have different lengths, so KL-type losses are undefined. ULD needs neither a shared vocabulary nor a
token map: it compares the *sorted* probability vectors, which only requires that the two sides be aligned
position by position. Alignment (the paper's choice): every example is tokenised by both tokenizers, and the
i-th completion target of the student is paired with the i-th completion target of the teacher, for the first
min(n_S, n_T) targets of the example. Nothing else is aligned, so the pairs drift apart when the tokenizers
split the text differently; the loss then matches the *shape* (confidence profile) of the teacher's
predictions at roughly the same place, not which token it predicts. The student's cross-entropy on its own tokens carries
the identity of the tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from llmkd import alignment as A
from llmkd.config import DistillationConfig
from llmkd.losses import masked_mean
from llmkd.losses.cross_vocab import uld_loss, uld_loss_chunked  # noqa: F401 - re-exported
from llmkd.trainer import COUNT_KINDS, DistillationTrainer

logger = logging.getLogger(__name__)

Tensor = torch.Tensor
TEACHER_COLUMNS = ("teacher_input_ids", "teacher_attention_mask", "teacher_labels")
# The trainer's counts plus the aligned (student, teacher) pairs that ULD normalises by.
CROSS_COUNT_KINDS = (*COUNT_KINDS, "aligned")


# data --------------------------------------------------------
def aligned_targets(student_labels: Tensor, teacher_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Masks (B, T_S − 1), (B, T_T − 1) over the shifted positions pairing the i-th targets of each row.

    Position t predicts token t + 1 (the causal shift); of each row's n_S and n_T supervised targets the first
    min(n_S, n_T) are kept, so ``s_logits[s_mask]`` and ``t_logits[t_mask]`` line up row by row.
    """
    s_mask, t_mask = student_labels[:, 1:] != -100, teacher_labels[:, 1:] != -100
    n = torch.minimum(s_mask.sum(1), t_mask.sum(1)).unsqueeze(1)
    return s_mask & (s_mask.cumsum(1) <= n), t_mask & (t_mask.cumsum(1) <= n)


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


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


@dataclass
class CrossTokenizerCollator:
    """Right-pads the student's and the teacher's token streams of a batch, each with its own pad id.

    Labels default to the input ids (causal LM data); padding is -100 in labels and 0 in attention masks.
    """

    tokenizer: Any
    teacher_tokenizer: Any
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, Tensor]:
        batch = {}
        for prefix, tok in (("", self.tokenizer), ("teacher_", self.teacher_tokenizer)):
            rows = [f[f"{prefix}input_ids"] for f in features]
            labels = [f.get(f"{prefix}labels", f[f"{prefix}input_ids"]) for f in features]
            length = max(len(r) for r in rows)
            if self.pad_to_multiple_of:
                length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
            pad = _pad_id(tok)
            batch[f"{prefix}input_ids"] = torch.tensor([list(r) + [pad] * (length - len(r)) for r in rows])
            batch[f"{prefix}attention_mask"] = torch.tensor(
                [[1] * len(r) + [0] * (length - len(r)) for r in rows]
            )
            batch[f"{prefix}labels"] = torch.tensor([list(r) + [-100] * (length - len(r)) for r in labels])
        return batch


# config ------------------------------------------------------
@dataclass
class CrossTokenizerConfig(DistillationConfig):
    """TrainingArguments for `CrossTokenizerTrainer`: loss = hard_label_weight · CE + uld_weight · ULD."""

    terms: list = field(
        default_factory=list,
        metadata={
            "help": "Must stay empty: ULD replaces the distillation terms (they need a shared vocabulary)."
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Softmax temperature T of both sides of ULD (> 0); 1.0 as in the paper; no T² factor."
        },
    )
    hard_label_weight: float = field(
        default=1.0,
        metadata={"help": "Weight (>= 0) of the student's cross-entropy on its own completion tokens."},
    )
    uld_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight λ (>= 0) of the ULD term (sorted-probability L1 between aligned positions)."
        },
    )
    uld_chunk_size: int = field(
        default=1024,
        metadata={"help": "Aligned positions per checkpointed ULD chunk (> 0); sort memory ~ chunk x vocab."},
    )

    def __post_init__(self):
        if self.terms:  # before the base class parses them
            raise ValueError(
                f"terms={self.terms!r}: the cross-tokenizer trainer takes no distillation terms (they compare "
                "logits or positions of one tokenizer); remove terms and set uld_weight"
            )
        super().__post_init__()  # temperature, hard_label_weight, teacher_dtype, ...
        if not isinstance(self.uld_weight, (int, float)) or not 0 <= self.uld_weight < float("inf"):
            raise ValueError(f"uld_weight must be a finite number >= 0, got {self.uld_weight!r}")
        if not isinstance(self.uld_chunk_size, int) or self.uld_chunk_size <= 0:
            raise ValueError(f"uld_chunk_size must be a positive integer, got {self.uld_chunk_size!r}")
        self.fused_logits = False  # the fused path needs one vocabulary

    def _check_something_to_train(self) -> None:
        if self.hard_label_weight == 0 and self.uld_weight == 0:
            raise ValueError("nothing to train on: hard_label_weight=0 and uld_weight=0; set uld_weight > 0")


# trainer -----------------------------------------------------
class CrossTokenizerTrainer(DistillationTrainer):
    """Distils a causal-LM teacher into a causal-LM student with another tokenizer: CE + λ·ULD.

    Train data carries both token streams (`tokenize_pairs`); the default collator is `CrossTokenizerCollator`.
    Normalisation follows the base trainer: the CE is summed over the student's targets and divided by their
    count in the whole accumulation window (and processes), ULD likewise by the window's aligned pairs. (The
    paper averages per sequence, then over the batch; token weighting makes 1×8 and 4×2 give one update.)
    """

    def __init__(self, model=None, teacher=None, args=None, *, teacher_processing_class=None, **kwargs):
        if not isinstance(args, CrossTokenizerConfig):
            raise TypeError(f"args must be a CrossTokenizerConfig, got {type(args).__name__}")
        student_tok = kwargs.get("processing_class")
        if (
            kwargs.get("data_collator") is None
            and student_tok is not None
            and teacher_processing_class is not None
        ):
            kwargs["data_collator"] = CrossTokenizerCollator(student_tok, teacher_processing_class)
        super().__init__(model, teacher, args, teacher_processing_class=teacher_processing_class, **kwargs)

    def _validate_pair(self, student, teacher, args, student_tok, teacher_tok) -> None:
        # Replaces the base checks: vocabularies and tokenizers are *meant* to differ here.
        A.check_not_shared(student, teacher)
        for role, model in (("student", student), ("teacher", teacher)):
            if A.task_of(model) != A.CAUSAL_LM:
                raise ValueError(
                    f"cross-tokenizer distillation (ULD) is for causal LMs, but the {role} is a "
                    f"{A.task_of(model)} model; load both with AutoModelForCausalLM"
                )
        self.task, self.regression, self.vocab_rows, self.layer_maps = A.CAUSAL_LM, False, None, {}
        self.need_hidden = self.need_attentions = self.fused = False
        logger.info(
            "ULD between a student of %d logit rows and a teacher of %d",
            A.output_rows(student),
            A.output_rows(teacher),
        )

    def _check_datasets(self, args, train_dataset, eval_dataset) -> None:
        super()._check_datasets(args, train_dataset, eval_dataset)
        for split, data in (("train", train_dataset), ("eval", eval_dataset)):
            columns = getattr(data, "column_names", None)
            if columns is not None and "teacher_input_ids" not in columns:
                raise ValueError(
                    f"the {split} dataset has no teacher_input_ids (columns {columns}); tokenise it with both "
                    "tokenizers: llmkd.cross_tokenizer.tokenize_pairs(dataset, student_tok, teacher_tok, ...)"
                )

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            self._signature_columns += [c for c in TEACHER_COLUMNS if c not in self._signature_columns]

    # ---- counting: the base counts plus the aligned pairs ----------------------------------------

    def _local_counts(self, batch: dict) -> Tensor:
        s_mask, _ = aligned_targets(batch["labels"], batch["teacher_labels"])
        return torch.cat([super()._local_counts(batch), s_mask.sum().float().unsqueeze(0)])

    def _get_num_items_in_batch(self, batch_samples, device):
        counts = sum(self._local_counts(b).to(device) for b in batch_samples)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return dict(zip(CROSS_COUNT_KINDS, counts))

    # ---- the loss ---------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        counts = num_items_in_batch
        if not isinstance(counts, dict):
            counts = self._get_num_items_in_batch([inputs], self.args.device)
        student_out = model(**A.select_inputs(inputs, self._student_keys))
        teacher_out = None
        if self.args.uld_weight > 0 or not model.training:  # a CE-only baseline skips the teacher
            teacher_out = self._teacher_forward(inputs)
        local = dict(zip(CROSS_COUNT_KINDS, self._local_counts(inputs)))
        loss, logs = self._mix(student_out, teacher_out, inputs, counts, local)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.args.world_size  # DDP averages gradients; the counts are already global
        self._accumulate("train" if model.training else "eval", logs)
        return (loss, student_out) if return_outputs else loss

    def _teacher_forward(self, inputs, flags=None):
        if self.teacher.training:
            self.teacher.eval()
        teacher_inputs = {"input_ids": inputs["teacher_input_ids"]}
        if inputs.get("teacher_attention_mask") is not None:
            teacher_inputs["attention_mask"] = inputs["teacher_attention_mask"]
        with torch.no_grad():
            return self.teacher(**teacher_inputs)

    def _mix(self, student_out, teacher_out, inputs, counts, local):
        """uld_weight · ULD + hard_label_weight · CE; returns the loss and per-term local means."""
        loss = student_out.logits.new_zeros((), dtype=torch.float32)
        logs = {}
        if teacher_out is not None:
            s_mask, t_mask = aligned_targets(inputs["labels"], inputs["teacher_labels"])
            s = student_out.logits[:, :-1][s_mask]  # (N, V_S): only aligned rows reach the softmax and sort
            t = teacher_out.logits[:, :-1][t_mask]  # (N, V_T)
            values = uld_loss_chunked(
                s, t, temperature=self.args.temperature, chunk_size=self.args.uld_chunk_size
            )
            value = masked_mean(values, num_items=counts["aligned"])
            loss = loss + self.args.uld_weight * value
            logs["distill/uld"] = value.detach() * counts["aligned"] / local["aligned"].clamp(min=1)
        if self.args.hard_label_weight > 0:
            values, mask, kind = self._task_loss(student_out.logits, inputs)
            value = masked_mean(values, mask, num_items=counts[kind])
            loss = loss + self.args.hard_label_weight * value
            logs["loss_ce"] = value.detach() * counts[kind] / local[kind].clamp(min=1)
        return loss, logs
