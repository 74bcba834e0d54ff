"""Auxiliary modules: trainable helpers of the loss (projectors today; discriminators, exit heads, peer heads next).

They are attached to the student as ONE submodule, ``llmkd_aux``, and run inside the student's forward (a forward
hook), so every engine treats them as part of the student: DDP all-reduces their gradients with the student's,
FSDP and DeepSpeed shard and gather them with it, the optimizer, gradient clipping and zero_grad see them, and
they follow the student's device and dtype. Three things keep them out of the result:

- saving: their keys are in the student's ``_keys_to_ignore_on_save``, so ``save_pretrained`` (and every final
  output folder) holds the plain student; a checkpoint gets them beside it in ``llmkd_aux.safetensors``
  (FSDP/DeepSpeed checkpoints hold them inside the engine's own state, which their resume restores);
- the hook does nothing unless a trainer asked for it (`AuxiliaryModules.run`), so the student used on its own
  computes exactly what it computed before;
- ``describe``/parameter counts of the student skip them (`student_parameters`), any export of the student's
  state honours ``_keys_to_ignore_on_save`` as ``save_pretrained`` does, and a new trainer given the same
  student first removes what an earlier one attached (`detach`).

The idea of wrapping loss-side modules with the student so that the engine sees them follows torchdistill
(Matsubara 2021, "torchdistill: A Modular, Configuration-Driven Framework for Knowledge Distillation").
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

from safetensors.torch import load_file, save
from torch import nn

from llmkd.atomic import atomic_write

AUX = "llmkd_aux"
AUX_FILE = "llmkd_aux.safetensors"


class AuxiliaryModules:
    """The student's auxiliary modules (name -> module), attached to `owner` (the model given to the trainer)."""

    def __init__(self, owner: nn.Module, modules: dict[str, nn.Module]):
        self.owner = owner
        self.modules = nn.ModuleDict(modules)
        self._pending: Callable | None = None
        detach(owner)  # a student trained before carries the modules of its previous trainer: not this run's
        if not modules:
            return
        reference = next((p for p in owner.parameters() if p.is_floating_point()), None)
        if reference is not None:  # the student's device and dtype
            self.modules.to(device=reference.device, dtype=reference.dtype)
        owner.add_module(AUX, self.modules)
        _hide_from_saves(owner, {f"{AUX}.{k}" for k in self.modules.state_dict()})
        owner._llmkd_aux_hook = owner.register_forward_hook(self._hook)

    def __len__(self) -> int:
        return len(self.modules)

    def __getitem__(self, name: str) -> nn.Module:
        return self.modules[name]

    def __contains__(self, name: str) -> bool:
        return name in self.modules

    @contextlib.contextmanager
    def run(self, compute: Callable[[nn.ModuleDict, object], dict]):
        """Within the block, the student's forward also returns ``output["llmkd_aux"] = compute(modules, output)``."""
        self._pending = compute
        try:
            yield
        finally:
            self._pending = None

    def _hook(self, module, args, output):
        if self._pending is None or not isinstance(output, dict):
            return None
        # A subclass that declares the field: DDP (find_unused_parameters) and FSDP2 (output casts) rebuild the
        # output from its declared fields, so a key merely added to the dict would be refused or dropped.
        return _with_aux(type(output))(**output, **{AUX: self._pending(self.modules, output)})

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self, folder: str) -> None:
        """Beside a checkpoint, never inside the student's weights (the checkpoint stays a plain model)."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.modules.state_dict().items()}
        atomic_write(os.path.join(folder, AUX_FILE), lambda handle: handle.write(save(state)), "wb")

    def load(self, folder: str, device) -> None:
        path = os.path.join(folder, AUX_FILE)
        if os.path.isfile(path):
            self.modules.load_state_dict(load_file(path, device=str(device)))
            return
        raise FileNotFoundError(
            f"{os.path.join(folder, AUX_FILE)} is missing: this checkpoint has no weights for the auxiliary modules "
            f"({', '.join(self.modules)}, e.g. projectors) to resume from"
        )


@functools.cache
def _with_aux(cls: type) -> type:
    """`cls` (a transformers ModelOutput dataclass) with one more field, ``llmkd_aux``."""
    return dataclasses.make_dataclass(
        f"{cls.__name__}WithAux", [(AUX, Any, dataclasses.field(default=None))], bases=(cls,)
    )


def detach(owner: nn.Module) -> None:
    """Removes the auxiliary modules (and their hook) a previous trainer attached to `owner`; the student is then
    exactly the model it was before."""
    hook = getattr(owner, "_llmkd_aux_hook", None)
    if hook is not None:
        hook.remove()
        del owner._llmkd_aux_hook
    if AUX in owner._modules:
        del owner._modules[AUX]
        ignored = getattr(owner, "_keys_to_ignore_on_save", None) or ()
        owner._keys_to_ignore_on_save = {k for k in ignored if not k.startswith(f"{AUX}.")}


def _hide_from_saves(owner: nn.Module, keys: set[str]) -> None:
    """Adds `keys` to ``_keys_to_ignore_on_save`` (matched exactly by transformers' save_pretrained)."""
    current = getattr(owner, "_keys_to_ignore_on_save", None)
    owner._keys_to_ignore_on_save = set(current or ()) | keys


def student_parameters(model: nn.Module) -> int:
    """Parameters of the student itself, without its auxiliary modules."""
    return sum(p.numel() for name, p in model.named_parameters() if AUX not in name.split("."))


def linear_projector(width_in: int, width_out: int) -> nn.Linear:
    """TinyBERT's W_h: a learnt linear map from the student's hidden width to the teacher's."""
    return nn.Linear(width_in, width_out)
