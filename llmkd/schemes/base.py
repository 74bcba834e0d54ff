"""`KDTrainer`: the base of every scheme — counting, the weighted mix, metrics and auxiliary modules.

One step:  loss = Σ_terms weight · Σ_items values[mask] / (items of the term's count kind in the whole
gradient-accumulation window, summed over processes), so one batch of 8, four batches of 2 and two processes of
4 give the same update. Terms come from `llmkd.knowledge` (what is compared), teacher outputs from a
`llmkd.teachers` source (where they come from); a scheme subclasses this class and its config
(`llmkd.schemes.config.DistillationConfig`) and overrides the few hooks it needs (`make_source`, `build_terms`,
`get_batch_samples`, `scheme_facts`), never the reduction. A term may also log side values beside it (never in
`loss`) and keep an optimizer of its own for its auxiliary module (a discriminator: llmkd.schemes.own_optimizers).
"""

from __future__ import annotations

import torch
from transformers import Trainer

from llmkd.knowledge.adapters import AUX, AuxiliaryModules
from llmkd.knowledge.counts import COUNTS, per_example
from llmkd.knowledge.logits import agreement
from llmkd.losses import masked_mean
from llmkd.modeling import CAUSAL_LM, base_model, forward_keys, select_inputs
from llmkd.publish.trainer import SafeCheckpoints
from llmkd.schemes import setup
from llmkd.schemes.config import DistillationConfig, check_settings
from llmkd.schemes.diagnostics import Diagnostics
from llmkd.schemes.own_optimizers import OwnOptimizers, StepOwnOptimizers
from llmkd.schemes.tally import Tally, per_example_sums
from llmkd.teachers import as_source


class KDTrainer(SafeCheckpoints, Trainer):  # SafeCheckpoints: complete checkpoints, no pickles
    """A `transformers.Trainer` that trains `model` (the student) on a weighted mix of distillation terms.

    Args:
        model: the student (a causal LM or a sequence classifier).
        teacher: a model (frozen, kept in eval mode, never wrapped or saved), a teacher-cache folder or source.
        args: the scheme's config (`DistillationConfig` or a subclass).
        teacher_processing_class: the teacher's tokenizer; checked against the student's (the teacher reads
            the student's token ids).
        **kwargs: anything `transformers.Trainer` takes (datasets, collator, processing_class, callbacks, …).

    Raises ValueError/TypeError before training for every mismatch (see llmkd.schemes.setup).
    """

    config_class = DistillationConfig
    loss_is_scaled_for_ga = True  # compute_loss divides by the items of the whole accumulation window itself

    def __init__(self, model=None, teacher=None, args=None, *, teacher_processing_class=None, **kwargs):
        if not isinstance(args, self.config_class):
            raise TypeError(f"args must be a {self.config_class.__name__}, got {type(args).__name__}")
        if model is None:
            raise ValueError(f"{type(self).__name__} needs a student (model=)")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "compute_loss_func is not used: llmkd computes the loss from its terms; remove it"
            )
        self.source = self.make_source(teacher)
        self.pair = setup.make_pair(
            model, self.source, args, kwargs.get("processing_class"), teacher_processing_class
        )
        self.source.check(self.pair)
        self.terms = self.build_terms(args)
        setup.check_datasets(
            args, self.pair.task, kwargs.get("train_dataset"), kwargs.get("eval_dataset"), self.source
        )
        kwargs["data_collator"] = setup.collator(kwargs.get("data_collator"), self.pair)
        self.aux = self._attach_auxiliary(
            model, args.seed
        )  # before Trainer.__init__: moved and wrapped with it
        setup.check_optimizer(kwargs.get("optimizers"), self.aux)
        super().__init__(model=model, args=args, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError(
                f"{self.args.n_gpu} GPUs in one process (DataParallel) are not supported; start one process per "
                "GPU with `accelerate launch` or `torchrun`"
            )
        self.would_fuse = setup.decide_fused(self)
        setup.check_engine_settings(self.args, self.terms)
        setup.check_best_metric(self.args, self.terms)
        setup.check_relation_batches(self)
        check_settings(self.args, setup.facts(self) | self.scheme_facts())
        self.source.place(self)
        self.own_optimizers = self._own_optimizers()
        self.tally = Tally()
        self.diagnostics = Diagnostics(self)  # entropies, agreement, top-k mass, the no-signal guard
        self._student_keys = forward_keys(model)
        self._counts = COUNTS | {k: f for t in self.terms for k, f in t.counts.items()}

    def _attach_auxiliary(self, model, seed: int) -> AuxiliaryModules:
        with torch.random.fork_rng(devices=[]):  # adapters start from the seed, whatever ran before
            torch.manual_seed(seed)
            adapters = {str(t.index): a for t in self.terms if (a := t.adapter()) is not None}
        return AuxiliaryModules(model, adapters)

    def _own_optimizers(self) -> OwnOptimizers:
        """The terms' own optimizers (Knowledge.own_optimizer), built once the modules are on their device."""
        own = {
            name: opt
            for t in self.terms
            if (name := str(t.index)) in self.aux
            and (opt := t.own_optimizer(self.aux[name], self.args)) is not None
        }
        own = OwnOptimizers(own)
        own.check(self)
        if len(own):
            self.add_callback(StepOwnOptimizers(own))
        return own

    def create_optimizer(self, model=None):
        with self.own_optimizers.hidden():  # their parameters are stepped by their own optimizers only
            optimizer = super().create_optimizer(model)
        self.own_optimizers.check_disjoint(optimizer)
        return optimizer

    def _clip_grad_norm(self, model):
        if not len(self.own_optimizers):
            return super()._clip_grad_norm(model)
        # Each own optimizer's parameters apart from the student's (see llmkd.schemes.own_optimizers).
        self.own_optimizers.clip(self.args.max_grad_norm)
        return self.accelerator.clip_grad_norm_(self._main_parameters(model), self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None and len(self.own_optimizers):  # the logged norm: the trainer's optimizer's
            grad_norm = self.accelerator.clip_grad_norm_(self._main_parameters(model), float("inf"))
        return super()._get_grad_norm(model, grad_norm)

    def _main_parameters(self, model) -> list:
        own = {id(p) for p in self.own_optimizers.parameters()}
        return [p for p in model.parameters() if id(p) not in own]

    # ---- hooks for schemes -------------------------------------------------------------------------
    def make_source(self, teacher):
        """The teacher source; schemes without a pre-trained teacher (mutual learning, self-distillation)
        override it."""
        if teacher is None:
            raise ValueError(
                f"{type(self).__name__} needs a teacher (teacher=): a model, a cache or a source"
            )
        return as_source(teacher)

    def build_terms(self, args) -> list:
        return setup.build_terms(args.terms, self.pair)

    def scheme_facts(self) -> dict[str, bool]:
        return {}

    # ---- counting ----------------------------------------------------------------------------------
    def local_counts(self, batch: dict) -> dict[str, torch.Tensor]:
        """kind -> (B,) items of each example of the batch."""
        return {kind: per_example(fn(batch, self.pair.task)) for kind, fn in self._counts.items()}

    def _get_num_items_in_batch(self, batch_samples, device):
        """Items of the whole accumulation window, summed over processes: {kind: count}."""
        kinds = list(self._counts)
        local = [self.local_counts(b) for b in batch_samples]
        counts = torch.stack([sum(c[k].sum().to(device) for c in local) for k in kinds])
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return dict(zip(kinds, counts))

    # ---- the loss ----------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training
        local = self.local_counts(inputs)
        window = self.window_counts(local, num_items_in_batch)
        student_out, adapted = self._student_forward(model, inputs, training)
        teacher_out = self._teacher_forward(inputs, training)
        columns = {} if not training else None
        loss = self.mix_terms(student_out, teacher_out, adapted, inputs, window, local, columns)
        if not training:
            self._eval_columns(columns, student_out, teacher_out, inputs, local)
        return (loss, student_out) if return_outputs else loss

    @staticmethod
    def window_counts(local: dict, num_items_in_batch) -> dict:
        """Items of each count kind in the accumulation window (Trainer passes them), else in this batch."""
        if isinstance(num_items_in_batch, dict):
            return num_items_in_batch
        return {k: v.sum() for k, v in local.items()}

    def mix_terms(self, student_out, teacher_out, adapted, inputs, window, local, columns) -> torch.Tensor:
        """Σ_terms weight · Σ values[mask] / window count for one student's outputs (schemes with several
        students, such as mutual learning, call it once per student). Training (`columns` None): tallies the
        terms and scales for DDP; evaluation: adds each term's per-example sums to `columns`."""
        training = columns is None
        loss = student_out.logits.new_zeros((), dtype=torch.float32)
        for term in self.terms:
            side = teacher_out.member(term.term.teacher) if teacher_out is not None else None
            tv = term.values(student_out, side, inputs, adapted.get(str(term.index)))
            total = masked_mean(tv.values, tv.mask, num_items=1)  # the masked sum
            loss = loss + term.term.weight * masked_mean(total, num_items=window[tv.count])
            if training:
                for split in ("train", "run"):  # since the last log; since the start (train_loss)
                    self.tally.add(split, term.name, total, local[tv.count].sum())
                self.diagnostics.observe(term, student_out, side, inputs)
            else:
                columns[term.name] = (
                    per_example_sums(tv.values, tv.mask, len(local["examples"])),
                    local[tv.count],
                )
            loss = loss + self._side_values(term.name, tv.side, window, local, columns)
        if training and self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.args.world_size  # DDP averages gradients; the counts are already global
        return loss

    def _side_values(self, name, side, window, local, columns) -> torch.Tensor:
        """A term's side values (a discriminator's loss and accuracy): logged as `<name>/<key>`, never weighted
        into `loss`; those with a gradient are backpropagated unweighted, reaching only own-optimizer parameters."""
        backward = 0.0
        for key, sv in side.items():
            total = masked_mean(sv.values, sv.mask, num_items=1)
            if sv.values.requires_grad:
                backward = backward + masked_mean(total, num_items=window[sv.count])
            if columns is None:
                self.tally.add("train", f"{name}/{key}", total, local[sv.count].sum())
            else:
                sums = per_example_sums(sv.values, sv.mask, len(local["examples"]))
                columns[f"{name}/{key}"] = (sums, local[sv.count])
        return backward

    def forward_flags(self, training: bool) -> dict:
        needs = {n for t in self.terms for n in t.needs}
        fused = training and any(getattr(t, "fused", False) for t in self.terms)
        flags = {
            "output_hidden_states": "hidden_states" in needs or fused,
            "output_attentions": "attentions" in needs,
        }
        skip_logits = training and not any(t.needs_full_logits(True) for t in self.terms)
        if skip_logits and self.pair.task == CAUSAL_LM:  # only hidden states are read: no (B, T, V) logits
            flags["logits_to_keep"] = 1
        return {k: v for k, v in flags.items() if v is not False}

    def _student_forward(self, model, inputs, training):
        flags = self.forward_flags(training)
        if "logits_to_keep" in flags and "logits_to_keep" not in self._student_keys:
            flags.pop("logits_to_keep")
        student_inputs = select_inputs(inputs, self._student_keys)
        if not len(self.aux):
            return model(**student_inputs, **flags), {}
        with self.aux.run(self._adapt):
            out = model(**student_inputs, **flags)
        return out, out.get(AUX) or {}

    def _adapt(self, modules, student_out) -> dict:
        """Runs inside the student's forward (see llmkd.knowledge.adapters)."""
        return {
            name: term.adapt(modules[name], student_out)
            for term in self.terms
            if (name := str(term.index)) in modules
        }

    def _teacher_forward(self, inputs, training):
        if training and not any(t.needs for t in self.terms):
            return None  # a task-loss-only baseline trains without the teacher (evaluation still runs it)
        return self.source.outputs(inputs, self.forward_flags(training))

    # ---- metrics: sums and counts ------------------------------------------------------------------
    def _eval_columns(self, columns, student_out, teacher_out, inputs, local) -> None:
        # Agreement compares argmaxes over one label space or vocabulary: not for scores, nor across the
        # vocabularies of two tokenizers (classes stay classes whatever each side reads).
        has_targets = teacher_out is not None and (
            teacher_out.logits is not None or teacher_out.topk is not None
        )
        own_vocabulary = self.source.input_prefix and self.pair.task == CAUSAL_LM
        if has_targets and not self.pair.regression and not own_vocabulary:
            agree = agreement(student_out.logits, teacher_out, inputs, self.pair.task, self.pair.vocab_rows)
            columns["agreement"] = (agree, local["targets"])
        self.tally.add_per_example("eval", columns, self.accelerator.gather_for_metrics)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Trainer's `loss` and `train_loss` are means of per-step losses; each term's value over every item since
        # the last log (or since the start) replaces them, so loss = Σ weight · term holds for any logging_steps.
        reduce = (lambda t: self.accelerator.reduce(t, reduction="sum")) if self.args.world_size > 1 else None
        for key, split in (("loss", "train"), ("train_loss", "run")):
            if key in logs:
                values = self.tally.flush(split, reduce)
                logs[key] = self._mix(values, default=logs[key])
                if split == "train":
                    logs.update(values)
                    self.diagnostics.check(logs)
        super().log(logs, start_time)

    def _mix(self, values: dict[str, float], default: float | None = None) -> float | None:
        """Σ weight · value over the terms that have items in `values` (None / default if none has)."""
        present = [t for t in self.terms if t.name in values]
        return sum(t.term.weight * values[t.name] for t in present) if present else default

    def evaluation_loop(self, *args, **kwargs):
        self.tally.reset("eval")
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        values = self.tally.flush("eval")
        if values:  # the loss over every evaluated item, not a mean of per-batch losses
            output.metrics[f"{prefix}_loss"] = self._mix(values)
        output.metrics.update({f"{prefix}_{k}": v for k, v in values.items()})
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Always the distillation loss, labels or not (the base class skips the loss without labels).
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), outputs.logits.detach(), inputs.get("labels")

    # ---- data and checkpoints ----------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        # remove_unused_columns must keep what the teacher source and the scheme read.
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            extra = self.source.columns() | set(self.scheme_columns())
            self._signature_columns += sorted(extra - set(self._signature_columns))

    def scheme_columns(self) -> list[str]:
        return []

    def _engine_checkpoints(self) -> bool:
        """FSDP and DeepSpeed checkpoint the whole wrapped model, auxiliary modules included, themselves."""
        return self.is_fsdp_enabled or self.is_deepspeed_enabled

    def save_checkpoint_extras(self, folder: str) -> None:
        # Called by SafeCheckpoints._save_checkpoint after transformers' files, before the completion marker.
        if len(self.aux) and self.args.should_save and not self._engine_checkpoints():
            self.aux.save(folder)
        if len(self.own_optimizers) and self.args.should_save:
            self.own_optimizers.save(folder)
        self.source.save(folder, self)  # a source with state of its own (a mean teacher) keeps it here

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if len(self.aux) and not self._engine_checkpoints():
            self.aux.load(resume_from_checkpoint, self.args.device)
        if len(self.own_optimizers):
            self.own_optimizers.load(resume_from_checkpoint)
        self.source.load(resume_from_checkpoint, self)

    def _load_best_model(self):
        super()._load_best_model()
        if len(self.aux) and not self._engine_checkpoints():  # the student's best state, and its projectors'
            self.aux.load(self.state.best_model_checkpoint, self.args.device)

    @property
    def fused(self) -> bool:
        """Whether the logit terms take the fused path in training (llmkd.losses.fused_logit_distillation)."""
        return any(getattr(t, "fused", False) for t in self.terms)

    @property
    def vocab_rows(self) -> int | None:
        """Logit rows the two sides share (padded vocabularies with vocab_mismatch=slice); None: all."""
        return self.pair.vocab_rows

    @property
    def auxiliary_modules(self):
        """The trainable helpers of the loss (projectors, …): an nn.ModuleDict keyed by term index."""
        return self.aux.modules

    @property
    def teacher(self):
        """The teacher model, or the source itself when it has no model (a logit cache)."""
        model = getattr(self.source, "model", None)
        return self.source if model is None else model

    @property
    def student(self):
        return base_model(self.model)
