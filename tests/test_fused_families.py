"""Property tier: for every causal-LM family, the trainer's fused logit path gives the plain path's loss and
gradients, or the trainer does not take it (soft-capped or scaled logits, where it would compute other logits).

The teacher is a family model from tests/test_architectures.py; the student keeps two of its layers. In float64
(the fused path's closed-form gradients and autograd round differently in float32), except for the families whose
float64 forward transformers does not support on padded batches (sliding-window masks give NaN rows; MoE grouped
matmuls refuse float64): those run in float32 with tolerances at float32 rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import training_settings
from test_architectures import CAUSAL, TRANSFORMS, batch, teacher

from llmkd import DistillationConfig, DistillationTrainer
from llmkd.students import student_from_teacher

TERM = {"knowledge": "logits", "loss": "jsd", "beta": 0.3}


def step(model, student, tmp_path, fused: bool):
    """(loss, student gradients) of one training-mode compute_loss + backward on the architecture batch."""
    args = DistillationConfig(
        **training_settings(
            tmp_path, terms=[TERM], hard_label_weight=0.0, fused_logits=fused, temperature=1.5
        )
    )
    trainer = DistillationTrainer(model=student, teacher=model, args=args)
    inputs = batch(model)
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    student.train()
    loss = trainer.compute_loss(student, trainer._prepare_inputs(inputs))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return trainer, loss.detach(), grads


FLOAT32 = {"mistral", "qwen2", "qwen3_moe", "gemma2", "gemma3_text", "cohere2", "smollm3"}


@pytest.mark.parametrize("family, cls", CAUSAL)
def test_fused_equals_plain_or_is_not_taken(family, cls, tmp_path):
    exact = family not in FLOAT32
    model = copy.deepcopy(teacher(family, cls)).to(torch.float64 if exact else torch.float32)
    base = student_from_teacher(model, [0, 3])
    with torch.no_grad():  # move the student away from the teacher so that the loss has gradients
        for p in base.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    fused_trainer, fused_loss, fused_grads = step(model, copy.deepcopy(base), tmp_path / "f", fused=True)
    if (
        family in TRANSFORMS
    ):  # soft-capped or scaled logits: the plain path, and fused_logits=False is refused
        assert not fused_trainer.fused
        return
    plain_trainer, plain_loss, plain_grads = step(model, copy.deepcopy(base), tmp_path / "p", fused=False)
    assert fused_trainer.fused and not plain_trainer.fused
    assert torch.isfinite(fused_loss) and fused_loss > 1e-6
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-10 if exact else 1e-5, atol=0)
    assert set(fused_grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        scale = grad.abs().max().clamp(min=1e-30)
        gap = ((fused_grads[name] - grad).abs().max() / scale).item()
        assert gap < (1e-8 if exact else 2e-5), (name, gap)  # float32: 2e-6 seen at most
