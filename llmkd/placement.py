"""Where the frozen teacher lives under each `accelerate` back-end.

DDP / one device / ZeRO-1/2: a plain copy on every process (those back-ends do not shard parameters).
ZeRO-3: the teacher is its own DeepSpeed inference engine, so its parameters are sharded like the student's and
gathered layer by layer (a full copy per GPU is what ZeRO-3 users cannot afford).
FSDP (v1): the teacher is FSDP-wrapped by the same plugin, for the same reason; it is never given to an optimizer.
"""

from __future__ import annotations

import copy

import torch
from accelerate.utils import DistributedType
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    zero = dict(config.get("zero_optimization", {}))
    zero = {
        k: v for k, v in zero.items() if v != "auto"
    }  # auto sizes come from the trainer's model, not ours
    zero["stage"] = 3
    config["zero_optimization"] = zero
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    for precision in ("bf16", "fp16"):
        if isinstance(config.get(precision), dict) and config[precision].get("enabled") == "auto":
            config[precision] = {"enabled": False}
    return config


def place_teacher(teacher: nn.Module, accelerator, args) -> nn.Module:
    """Freezes the teacher and puts it where the back-end needs it; returns the module to call."""
    teacher.requires_grad_(False)
    teacher.eval()
    dtype = DTYPES.get(args.teacher_dtype)
    if dtype is not None:
        teacher.to(dtype)
    backend = accelerator.distributed_type
    if backend == DistributedType.DEEPSPEED:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        if ds_config.get("zero_optimization", {}).get("stage") == 3:
            import deepspeed  # only present where DeepSpeed is used

            config = zero3_inference_config(ds_config, args.per_device_train_batch_size)
            engine, *_ = deepspeed.initialize(model=teacher, config=config)
            engine.eval()
            return engine
    if backend == DistributedType.FSDP:
        if getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2:
            raise ValueError(
                "FSDP2 needs a model and an optimizer to shard, and a frozen teacher has no optimizer; use "
                "fsdp_version: 1 in the accelerate config (or DDP / DeepSpeed ZeRO-3)"
            )
        wrapped = accelerator.prepare_model(teacher)
        wrapped.eval()
        return wrapped
    return teacher.to(accelerator.device)
