"""Teacher placement: frozen and in eval mode everywhere; ZeRO-3 gets its own inference config."""

from __future__ import annotations

import torch
from conftest import BertForSequenceClassification, bert_config, seeded
from test_trainer import TERMS, make_trainer

from llmkd.teachers.live import zero3_inference_config


def test_zero3_inference_config_keeps_sharding_and_drops_training_parts():
    student = {
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": "auto",
            "overlap_comm": True,
            "offload_param": {"device": "cpu"},
        },
        "optimizer": {"type": "AdamW"},
        "scheduler": {"type": "WarmupLR"},
        "gradient_accumulation_steps": 4,
        "gradient_clipping": 1.0,
        "train_batch_size": "auto",
        "bf16": {"enabled": True},
        "fp16": {"enabled": "auto"},
    }
    config = zero3_inference_config(student, micro_batch_size=8)
    assert config["zero_optimization"] == {
        "stage": 3,
        "overlap_comm": True,
        "offload_param": {"device": "cpu"},
    }
    assert not {"optimizer", "scheduler", "gradient_accumulation_steps", "gradient_clipping"} & set(config)
    assert config["train_micro_batch_size_per_gpu"] == 8
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert student["optimizer"] == {"type": "AdamW"}  # the student's config is not modified
    # a ZeRO-2 student config still gives a stage-3 teacher engine (the teacher is sharded, never trained)
    assert zero3_inference_config({"zero_optimization": {"stage": 2}}, 1)["zero_optimization"]["stage"] == 3


def test_teacher_dtype_casts_only_the_teacher(tmp_path):
    teacher = seeded(BertForSequenceClassification, bert_config(), 0)
    student = seeded(BertForSequenceClassification, bert_config(layers=2, hidden=16), 1)
    trainer = make_trainer(
        teacher, student, "cls", tmp_path, TERMS["logits"], teacher_dtype="bfloat16", max_steps=1
    )
    assert {p.dtype for p in trainer.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    trainer.train()  # mixed dtypes: the losses compute in float32 whatever comes in
    assert trainer.teacher.training is False


def test_accelerate_configs_parse_and_name_their_backend():
    import pathlib

    import yaml

    folder = pathlib.Path(__file__).resolve().parent.parent / "recipes" / "accelerate"
    backends = {}
    for path in folder.glob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        assert path.read_text().startswith("#"), f"{path.name} must start with its launch command"
        backends[path.stem] = config["distributed_type"]
    assert backends == {
        "cpu_2proc": "MULTI_GPU",
        "single_gpu": "NO",
        "multi_gpu_ddp": "MULTI_GPU",
        "fsdp": "FSDP",
        "fsdp2": "FSDP",
        "deepspeed_zero2": "DEEPSPEED",
        "deepspeed_zero3": "DEEPSPEED",
    }
