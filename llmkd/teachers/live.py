"""A live teacher: a frozen transformers model, run under no_grad in eval mode at every step.

Placement by back-end (`teacher_placement: auto` picks the first of each row):
- one device / DDP / ZeRO-1/2: a plain copy on every process (those back-ends do not shard parameters);
- FSDP2: sharded with ``fully_shard`` layer by layer and at the root (re-sharded after every forward), without an
  optimizer, or replicated (``teacher_placement: replicate``);
- FSDP (v1): wrapped by the same plugin; ZeRO-3: its own DeepSpeed inference engine, so no GPU holds a full copy.
The teacher is never given to an optimizer, never wrapped by DDP and never saved.
"""

from __future__ import annotations

import copy
import inspect
import logging

import torch
from accelerate.utils import DistributedType
from torch import nn

from llmkd.modeling import CAUSAL_LM, base_model, forward_keys, main_input, output_rows, task_of
from llmkd.teachers.base import TeacherOutputs, TeacherSource

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Where a pair with different tokenizers should go instead (named by the mismatch errors).
CROSS_TOKENIZER_HINT = (
    "a cross-tokenizer loss (ULD, Boizard et al. 2024) for such pairs: `trainer: cross_tokenizer` in a recipe, or "
    "llmkd.schemes.CrossTokenizerTrainer with a CrossTokenizerConfig (uld_weight, hard_label_weight) on data "
    "tokenised by both tokenizers (llmkd.data.loading.tokenize_pairs); see docs/cross_tokenizer.md"
)


class LiveTeacher(TeacherSource):
    """`model` as a teacher source. `input_prefix="teacher_"` makes it read its own tokenisation of each example."""

    # attention_relations: its forward runs the q/k/v projections llmkd.knowledge.attention_relation hooks
    provides = frozenset({"logits", "hidden_states", "attentions", "attention_relations"})

    def __init__(self, model: nn.Module, input_prefix: str = ""):
        if not isinstance(model, nn.Module):
            raise TypeError(f"the teacher must be a transformers model, got {type(model).__name__}")
        self.model = self.module = model
        self.input_prefix = input_prefix
        self.task = task_of(model)
        self.config = base_model(model).config
        self.keys = forward_keys(model)
        self._accepts = set(inspect.signature(base_model(model).forward).parameters)

    def columns(self) -> set[str]:
        return {self.input_prefix + k for k in self.keys} | {self.input_prefix + "labels"}

    def required_columns(self) -> set[str]:
        # Its own inputs of each example (llmkd.data.loading.tokenize_pairs, llmkd.data.paired); else the
        # student's ids. A causal LM also needs its own labels (which of its tokens are targets).
        if not self.input_prefix:
            return set()
        labels = {self.input_prefix + "labels"} if self.task == CAUSAL_LM else set()
        return {self.input_prefix + main_input(self.model)} | labels

    # -- checks before training --------------------------------------------------------------------
    def check(self, pair) -> None:
        check_not_shared(pair.student, self.model)
        if not self.input_prefix:  # the teacher reads the student's token ids
            check_tokenizers(pair.student_tokenizer, pair.teacher_tokenizer)
            check_embedding_rows(pair.student_tokenizer, self.model)

    # -- placement ---------------------------------------------------------------------------------
    def place(self, trainer) -> None:
        model, args, accelerator = self.model, trainer.args, trainer.accelerator
        model.requires_grad_(False)
        model.eval()
        if args.teacher_dtype in DTYPES:
            model.to(DTYPES[args.teacher_dtype])
        backend = accelerator.distributed_type
        shard = args.teacher_placement != "replicate"
        if backend == DistributedType.DEEPSPEED and shard and _zero_stage(accelerator) == 3:
            self.module = _zero3_engine(model, accelerator, args)
        elif backend == DistributedType.FSDP and shard:
            self.module = _fsdp(model, accelerator)
        else:
            self.module = model.to(accelerator.device)

    # -- per batch ---------------------------------------------------------------------------------
    def outputs(self, batch: dict, flags: dict) -> TeacherOutputs:
        if self.model.training:  # whoever flipped it, the teacher runs in eval mode (no dropout)
            self.model.eval()
        prefix = self.input_prefix
        inputs = {k: batch[prefix + k] for k in self.keys if prefix + k in batch}
        kwargs = {k: v for k, v in flags.items() if k in self._accepts or k.startswith("output_")}
        if "use_cache" in self._accepts:
            kwargs["use_cache"] = False  # the teacher never decodes: no KV cache to build
        with torch.no_grad():
            out = self.module(**inputs, **kwargs)
        return TeacherOutputs(
            logits=out.logits,
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
        )


def _zero_stage(accelerator) -> int | None:
    return accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage")


def _zero3_engine(model, accelerator, args):
    import deepspeed  # only present where DeepSpeed is used

    config = zero3_inference_config(
        accelerator.state.deepspeed_plugin.deepspeed_config, args.per_device_train_batch_size
    )
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def _fsdp(model, accelerator):
    if getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
        wrapped = accelerator.prepare_model(model)
        wrapped.eval()
        return wrapped
    # accelerate prepares FSDP2 models only together with an optimizer; a frozen teacher has none, so it is
    # sharded here with torch's own fully_shard, one unit per transformer layer and one at the root.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.to(accelerator.device)
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)  # else embeddings and head stay gathered
    return model


def zero3_inference_config(student_config: dict, micro_batch_size: int) -> dict:
    """The student's DeepSpeed config turned into a ZeRO-3 inference config: same stage-3 settings and precision,
    no optimizer, scheduler or gradient settings ("auto" values DeepSpeed cannot resolve without them)."""
    config = copy.deepcopy(student_config)
    for key in (
        "optimizer",
        "scheduler",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "train_batch_size",
    ):
        config.pop(key, None)
    zero = {
        k: v for k, v in config.get("zero_optimization", {}).items() if v != "auto"
    }  # auto: from the model
    zero["stage"] = 3
    config["zero_optimization"] = zero
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    for precision in ("bf16", "fp16"):
        if isinstance(config.get(precision), dict) and config[precision].get("enabled") == "auto":
            config[precision] = {"enabled": False}
    return config


# ---- pair checks ---------------------------------------------------------------------------------------------


def check_not_shared(student: nn.Module, teacher: nn.Module) -> None:
    if student is teacher:
        raise ValueError("the teacher is the same object as the student; load or copy a separate teacher")
    student_params = {id(p) for p in student.parameters()}
    if any(id(p) in student_params for p in teacher.parameters()):
        raise ValueError("the teacher shares parameters with the student; give the teacher its own copy")


def check_tokenizers(student_tok, teacher_tok) -> None:
    """The teacher reads the student's token ids: both tokenizers must map every token to the same id."""
    if student_tok is None or teacher_tok is None or student_tok is teacher_tok:
        return
    vs, vt = student_tok.get_vocab(), teacher_tok.get_vocab()
    if vs != vt:
        differing = sorted(k for k in set(vs) | set(vt) if vs.get(k) != vt.get(k))[:5]
        raise ValueError(
            f"tokenizer mismatch: student ({len(vs)} tokens) and teacher ({len(vt)} tokens) map tokens to "
            f"different ids, e.g. {differing}, but the teacher reads the student's token ids; use the teacher's "
            "tokenizer for the student, or " + CROSS_TOKENIZER_HINT
        )


def check_embedding_rows(student_tok, teacher: nn.Module) -> None:
    """Ids the student's tokenizer produces must exist in the teacher's input embedding."""
    embeddings = base_model(teacher).get_input_embeddings()
    if student_tok is None or embeddings is None:
        return
    if len(student_tok) > embeddings.weight.shape[0]:
        raise ValueError(
            f"the student's tokenizer has {len(student_tok)} tokens but the teacher's embedding only "
            f"{embeddings.weight.shape[0]} rows: the teacher cannot read the student's ids; use the teacher's "
            "tokenizer, or " + CROSS_TOKENIZER_HINT
        )


def check_vocab(student: nn.Module, teacher: nn.Module, mismatch: str, shared: int | None) -> int | None:
    """Logit rows to compare (None = all). Padded vocabularies are sliced only on opt-in (never zero-padded)."""
    v_s, v_t = output_rows(student), output_rows(teacher)
    if v_s == v_t and shared is None:
        return None
    if mismatch != "slice":
        raise ValueError(
            f"vocabulary mismatch: the student has {v_s} logit rows, the teacher {v_t}. If they share a tokenizer "
            "and only the lm_head padding differs, set vocab_mismatch=slice (optionally shared_vocab_size=N); "
            "otherwise the pair needs " + CROSS_TOKENIZER_HINT
        )
    size = shared if shared is not None else min(v_s, v_t)
    if not 0 < size <= min(v_s, v_t):
        raise ValueError(
            f"shared_vocab_size={size} must be in 1..{min(v_s, v_t)} (student {v_s}, teacher {v_t})"
        )
    return size
