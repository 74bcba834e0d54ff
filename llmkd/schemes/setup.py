"""Everything the base trainer checks and decides before training: the pair, the terms, the collator, the facts.

Each function raises a ValueError naming the values and the fix; nothing here runs a training step.
"""

from __future__ import annotations

import logging

from torch import nn

from llmkd.data.collate import DistillationCollator, RightPadded, padding_id
from llmkd.knowledge import KNOWLEDGE, LabelKnowledge, Pair, label_term
from llmkd.knowledge.logits import LogitKnowledge
from llmkd.modeling import (
    CAUSAL_LM,
    SEQ_CLS,
    is_causal,
    is_encoder_decoder,
    output_rows,
    task_of,
    text_config,
)
from llmkd.teachers.live import LiveTeacher, check_vocab

logger = logging.getLogger(__name__)


def make_pair(student: nn.Module, source, args, student_tok, teacher_tok) -> Pair:
    """The run's task (the student's; a teacher of another task is refused) and the logit rows compared."""
    task = task_of(student)
    if source.task != task:
        raise ValueError(f"the student is a {task} model but the teacher a {source.task} model")
    config = text_config(student)
    if getattr(config, "problem_type", None) == "multi_label_classification":
        raise ValueError("multi-label classification is not supported yet; use single-label or regression")
    pair = Pair(
        student, source, args, task, task == SEQ_CLS and config.num_labels == 1, student_tok, teacher_tok
    )
    if task == SEQ_CLS:
        check_labels(config, source.config.get_text_config())
        _check_pad_ids(config, source)
        _check_decoder_classifier(student, "student")
    pair.vocab_rows = _vocab_rows(pair)
    return pair


def _check_decoder_classifier(model, role: str) -> None:
    """Decoder classifiers find each row's last token by the pad id: without one, any padded batch fails."""
    config = model.config
    if getattr(config, "pad_token_id", None) is None and is_causal(model):
        raise ValueError(
            f"the {role} is a decoder classifier ({type(model).__name__}) without config.pad_token_id: it finds "
            "each row's last token by the pad id, so padded batches fail; set config.pad_token_id (e.g. to the "
            "tokenizer's pad or EOS id) on both models"
        )


def _check_pad_ids(student_config, source) -> None:
    """Batches are padded with the student's pad id, and decoder classifiers pool the last token that is not
    their own pad id: a teacher reading those batches with another pad id would pool a padded slot."""
    if not isinstance(source, LiveTeacher) or source.input_prefix:
        return
    ids = (getattr(student_config, "pad_token_id", None), getattr(source.config, "pad_token_id", None))
    if None not in ids and ids[0] != ids[1]:
        raise ValueError(
            f"pad id mismatch: the student's config.pad_token_id={ids[0]}, the teacher's {ids[1]}; classifiers "
            "that pool their last token find it by the pad id, so set the student's pad_token_id to the teacher's"
        )


def _vocab_rows(pair: Pair) -> int | None:
    """Rows of the logits both sides share, for logit terms and agreement (causal LMs with a live teacher)."""
    source, args = pair.source, pair.args
    if pair.task != CAUSAL_LM or not isinstance(source, LiveTeacher) or source.input_prefix:
        return None
    compares = any(t.knowledge == "logits" for t in args.terms) or args.hard_label_weight > 0
    if compares or args.vocab_mismatch == "slice":
        return check_vocab(pair.student, source.model, args.vocab_mismatch, args.shared_vocab_size)
    rows = (output_rows(pair.student), output_rows(source.model))
    return None if rows[0] == rows[1] else min(rows)  # agreement only: over the shared rows


def check_labels(student_config, teacher_config) -> None:
    """Sequence classifiers must predict the same classes in the same order."""
    cs, ct = student_config, teacher_config
    if cs.num_labels != ct.num_labels:
        raise ValueError(
            f"label mismatch: student num_labels={cs.num_labels}, teacher num_labels={ct.num_labels}; build the "
            f"student with num_labels={ct.num_labels} and the teacher's label2id"
        )
    default = {f"LABEL_{i}": i for i in range(ct.num_labels)}
    ls, lt = dict(cs.label2id or default), dict(ct.label2id or default)
    if ls != lt and default not in (ls, lt):
        raise ValueError(
            f"label mismatch: student label2id={ls}, teacher label2id={lt}; give the student the teacher's "
            "label2id/id2label so that logit k means the same class in both"
        )


def build_terms(terms, pair: Pair) -> list:
    """One knowledge object per term (+ the task loss when hard_label_weight > 0), names made unique."""
    _check_encoder_decoder(terms, pair)
    built = [KNOWLEDGE[term.knowledge](term, pair, i) for i, term in enumerate(terms)]
    if pair.args.hard_label_weight > 0:
        built.append(LabelKnowledge(label_term(pair.args.hard_label_weight), pair, len(built)))
    labels = [t.name for t in built]
    for t in built:  # the same knowledge and loss on other layers: tell the logs apart
        if labels.count(t.name) > 1:
            t.name = f"{t.name}_{t.index}"
    missing = {need for t in built for need in t.needs} - set(pair.source.provides)
    if missing:
        users = sorted({t.term.knowledge for t in built if set(t.needs) & missing})
        raise ValueError(
            f"{users} terms need the teacher's {sorted(missing)}, which this teacher source "
            f"({type(pair.source).__name__}) does not provide; drop those terms or use a live teacher"
        )
    for t in built:
        cached_t = getattr(pair.source, "temperature", None)
        if isinstance(t, LogitKnowledge) and t.cached and pair.task == CAUSAL_LM:
            _check_cache_temperature(t.temperature_value, cached_t, pair.source)
    return built


def _check_encoder_decoder(terms, pair: Pair) -> None:
    """Encoder-decoder models return encoder and decoder states separately: feature terms cannot pick one."""
    features = sorted(
        {t.knowledge for t in terms if KNOWLEDGE[t.knowledge].needs & {"hidden_states", "attentions"}}
    )
    teacher = getattr(pair.source, "model", None)
    two_stacks = [m for m in (pair.student, teacher) if m is not None and is_encoder_decoder(m)]
    if features and two_stacks:
        raise ValueError(
            f"{features} terms compare hidden states or attention maps, but {type(two_stacks[0]).__name__} is an "
            "encoder-decoder model (separate encoder and decoder states); distil its logits only"
        )


def _check_cache_temperature(temperature: float, cached: float, source) -> None:
    from llmkd.teachers.cached.fingerprint import FIX, CacheMismatchError

    if float(temperature) != cached:
        raise CacheMismatchError(
            f"temperature {temperature} differs from the teacher cache's {cached} (the cached log-probabilities are "
            f"softmax(z / {cached})); set temperature: {cached} or {FIX}"
        )


def check_datasets(args, task: str, train_dataset, eval_dataset, source=None) -> None:
    """Empty datasets, a missing label column (training), and the columns the teacher source needs, per split."""
    datasets = [("train", train_dataset)] + (
        list(eval_dataset.items()) if isinstance(eval_dataset, dict) else [("eval", eval_dataset)]
    )
    required = source.required_columns() if source is not None else set()
    for split, data in datasets:
        if data is not None and hasattr(data, "__len__") and len(data) == 0:
            raise ValueError(
                f"the {split} dataset is empty; check the data files and any max_samples setting"
            )
        columns = getattr(data, "column_names", None)
        missing = sorted(required - set(columns)) if columns is not None else []
        if missing:
            raise ValueError(
                f"the {split} dataset has no {missing} (columns {columns}), which the teacher source "
                f"{type(source).__name__} reads for every row: " + _MISSING_HINT.get(missing[0], "add them")
            )
    columns = getattr(train_dataset, "column_names", None)
    unlabelled = columns is not None and not {"label", "labels"} & set(columns)
    if args.hard_label_weight > 0 and unlabelled and task == SEQ_CLS:  # causal LMs label themselves
        raise ValueError(
            f"hard_label_weight={args.hard_label_weight} needs a 'label' column, but the training data has only "
            f"{columns}; add labels or set hard_label_weight=0 to distil from the teacher alone"
        )


_MISSING_HINT = {
    "cache_index": "build the datasets with llmkd.teachers.cached.binding.cached_trainer_kwargs",
    "teacher_input_ids": "encode them with both processors: llmkd.data.paired.encode_pairs (classifiers) or "
    "llmkd.data.loading.tokenize_pairs (causal LMs)",
    "teacher_labels": "tokenise them with both tokenizers: llmkd.data.loading.tokenize_pairs",
} | {
    f"teacher_{c}": "encode them with both processors: llmkd.data.paired.encode_pairs"
    for c in ("input_values", "input_features", "pixel_values")
}


def collator(user_collator, pair: Pair):
    """llmkd's collator by default; any other one wrapped so its batches follow the padding contract."""
    config = pair.student.config
    if user_collator is None:
        own_stream = getattr(pair.source, "input_prefix", "")
        teacher_tok, teacher_config = (
            (pair.teacher_tokenizer, pair.source.config) if own_stream else (None, None)
        )
        return DistillationCollator(
            pair.student_tokenizer,
            pair.task == CAUSAL_LM,
            teacher_tok,
            config=config,
            teacher_config=teacher_config,
        )
    if isinstance(user_collator, RightPadded):
        return user_collator
    return RightPadded(user_collator, padding_id(pair.student_tokenizer, config))


def check_optimizer(optimizers, aux) -> None:
    """A user's optimizer built before the trainer cannot hold the auxiliary modules the trainer adds."""
    optimizer = (optimizers or (None, None))[0]
    if optimizer is None or not len(aux):
        return
    known = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if any(id(p) not in known for p in aux.modules.parameters()):
        raise ValueError(
            f"optimizers=(optimizer, scheduler) was built before the trainer added its auxiliary modules "
            f"({', '.join(aux.modules)}: e.g. projectors), so they would never be updated; pass "
            "optimizer_cls_and_kwargs instead, or let the trainer create the optimizer"
        )


def facts(trainer) -> dict[str, bool]:
    """What the run is, for llmkd.schemes.config.check_settings (which fields take effect)."""
    terms, pair, args = trainer.terms, trainer.pair, trainer.args
    live = isinstance(pair.source, LiveTeacher)
    logit_terms = [t for t in terms if isinstance(t, LogitKnowledge)]
    uses_config_t = [t for t in terms if getattr(t, "temperature_value", None) is not None]
    rows = (output_rows(pair.student), output_rows(pair.source.model)) if live else (0, 0)
    zero3 = trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    return {
        "global_temperature": any(t.term.temperature is None and not pair.regression for t in uses_config_t),
        "vocab_differs": live
        and not pair.source.input_prefix
        and pair.task == CAUSAL_LM
        and rows[0] != rows[1],
        "slice": args.vocab_mismatch == "slice",
        "fused_possible": trainer.would_fuse,
        "fused": any(t.fused for t in logit_terms),
        "sharded_backend": trainer.is_fsdp_enabled or zero3,
        "hard_labels": args.hard_label_weight > 0 and not pair.regression,
    }


def decide_fused(trainer) -> bool:
    """Logit terms take the fused path when no other term needs the full logits and both heads are plain.

    Returns whether the path would be taken with fused_logits=True (so that the setting can be checked)."""
    terms, pair = trainer.terms, trainer.pair
    logit_terms = [t for t in terms if isinstance(t, LogitKnowledge)]
    others = [t for t in terms if not isinstance(t, LogitKnowledge)]
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled  # the heads are shards there
    if not logit_terms or any(t.needs_full_logits(True) for t in others) or sharded:
        return False
    if pair.task != CAUSAL_LM or not isinstance(pair.source, LiveTeacher):
        return False
    if pair.source.input_prefix or any(t.cached for t in logit_terms):
        return False
    from llmkd.students.heads import head_mismatch

    reasons = [r for r in (head_mismatch(pair.student), head_mismatch(pair.source.model)) if r]
    if reasons:
        logger.info("fused logit path not used: %s", "; ".join(reasons))
        return False
    for term in logit_terms:
        term.fused = bool(trainer.args.fused_logits)
    return True


def check_best_metric(args, terms) -> None:
    """metric_for_best_model naming an llmkd term must name one this run logs (terms repeated on other layers
    are logged as <name>_<index>)."""
    name = (args.metric_for_best_model or "").removeprefix("eval_")
    logged = {t.name for t in terms} | {"loss", "agreement"}
    if (name.startswith("distill/") or name == "loss_ce") and name not in logged:
        raise ValueError(
            f"metric_for_best_model={args.metric_for_best_model!r} is not logged by this run; its terms are "
            f"{sorted(t.name for t in terms)} (prefixed with eval_ in evaluation)"
        )


def check_engine_settings(args, terms) -> None:
    """Engine settings that break a term, refused before training; those that apply in part, said once."""
    checkpointing = getattr(args, "activation_checkpointing", False) or args.gradient_checkpointing
    kwargs = (
        getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs or {}
    )
    attention = [t.name for t in terms if "attentions" in t.needs]
    if checkpointing and isinstance(kwargs, dict) and kwargs.get("use_reentrant") and attention:
        raise ValueError(
            f"gradient checkpointing with use_reentrant=True returns attention maps without a gradient, so "
            f"{attention} would train nothing; use use_reentrant: false (transformers' default) or drop the term"
        )
    if args.use_liger_kernel:  # its fused linear + cross-entropy needs labels in the student's forward
        logger.warning(
            "use_liger_kernel: Liger's kernels patch the student (RMSNorm, RoPE, SwiGLU), but its fused "
            "cross-entropy never runs, because llmkd computes the loss itself; fused_logits is llmkd's own "
            "memory-lean logit path"
        )


def check_relation_batches(trainer) -> None:
    """Relation and graph terms compare the examples of one batch (N >= 2): a batch of one example, every batch at
    batch size 1 or a last batch of one, would fail mid-run; refused here, naming the fix."""
    from llmkd.knowledge.relation import RelationKnowledge

    names = [t.name for t in trainer.terms if isinstance(t, RelationKnowledge)]
    if not names:
        return
    args, world = trainer.args, max(trainer.args.world_size, 1)
    evals = trainer.eval_dataset if isinstance(trainer.eval_dataset, dict) else {"eval": trainer.eval_dataset}
    splits = [("train", trainer.train_dataset, args.per_device_train_batch_size)]
    splits += [(name, data, args.per_device_eval_batch_size) for name, data in evals.items()]
    for split, data, size in splits:
        if data is None or not hasattr(data, "__len__") or args.dataloader_drop_last:
            continue
        rows = -(-len(data) // world)  # per process (the distributed sampler pads to equal shares)
        if size == 1 or rows % size == 1:
            raise ValueError(
                f"{names} compare the examples of a batch (N >= 2), but the {split} data's {len(data)} rows in "
                f"batches of {size} per process ({world} process(es)) leave a batch of one example; set "
                "dataloader_drop_last: true or another batch size"
            )
