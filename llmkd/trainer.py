"""`DistillationTrainer`: a `transformers.Trainer` that trains a student against a frozen teacher.

Normalisation: every term is a masked sum divided by the number of supervised items of the whole
gradient-accumulation window (summed over processes under DDP), so 1×8, 4×2 and 2 processes × 4 give one update.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from llmkd import alignment as A
from llmkd.config import DistillationConfig
from llmkd.losses import LOSSES, SOFT_TARGET_LOSSES, fused_logit_distillation, masked_mean
from llmkd.placement import place_teacher

logger = logging.getLogger(__name__)

COUNT_KINDS = ("examples", "tokens", "targets")


class DistillationTrainer(Trainer):
    """Trains `model` (the student) on a weighted mix of distillation terms from `teacher` plus the task loss.

    Args:
        model: the student (a causal LM or a sequence classifier).
        teacher: the teacher, same task; frozen, kept in eval mode, never wrapped or saved.
        args: a `DistillationConfig`.
        teacher_processing_class: the teacher's tokenizer, checked against the student's for logit terms.
        **kwargs: anything `transformers.Trainer` takes (datasets, collator, processing_class, callbacks, …).
    """

    # compute_loss divides by the items of the whole accumulation window itself.
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, teacher=None, args=None, *, teacher_processing_class=None, **kwargs):
        if not isinstance(args, DistillationConfig):
            raise TypeError(f"args must be a DistillationConfig, got {type(args).__name__}")
        if teacher is None or model is None:
            raise ValueError("DistillationTrainer needs both a student (model=) and a teacher (teacher=)")
        self.terms = list(args.terms)
        self._validate_pair(model, teacher, args, kwargs.get("processing_class"), teacher_processing_class)
        self._check_datasets(args, kwargs.get("train_dataset"), kwargs.get("eval_dataset"))
        super().__init__(model=model, args=args, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError(
                f"{self.args.n_gpu} GPUs in one process (DataParallel) are not supported; start one process per "
                "GPU with `accelerate launch` or `torchrun`"
            )
        self.teacher = self._place_teacher(teacher)
        self.projectors = A.build_projectors(self.terms, model, teacher).to(self.args.device)
        if len(self.projectors) and self.is_deepspeed_enabled:
            raise ValueError(
                "hidden terms between different widths learn a projector, which DeepSpeed's optimizer does not "
                "see; use a student of the teacher's width, drop the hidden term, or train with DDP/FSDP"
            )
        self.add_callback(A.ZeroProjectorGrads(self.projectors))
        self._student_keys = A.forward_keys(model)
        self._teacher_keys = A.forward_keys(teacher)
        self._term_logs: dict[str, dict[str, torch.Tensor]] = {"train": {}, "eval": {}}

    # ---- set-up and checks (all before training) -------------------------------------------------

    def _place_teacher(self, teacher):
        """Hook: freeze the teacher and put it where the back-end needs it (a cached teacher has no weights)."""
        return place_teacher(teacher, self.accelerator, self.args)

    def _validate_pair(self, student, teacher, args, student_tok, teacher_tok) -> None:
        A.check_not_shared(student, teacher)
        self._set_task(student, A.task_of(teacher), "teacher")
        knowledge = {t.knowledge for t in self.terms}
        self.vocab_rows = None
        if "logits" in knowledge or args.hard_label_weight > 0:
            if self.task == A.SEQ_CLS:
                A.check_labels(student, teacher)
            else:
                self.vocab_rows = A.check_vocab(student, teacher, args.vocab_mismatch, args.shared_vocab_size)
                A.check_tokenizers(student_tok, teacher_tok)
        if self.regression and any(t.knowledge == "logits" and t.loss != "mse" for t in self.terms):
            logger.warning("regression task (num_labels=1): logit terms are computed as MSE on the scores")
        if "attention" in knowledge:
            A.check_heads(student, teacher)
            A.ensure_attention_weights(student, "student")
            A.ensure_attention_weights(teacher, "teacher")
        self.layer_maps = {
            i: A.resolve_layer_map(t.layer_map, A.num_layers(student), A.num_layers(teacher), t.knowledge)
            for i, t in enumerate(self.terms)
            if t.knowledge != "logits"
        }
        self.need_hidden = bool(knowledge & {"hidden", "relation"})
        self.need_attentions = "attention" in knowledge
        self.fused = args.fused_logits and A.fused_logits_apply(student, teacher, self.terms, args)

    def _set_task(self, student, teacher_task: str, source: str) -> None:
        """self.task and self.regression from the student; a teacher of another task is refused."""
        self.task = A.task_of(student)
        if teacher_task != self.task:
            raise ValueError(f"the student is a {self.task} model but the {source} a {teacher_task} model")
        config = A.text_config(student)
        self.regression = self.task == A.SEQ_CLS and config.num_labels == 1
        if getattr(config, "problem_type", None) == "multi_label_classification":
            raise ValueError(
                "multi-label classification is not supported yet; use single-label or regression"
            )

    def _check_datasets(self, args, train_dataset, eval_dataset) -> None:
        for split, data in (("train", train_dataset), ("eval", eval_dataset)):
            if data is not None and hasattr(data, "__len__") and len(data) == 0:
                raise ValueError(
                    f"the {split} dataset is empty; check the data files and any max_samples setting"
                )
        columns = getattr(train_dataset, "column_names", None)
        unlabelled = columns is not None and not {"label", "labels"} & set(columns)
        if (
            args.hard_label_weight > 0 and unlabelled and self.task == A.SEQ_CLS
        ):  # causal LMs label themselves
            raise ValueError(
                f"hard_label_weight={args.hard_label_weight} needs a 'label' column, but the training data "
                f"has only {columns}; add labels or set hard_label_weight=0 to distil from the teacher alone"
            )

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients and self.args.world_size > 1 and len(self.projectors):
            self._average_projector_grads()
        return loss

    def _average_projector_grads(self) -> None:
        # Projectors live outside the DDP-wrapped student, so their gradients are averaged here, after the
        # window's last backward and before clipping. On the main thread, in program order: a collective inside
        # an autograd hook could interleave differently with DDP's own all-reduces on each rank.
        for param in self.projectors.parameters():
            if param.grad is not None:  # every rank computes the same terms, so the same grads exist
                torch.distributed.all_reduce(param.grad)
                param.grad /= self.args.world_size

    def _set_signature_columns_if_needed(self):
        # remove_unused_columns must keep what the teacher's forward takes (e.g. token_type_ids).
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            extra = [k for k in A.forward_keys(self.teacher) if k not in self._signature_columns]
            self._signature_columns += extra

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        params = list(self.projectors.parameters())
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if params and not any(id(p) in known for p in params):
            optimizer.add_param_group({"params": params, "weight_decay": self.args.weight_decay})
        return optimizer

    def _clip_grad_norm(self, model):
        if not len(self.projectors):
            return super()._clip_grad_norm(model)
        # One global norm over student and projectors, as if they were one model.
        params = [*model.parameters(), *self.projectors.parameters()]
        return self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)

    # ---- counting supervised items ----------------------------------------------------------------

    def _target_mask(self, batch: dict) -> torch.Tensor:
        """Positions that carry a prediction: examples for classifiers, next-token targets for causal LMs."""
        ids = batch["input_ids"]
        if self.task == A.SEQ_CLS:
            return torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
        if batch.get("labels") is not None:
            return batch["labels"][:, 1:] != -100  # the causal shift: position t predicts token t+1
        mask = batch.get("attention_mask")
        return mask[:, 1:].bool() if mask is not None else torch.ones_like(ids[:, 1:], dtype=torch.bool)

    def _local_counts(self, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        tokens = mask.sum() if mask is not None else ids.numel()
        return torch.stack(
            [
                torch.tensor(ids.shape[0], device=ids.device),
                torch.as_tensor(tokens, device=ids.device),
                self._target_mask(batch).sum(),
            ]
        ).float()

    def _get_num_items_in_batch(self, batch_samples, device):
        """Counts of the whole accumulation window, summed over processes: {examples, tokens, targets}."""
        counts = sum(self._local_counts(b).to(device) for b in batch_samples)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return dict(zip(COUNT_KINDS, counts))

    # ---- the loss ---------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        counts = num_items_in_batch
        if not isinstance(counts, dict):
            counts = self._get_num_items_in_batch([inputs], self.args.device)
        flags = {"output_hidden_states": self.need_hidden, "output_attentions": self.need_attentions}
        if self.fused and model.training:  # logits come from hidden states in chunks: skip the (B, T, V) ones
            flags = {"output_hidden_states": True, "logits_to_keep": 1}
        student_out = model(**A.select_inputs(inputs, self._student_keys), **flags)
        teacher_out = None
        if self.terms or not model.training:  # a task-loss-only baseline skips the teacher while training
            teacher_out = self._teacher_forward(inputs, flags)
        local = dict(zip(COUNT_KINDS, self._local_counts(inputs)))
        loss, logs = self._mix(student_out, teacher_out, inputs, counts, local)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.args.world_size  # DDP averages gradients; the counts are already global
        split = "train" if model.training else "eval"
        self._accumulate(split, logs)
        if split == "eval":
            self._accumulate_agreement(student_out.logits, teacher_out.logits, inputs)
        return (loss, student_out) if return_outputs else loss

    def _teacher_forward(self, inputs, flags):
        if self.teacher.training:  # whoever flipped it, the teacher runs in eval mode (no dropout)
            self.teacher.eval()
        with torch.no_grad():
            return self.teacher(**A.select_inputs(inputs, self._teacher_keys), **flags)

    def _mix(self, student_out, teacher_out, inputs, counts, local):
        """Σ weight · term (+ hard_label_weight · task loss); returns the loss and per-term local means."""
        loss = student_out.logits.new_zeros((), dtype=torch.float32)
        logs = {}
        fused = self.fused and student_out.logits.shape[1] == 1 < inputs["input_ids"].shape[1]
        for i, term in enumerate(self.terms):
            if fused:
                value, kind = self._fused_value(term, student_out, teacher_out, inputs, counts), "targets"
            else:
                values, mask, kind = self._term_values(i, term, student_out, teacher_out, inputs)
                value = masked_mean(values, mask, num_items=counts[kind])
            if term.knowledge == "logits" and term.loss in SOFT_TARGET_LOSSES:
                value = value * self.args.temperature**2  # soft-target gradients scale as 1/T² (Hinton)
            loss = loss + term.weight * value
            logs[term.name] = value.detach() * counts[kind] / local[kind].clamp(min=1)
        if self.args.hard_label_weight > 0 and inputs.get("labels") is not None:
            values, mask, kind = self._task_loss(student_out.logits, inputs)
            value = masked_mean(values, mask, num_items=counts[kind])
            loss = loss + self.args.hard_label_weight * value
            logs["loss_ce"] = value.detach() * counts[kind] / local[kind].clamp(min=1)
        return loss, logs

    def _fused_value(self, term, student_out, teacher_out, inputs, counts):
        """A logit term from the last hidden states and the lm_heads: same value and gradient, no full logits."""
        h_s, h_t = (
            student_out.hidden_states[-1][:, :-1],
            teacher_out.hidden_states[-1][:, :-1],
        )  # causal shift
        s_head, t_head = A.output_head(self.model), A.output_head(self.teacher)
        rows = slice(self.vocab_rows)  # padded vocabularies: the shared rows only
        return fused_logit_distillation(
            h_s.flatten(0, 1),
            s_head.weight[rows],
            h_t.flatten(0, 1),
            t_head.weight[rows],
            loss=term.loss,
            temperature=self.args.temperature,
            mask=self._target_mask(inputs).flatten(),
            num_items=counts["targets"],
            chunk_size=self.args.logit_chunk_size,
            student_head_bias=None if s_head.bias is None else s_head.bias[rows],
            teacher_head_bias=None if t_head.bias is None else t_head.bias[rows],
            **term.params,
        )

    def _term_values(self, index, term, student_out, teacher_out, inputs):
        """Per-item values, their mask and which count normalises them."""
        fn = LOSSES[term.knowledge][term.loss]
        if term.knowledge == "logits":
            return self._logit_values(fn, term, student_out.logits, teacher_out.logits, inputs)
        attention_mask = inputs.get("attention_mask")
        pairs = self.layer_maps[index]
        if term.knowledge == "relation":
            causal = self.task == A.CAUSAL_LM
            per = sum(
                fn(
                    A.pool(student_out.hidden_states[s], attention_mask, causal),
                    A.pool(teacher_out.hidden_states[t], attention_mask, causal),
                    **term.params,
                )
                for s, t in pairs
            ) / len(pairs)
            # A relation loss is one number per batch: weight it by the batch's share of the window.
            return per.expand(inputs["input_ids"].shape[0]), None, "examples"
        if term.knowledge == "hidden":
            project = self.projectors[str(index)] if str(index) in self.projectors else nn.Identity()
            s_states, t_states = student_out.hidden_states, teacher_out.hidden_states
            per = sum(fn(project(s_states[s]), t_states[t], **term.params) for s, t in pairs) / len(pairs)
        else:
            s_maps, t_maps = student_out.attentions, teacher_out.attentions
            per = sum(fn(s_maps[s], t_maps[t], **term.params) for s, t in pairs) / len(pairs)
        mask = attention_mask.bool() if attention_mask is not None else None
        return per, mask, "tokens"

    def _logit_values(self, fn, term, student_logits, teacher_logits, inputs):
        if self.task == A.SEQ_CLS:
            if self.regression:  # a regression "logit" is a score: match it directly
                return (student_logits.float() - teacher_logits.float()).pow(2).mean(-1), None, "targets"
            return (
                fn(student_logits, teacher_logits, temperature=self.args.temperature, **term.params),
                None,
                "targets",
            )
        s, t = student_logits[:, :-1], teacher_logits[:, :-1]  # the causal shift: targets are tokens 1..T
        if self.vocab_rows is not None:  # padded vocabularies: softmax over the shared rows only
            s, t = s[..., : self.vocab_rows], t[..., : self.vocab_rows]
        values = fn(s, t, temperature=self.args.temperature, **term.params)
        return values, self._target_mask(inputs), "targets"

    def _task_loss(self, logits, inputs):
        labels = inputs["labels"]
        if self.task == A.SEQ_CLS:
            if self.regression:
                return (logits.float().squeeze(-1) - labels.float()).pow(2), None, "targets"
            return F.cross_entropy(logits.float(), labels, reduction="none"), None, "targets"
        shifted = labels[:, 1:]
        logits = logits[:, :-1].float()
        values = F.cross_entropy(logits.transpose(1, 2), shifted.clamp(min=0), reduction="none")
        return values, shifted != -100, "targets"

    # ---- logging ----------------------------------------------------------------------------------

    def _accumulate(self, split: str, logs: dict[str, torch.Tensor]) -> None:
        store = self._term_logs[split]
        for name, value in logs.items():
            pair = torch.stack([value.float(), torch.ones_like(value, dtype=torch.float32)])
            store[name] = store[name] + pair if name in store else pair

    def _accumulate_agreement(self, student_logits, teacher_logits, inputs) -> None:
        if self.regression:
            return
        s, t = student_logits, teacher_logits
        if self.task == A.CAUSAL_LM:
            s, t = s[:, :-1], t[:, :-1]
            if self.vocab_rows is not None:
                s, t = s[..., : self.vocab_rows], t[..., : self.vocab_rows]
        mask = self._target_mask(inputs)
        agree = (s.argmax(-1) == t.argmax(-1)) & mask
        self._accumulate("eval", {"agreement": agree.sum().float() / mask.sum().clamp(min=1)})

    def _flush(self, split: str) -> dict[str, float]:
        """Means of the accumulated per-batch values, averaged over processes; clears the store."""
        store, self._term_logs[split] = self._term_logs[split], {}
        if not store:
            return {}
        names = sorted(store)
        stacked = torch.stack([store[n] for n in names])
        if self.args.world_size > 1:
            stacked = self.accelerator.reduce(stacked, reduction="sum")
        return {n: round((s / c.clamp(min=1)).item(), 6) for n, (s, c) in zip(names, stacked)}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add each term's mean since the last one
            logs.update(self._flush("train"))
        super().log(logs, start_time)

    def evaluation_loop(self, *args, **kwargs):
        self._term_logs["eval"] = {}
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        output.metrics.update({f"{prefix}_{k}": v for k, v in self._flush("eval").items()})
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Always the distillation loss, labels or not (the base class skips the loss without labels).
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), outputs.logits.detach(), inputs.get("labels")

    # ---- checkpoints: projectors are trained and restored, never part of the student -------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if len(self.projectors) and self.args.should_save:
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            A.save_projectors(self.projectors, os.path.join(self._get_output_dir(trial=trial), folder))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if len(self.projectors):
            A.load_projectors(self.projectors, resume_from_checkpoint, self.args.device)
