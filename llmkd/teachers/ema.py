"""A mean teacher: an exponential moving average (EMA) of the student's own weights, as a teacher source.

Tarvainen & Valpola (2017), "Mean teachers are better role models: Weight-averaged consistency targets improve
semi-supervised deep learning results", NeurIPS, arXiv 1703.01780. After every optimizer step t (not every
micro-batch: `TrainerCallback.on_step_end` fires once per optimizer step, after gradient accumulation):

    θ_T ← d_t · θ_T + (1 − d_t) · θ_S,    d_t = d,  or with ``warmup``  d_t = min(d, 1 − 1/(t + 1))

(the warm-up is the authors' PyTorch code, `update_ema_variables` in CuriousAI/mean-teacher: while 1/(t+1) > 1 − d
the teacher is the plain mean of the students θ_S,0 … θ_S,t). Buffers are copied from the student. The teacher
starts as the student at the start of training, after the engine has placed (and DDP broadcast) it.

The average is kept in float32 or wider whatever the student's dtype (auto ``teacher_dtype``): with d = 0.999 a
bfloat16 average would round every update of (1 − d)·Δθ away and freeze. The teacher runs like a live teacher
(`LiveTeacher.outputs`: eval mode, no dropout, no gradients), is never a submodule of the student (so neither in
the optimizer nor in any saved student), and is checkpointed beside each ``checkpoint-N``
(``llmkd_mean_teacher.safetensors`` + the step in ``llmkd_mean_teacher.json``) and restored on resume. Under DDP
every process holds the same student after each step, hence the same average. FSDP and DeepSpeed ZeRO-3 shard the
student's parameters, so no process holds the full θ_S to average: refused.
"""

from __future__ import annotations

import copy
import json
import logging
import os

import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save
from torch import nn
from transformers import TrainerCallback

from llmkd.atomic import atomic_write, write_json
from llmkd.knowledge.adapters import AUX, detach
from llmkd.teachers.live import LiveTeacher

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "llmkd_mean_teacher.safetensors"
STATE_FILE = "llmkd_mean_teacher.json"


MEAN_TEACHER_DIR = (
    "mean-teacher"  # in output_dir at the end of training: the averaged model, a plain checkpoint
)


class MeanTeacher(LiveTeacher):
    """The EMA of `student` as the teacher. Pass the same `student` as the trainer's ``model=``.

    Args:
        student: the model the trainer trains (its copy becomes the teacher).
        decay: d in [0, 1): the weight of the old average at each step (the paper: 0.99, then 0.999).
        warmup: use d_t = min(d, 1 − 1/(t + 1)) (the authors' code) instead of d from the first step.

    Raises ValueError for a decay outside [0, 1), and (before training) for a trainer whose student is another
    model, for a half-precision ``teacher_dtype`` and for FSDP / DeepSpeed ZeRO-3.
    """

    def __init__(self, student: nn.Module, decay: float = 0.999, warmup: bool = False):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(
                f"mean teacher decay must be a number in [0, 1), got {decay!r} (the paper uses 0.99 or 0.999; "
                "1 would never move the teacher)"
            )
        if not isinstance(warmup, bool):
            raise ValueError(f"mean teacher warmup must be true or false, got {warmup!r}")
        self.student = _unwrapped(student)
        self.decay, self.warmup = float(decay), warmup
        self.restored = False  # set by `load`: a resumed run keeps the saved average
        super().__init__(frozen_copy(self.student))

    def check(self, pair) -> None:
        if _unwrapped(pair.student) is not self.student:
            raise ValueError(
                "MeanTeacher(student) was given another model than the trainer's model=: the teacher must "
                "average the student being trained; pass the same object to both"
            )
        super().check(pair)

    def place(self, trainer) -> None:
        _refuse_sharded(trainer)
        if trainer.args.teacher_dtype in ("bfloat16", "float16"):
            raise ValueError(
                f"teacher_dtype={trainer.args.teacher_dtype} for a mean teacher: an average kept in half "
                f"precision rounds away updates of (1 - decay) = {1 - self.decay:g} of a weight change, so the "
                "teacher would stop moving; use teacher_dtype: auto or float32"
            )
        reference = next(p for p in self.student.parameters() if p.is_floating_point())
        dtype = torch.float32 if trainer.args.teacher_dtype == "float32" else average_dtype(reference.dtype)
        self.model.to(device=reference.device, dtype=dtype)
        self.model.requires_grad_(False)
        self.model.eval()
        self.module = self.model
        self._pairs()  # the student's tensors still match the copy's (refused here, not after step 1)
        if not any(
            isinstance(c, MeanTeacherUpdate) and c.source is self for c in trainer.callback_handler.callbacks
        ):
            trainer.add_callback(MeanTeacherUpdate(self))

    # -- the average -------------------------------------------------------------------------------
    def decay_at(self, step: int) -> float:
        """d_t after optimizer step `step` (1 for the first step)."""
        return min(self.decay, 1.0 - 1.0 / (step + 1)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        """θ_T ← d_t θ_T + (1 − d_t) θ_S for every floating-point parameter; everything else is copied."""
        d = self.decay_at(step)
        for target, source in self._pairs():
            if target.is_floating_point():
                target.mul_(d).add_(source.detach().to(target.dtype), alpha=1.0 - d)
            else:
                target.copy_(source)

    @torch.no_grad()
    def sync(self) -> None:
        """θ_T ← θ_S (the start of training)."""
        for target, source in self._pairs():
            target.copy_(source.detach())

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        mine, theirs = teacher_tensors(self.model), teacher_tensors(self.student)
        if set(mine) != set(theirs):
            raise ValueError(
                "the student's parameters changed names since the mean teacher copied it (e.g. adapters added "
                f"after the copy): only in the student {sorted(set(theirs) - set(mine))[:5]}, only in the teacher "
                f"{sorted(set(mine) - set(theirs))[:5]}; build MeanTeacher from the final student"
            )
        return [(mine[name], theirs[name]) for name in mine]

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self, folder: str, trainer) -> None:
        if not trainer.args.should_save:
            return
        state = {k: v.detach().cpu().contiguous() for k, v in teacher_tensors(self.model).items()}
        atomic_write(os.path.join(folder, WEIGHTS_FILE), lambda handle: handle.write(save(state)), "wb")
        step = trainer.state.global_step
        write_json(
            os.path.join(folder, STATE_FILE), {"step": step, "decay": self.decay, "warmup": self.warmup}
        )

    def load(self, folder: str, trainer) -> None:
        weights, meta = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, STATE_FILE)
        if not (os.path.isfile(weights) and os.path.isfile(meta)):
            raise FileNotFoundError(
                f"{weights} or {meta} is missing: this checkpoint holds no mean teacher to resume from (it was not "
                "written by a mean-teacher run); resuming would restart the average from the student"
            )
        with open(meta, encoding="utf-8") as handle:
            saved = json.load(handle)
        step = _checkpoint_step(folder)
        if step is not None and saved["step"] != step:
            raise ValueError(
                f"{meta} was taken at step {saved['step']} but {folder} is step {step}: the folder mixes two runs; "
                "resume from a checkpoint written by one run"
            )
        if (saved["decay"], saved["warmup"]) != (self.decay, self.warmup):
            logger.warning(
                "resuming a mean teacher saved with decay=%s warmup=%s under decay=%s warmup=%s",
                saved["decay"], saved["warmup"], self.decay, self.warmup,
            )  # fmt: skip
        loaded, mine = load_file(weights), teacher_tensors(self.model)
        if set(loaded) != set(mine):
            raise ValueError(
                f"{weights} holds other tensors than this run's student ({sorted(set(loaded) ^ set(mine))[:5]}); "
                "resume with the student the checkpoint was trained with"
            )
        with torch.no_grad():
            for name, tensor in mine.items():
                tensor.copy_(loaded[name])
        self.restored = True


class MeanTeacherUpdate(TrainerCallback):
    """Starts the average at the student when training starts; updates it after every optimizer step."""

    def __init__(self, source: MeanTeacher):
        self.source = source

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0 and not self.source.restored:  # after DDP's broadcast of the student
            self.source.sync()

    def on_step_end(self, args, state, control, **kwargs):
        self.source.update(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.source.restored = False  # a later train() without resume starts from the student again
        if (
            state.is_world_process_zero
        ):  # the average is often the better model (the paper evaluates it): keep it
            folder = os.path.join(args.output_dir, MEAN_TEACHER_DIR)
            self.source.model.save_pretrained(folder)
            if kwargs.get("processing_class") is not None:
                kwargs["processing_class"].save_pretrained(folder)


def frozen_copy(student: nn.Module) -> nn.Module:
    """A deep copy of the student without the auxiliary modules a trainer may have attached to it."""
    clone = copy.deepcopy(student)
    detach(clone)
    return clone.requires_grad_(False).eval()


def teacher_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (each shared one once: tied embeddings) and buffers, auxiliary modules left out."""
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    return {k: v for k, v in named.items() if AUX not in k.split(".")}


def average_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or the student's dtype where it is wider (float64)."""
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else torch.float32


def _unwrapped(model: nn.Module) -> nn.Module:
    while isinstance(getattr(model, "module", None), nn.Module):  # DDP and accelerate wrappers
        model = model.module
    return model


def _refuse_sharded(trainer) -> None:
    accelerator = trainer.accelerator
    zero3 = (
        accelerator.distributed_type == DistributedType.DEEPSPEED
        and accelerator.state.deepspeed_plugin.zero_stage == 3
    )
    if trainer.is_fsdp_enabled or zero3:
        raise ValueError(
            "a mean teacher averages the student's full weights, but FSDP / DeepSpeed ZeRO-3 shard them across "
            "processes; train with DDP or DeepSpeed ZeRO-1/2 (accelerate configs multi_gpu_ddp.yaml, "
            "deepspeed_zero2.yaml)"
        )


def _checkpoint_step(folder: str) -> int | None:
    from transformers.trainer import TRAINER_STATE_NAME  # the Trainer module is heavy: only when resuming

    path = os.path.join(folder, TRAINER_STATE_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle).get("global_step")
