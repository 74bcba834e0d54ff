"""FSDP2 on 2 CPU processes (gloo): the tiny Llama pair of ddp_worker.py, trained with the student fully sharded.

Run as `torchrun --standalone --nproc_per_node 2 tests/fsdp_worker.py OUT_DIR PLACEMENT [resume]` by
tests/test_fsdp.py. PLACEMENT is the config's teacher_placement: auto (the teacher sharded with fully_shard) or
replicate. accelerate 1.15 enables FSDP only on GPU back-ends: on a CPU-only machine it silently falls back to
DDP (MULTI_CPU). `CpuFSDP` switches accelerate's shared state to FSDP after the Trainer built its accelerator, which
is what a GPU machine gets from `accelerate launch --use_fsdp --fsdp_version 2`; everything after that (sharding
the student with fully_shard, the teacher placement, the auxiliary projector inside the student's forward, saving
and resuming) is the library's own code path.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from accelerate.state import AcceleratorState, PartialState  # noqa: E402
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin  # noqa: E402
from conftest import LlamaForCausalLM, llama_config, lm_dataset, make_tokenizer, seeded  # noqa: E402
from ddp_worker import TERMS  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from llmkd import DistillationConfig, DistillationTrainer  # noqa: E402

FSDP2 = {
    "version": 2,
    "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
    "reshard_after_forward": True,
    "state_dict_type": "FULL_STATE_DICT",
}


class CpuFSDP(DistillationTrainer):
    """DistillationTrainer with accelerate's state set to FSDP on a machine without GPUs (see the module doc)."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        plugin = FullyShardedDataParallelPlugin(**(self.args.fsdp_plugin_args or {}))
        AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
        AcceleratorState._shared_state["fsdp_plugin"] = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.is_fsdp_enabled = True


def trainer(out_dir: str, placement: str, **overrides) -> DistillationTrainer:
    tok = make_tokenizer("llama")
    settings = dict(
        output_dir=out_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
        learning_rate=0.1, optim="sgd", save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
        use_cpu=True, terms=TERMS, hard_label_weight=0.5, logging_steps=1, ddp_backend="gloo", fsdp=True,
        fsdp_config=FSDP2, teacher_placement=placement,
    )  # fmt: skip
    args = DistillationConfig(**(settings | overrides))
    return CpuFSDP(
        model=seeded(LlamaForCausalLM, llama_config(layers=2, hidden=16), 1),
        teacher=seeded(LlamaForCausalLM, llama_config(), 0),
        args=args, train_dataset=lm_dataset(8, seed=3), processing_class=tok, teacher_processing_class=tok,
    )  # fmt: skip


def full_state(t) -> dict:
    """The student's full weights (gathered from the shards) and its projector, on rank 0."""
    state = t.accelerator.get_state_dict(t.model)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def facts(t) -> dict:
    sharded = lambda module: any(type(p).__name__ == "DTensor" for p in module.parameters())  # noqa: E731
    return {
        "world_size": t.args.world_size,
        "distributed_type": str(t.accelerator.distributed_type),
        "student_sharded": sharded(t.model),
        "teacher_sharded": sharded(t.teacher),
        "aux_sharded": sharded(t.auxiliary_modules),
        "logs": [h for h in t.state.log_history if "loss" in h],
    }


def main(out_dir: str, placement: str, resume: bool) -> None:
    t = trainer(out_dir, placement)
    t.train()
    state, info = full_state(t), facts(t)
    t.save_model(os.path.join(out_dir, "final"))
    if resume:  # 4 steps, checkpoint at 2, resumed from it: the same weights as 4 steps in one go
        # AdamW: resuming plain SGD (no optimizer state) fails inside torch.distributed.checkpoint under FSDP2
        # ("Expected device to be set"), a torch/accelerate limit outside llmkd.
        adam = {"optim": "adamw_torch", "learning_rate": 0.01, "max_steps": 4}
        whole = trainer(
            os.path.join(out_dir, "whole"), placement, save_strategy="steps", save_steps=2, **adam
        )
        whole.train()
        again = trainer(os.path.join(out_dir, "again"), placement, **adam)
        again.train(resume_from_checkpoint=os.path.join(out_dir, "whole", "checkpoint-2"))
        pairs = zip(full_state(whole).values(), full_state(again).values())  # empty off rank 0
        info["resume_gap"] = max(((a - b).abs().max().item() for a, b in pairs), default=None)
    if t.is_world_process_zero():
        save_file(state, os.path.join(out_dir, "student.safetensors"))
        with open(os.path.join(out_dir, "facts.json"), "w") as handle:
            json.dump(info, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], len(sys.argv) > 3)
    torch.distributed.barrier()  # leave together: a rank exiting mid-talk can make gloo abort its peer
    torch.distributed.destroy_process_group()
