"""Optimizers of their own for auxiliary modules (a GAN discriminator: `Knowledge.own_optimizer`).

The module still lives in the student's ``llmkd_aux`` submodule, so DDP all-reduces its gradients with the
student's and it follows the student's device and dtype; only its optimizer differs:

- the trainer's optimizer never holds its parameters (they are hidden while transformers builds it);
- clipping: with max_grad_norm > 0, each own optimizer's parameters are clipped to max_grad_norm on their own
  and the student's (with its projectors) apart, so a discriminator's gradient norm never shrinks the student's
  step nor the reverse; the logged grad_norm is the trainer's optimizer's;
- it steps in ``on_optimizer_step``: right after the trainer's optimizer, before ``model.zero_grad()`` (which
  clears both), so once per accumulation window, from the same accumulated gradients; its learning rate is
  constant (the trainer's scheduler is not applied to it);
- its state is written beside each checkpoint as ``llmkd_own_optimizers.safetensors`` (tensors) +
  ``llmkd_own_optimizers.json`` (hyper-parameters, step counts that are not tensors), and restored on resume.

Engines that own the optimizer (DeepSpeed) or shard the parameters (FSDP), and fp16 loss scaling (whose scaler
unscales only the trainer's optimizer), are refused before training.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from safetensors.torch import load_file, save
from transformers import TrainerCallback

from llmkd.atomic import atomic_write

OWN_FILE = "llmkd_own_optimizers"


class OwnOptimizers:
    """name -> optimizer for the parameters that the trainer's optimizer must leave alone."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers

    def __len__(self) -> int:
        return len(self.optimizers)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for opt in self.optimizers.values() for group in opt.param_groups for p in group["params"]]

    def check(self, trainer) -> None:
        """Refuses, before training, the settings under which the own optimizers would not work as stated."""
        if not self.optimizers:
            return
        # A user's optimizers=(optimizer, …) cannot reach here: built before the trainer, it misses the new
        # modules and llmkd.schemes.setup.check_optimizer refuses it.
        problems = []
        if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
            problems.append(
                "FSDP and DeepSpeed own or shard the optimizer; train with DDP (accelerate launch)"
            )
        if trainer.args.fp16:
            problems.append("fp16 loss scaling unscales only the trainer's optimizer's gradients; use bf16")
        if problems:
            raise ValueError(
                f"terms {sorted(self.optimizers)} train with an optimizer of their own (a discriminator): "
                + "; ".join(problems)
            )

    @contextlib.contextmanager
    def hidden(self):
        """Within the block the own parameters do not require a gradient, so an optimizer built from the
        model's trainable parameters (transformers' create_optimizer, any optimizer factory) leaves them out."""
        params = [p for p in self.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    def check_disjoint(self, optimizer) -> None:
        own = {id(p) for p in self.parameters()}
        if any(id(p) in own for group in optimizer.param_groups for p in group["params"]):
            raise ValueError(
                f"the trainer's optimizer ({type(optimizer).__name__}) holds parameters of {sorted(self.optimizers)}, "
                "which have an optimizer of their own; use an optimizer built from trainable parameters only"
            )

    def clip(self, max_norm: float) -> None:
        for opt in self.optimizers.values():
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], max_norm)

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)

    # -- checkpoints: safetensors + JSON, nothing pickled --------------------------------------------
    def save(self, folder: str) -> None:
        tensors, meta = {}, {}
        for name, opt in self.optimizers.items():
            state = opt.state_dict()
            meta[name] = {"param_groups": state["param_groups"], "state": {}}
            for index, values in state["state"].items():
                for key, value in values.items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"{name}/{index}/{key}"] = value.detach().cpu().contiguous()
                    else:
                        meta[name]["state"].setdefault(str(index), {})[key] = value
        atomic_write(os.path.join(folder, f"{OWN_FILE}.safetensors"), lambda h: h.write(save(tensors)), "wb")
        # Strict JSON (no default=str): a hyper-parameter that JSON cannot hold fails here, not on resume.
        text = json.dumps(meta, indent=2)
        atomic_write(os.path.join(folder, f"{OWN_FILE}.json"), lambda handle: handle.write(text))

    def load(self, folder: str) -> None:
        paths = [os.path.join(folder, f"{OWN_FILE}.{ext}") for ext in ("safetensors", "json")]
        if not all(os.path.isfile(p) for p in paths):
            raise FileNotFoundError(
                f"{paths[0]} or its .json is missing: this checkpoint has no state for the own optimizers of "
                f"auxiliary modules {sorted(self.optimizers)} (e.g. a discriminator's Adam) to resume from"
            )
        # On the CPU, as torch saves them: load_state_dict moves the moments to each parameter's device and keeps
        # Adam's step count where Adam keeps it (the CPU, unless capturable or fused).
        tensors = load_file(paths[0], device="cpu")
        with open(paths[1], encoding="utf-8") as handle:
            meta = json.load(handle)
        if sorted(meta) != sorted(self.optimizers):
            raise ValueError(
                f"the checkpoint's own optimizers are {sorted(meta)}, this run's {sorted(self.optimizers)}; resume "
                "with the terms the checkpoint was trained with"
            )
        for name, opt in self.optimizers.items():
            state: dict[int, dict] = {int(i): dict(v) for i, v in meta[name]["state"].items()}
            for key, tensor in tensors.items():
                owner, index, field = key.split("/")
                if owner == name:
                    state.setdefault(int(index), {})[field] = tensor
            opt.load_state_dict({"state": state, "param_groups": meta[name]["param_groups"]})


class StepOwnOptimizers(TrainerCallback):
    """Steps the own optimizers right after the trainer's optimizer (transformers' ``on_optimizer_step``)."""

    def __init__(self, own: OwnOptimizers):
        self.own = own

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.own.step()
