"""`SafeCheckpoints`: the checkpoint and Hub behaviour every llmkd trainer shares (KDTrainer and `finetune`'s).

- Checkpoints are complete or ignored: transformers writes its files, the scheme adds its own
  (`save_checkpoint_extras`), every rank waits, then the main process marks the folder complete
  (llmkd.publish.checkpoints) and only then rotates old checkpoints and pushes (so a kill never leaves fewer
  complete checkpoints than before, nor pushes a half-written one). `resume_from_checkpoint: true` resumes from
  the last complete checkpoint.
- Nothing pickled: TrainingArguments as JSON, and optimizer, scheduler, AMP scaler and RNG states as safetensors
  + JSON (llmkd.publish.state). Under DeepSpeed, FSDP, XLA or SageMaker the engine writes its own optimizer files
  (transformers' code path, loaded there with `torch.load(weights_only=True)`); a checkpoint written by plain
  transformers still resumes, through the same `weights_only=True` loads.
- `push_to_hub: true`: pushes as transformers does (checkpoints during training per `hub_strategy`, the output
  folder at the end), without `training_args.bin`, and keeps llmkd's model card.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from transformers import Trainer
from transformers.trainer_pt_utils import set_rng_state_for_device
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, rotate_checkpoints
from transformers.training_args import ParallelMode
from transformers.utils import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_SAFE_WEIGHTS_NAME,
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    PushInProgress,
    is_sagemaker_mp_enabled,
    is_torch_hpu_available,
    is_torch_mlu_available,
    is_torch_musa_available,
    is_torch_npu_available,
    is_torch_xla_available,
)
from transformers.utils.hub import hf_api

from llmkd.publish.checkpoints import discard_checkpoint, mark_complete, resolve_resume, save_training_args
from llmkd.publish.state import has_state, load_state, save_state

HUB_IGNORE = ["_*", f"{PREFIX_CHECKPOINT_DIR}-*"]  # as transformers' pushes: no checkpoints, no private files


class SafeCheckpoints:
    """Mixin for a `transformers.Trainer` subclass (listed before Trainer): see the module docstring."""

    _saving_checkpoint = False

    def save_checkpoint_extras(self, folder: str) -> None:
        """Hook: a scheme's own files in checkpoint `folder` (auxiliary modules, …), written before the marker."""

    # ---- resume ------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        resume = resolve_resume(resume_from_checkpoint, self.args.output_dir, discard=self.args.should_save)
        return super().train(resume, *args, **kwargs)

    # ---- saving --------------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            save_training_args(self.args, output_dir if output_dir is not None else self.args.output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            discard_checkpoint(folder)
        self._everyone()
        # Rotation and pushes wait for the marker: transformers would run them before the scheme's extras.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        self._saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
            self.save_checkpoint_extras(folder)
        finally:
            self.args.save_total_limit, self._saving_checkpoint = limit, False
        self._everyone()
        if self.args.should_save:
            mark_complete(folder, self.state.global_step)
            rotate_checkpoints(run_dir, limit, self.state.best_model_checkpoint, use_mtime=True)
        if self.args.push_to_hub:
            self._push_checkpoint(folder)

    def _everyone(self) -> None:
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()

    def _plain_engine(self) -> bool:
        """Whether transformers' optimizer files come from the plain code path (one torch.save of the state)."""
        engine = self.is_deepspeed_enabled or self.is_fsdp_enabled
        return not (engine or is_torch_xla_available() or is_sagemaker_mp_enabled())

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._plain_engine():
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_state(self.optimizer.state_dict(), output_dir, "optimizer")
            save_state(self.lr_scheduler.state_dict(), output_dir, "scheduler")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self._plain_engine() or not has_state(checkpoint, "optimizer"):
            return super()._load_optimizer_and_scheduler(
                checkpoint
            )  # engines, or a plain transformers folder
        # As transformers: on the CPU in one process (load_state_dict moves the moments), per GPU in several.
        device = self.args.device if self.args.world_size > 1 and self.args.device.type != "cpu" else "cpu"
        self.optimizer.load_state_dict(load_state(checkpoint, "optimizer", device))
        self.lr_scheduler.load_state_dict(load_state(checkpoint, "scheduler"))

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or is_torch_xla_available():
            return super()._save_scaler(output_dir)
        if self.args.should_save:
            save_state(scaler.state_dict(), output_dir, "scaler")

    def _load_scaler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not has_state(checkpoint, "scaler") or is_torch_xla_available():
            return super()._load_scaler(checkpoint)
        self.accelerator.scaler.load_state_dict(load_state(checkpoint, "scaler"))

    def _rng_name(self) -> str:
        return "rng_state" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}"

    @staticmethod
    def _other_accelerator() -> bool:
        """Devices whose RNG transformers saves besides CPU and CUDA: their states stay in its format."""
        checks = (
            is_torch_xla_available,
            is_torch_npu_available,
            is_torch_hpu_available,
            is_torch_mlu_available,
        )
        return any(check() for check in (*checks, is_torch_musa_available))

    def _save_rng_state(self, output_dir: str) -> None:
        if self._other_accelerator():
            return super()._save_rng_state(output_dir)
        states = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cpu": torch.random.get_rng_state(),
        }
        if torch.cuda.is_available():
            distributed = self.args.parallel_mode == ParallelMode.DISTRIBUTED
            states["cuda"] = (
                torch.cuda.random.get_rng_state_all() if distributed else torch.cuda.random.get_rng_state()
            )
        os.makedirs(output_dir, exist_ok=True)  # a rank may get here before rank 0 made the folder
        save_state(states, output_dir, self._rng_name())

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None or not has_state(checkpoint, self._rng_name()):
            return super()._load_rng_state(checkpoint)
        states = load_state(checkpoint, self._rng_name())
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        torch.random.set_rng_state(states["cpu"])
        if torch.cuda.is_available() and "cuda" in states:
            distributed = self.args.parallel_mode == ParallelMode.DISTRIBUTED
            set_rng_state_for_device("CUDA", torch.cuda, states, distributed)

    # ---- the Hub -------------------------------------------------------------------------------------
    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if not self._saving_checkpoint:  # inside _save_checkpoint the push waits for the marker
            self._push_checkpoint(checkpoint_folder)

    def _push_checkpoint(self, checkpoint_folder: str) -> None:
        """transformers' `_push_from_checkpoint`, with training_args.json in place of its pickle."""
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if (
            not self.args.hub_always_push
            and self.push_in_progress is not None
            and not self.push_in_progress.is_done()
        ):
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        output_dir = self.args.output_dir
        for name in _model_files(checkpoint_folder):  # no second gathering of the weights: copy them
            _copy(os.path.join(checkpoint_folder, name), os.path.join(output_dir, name))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        save_training_args(self.args, output_dir)
        message = f"Training in progress, step {self.state.global_step}"
        upload = {"repo_id": self.hub_model_id, "token": self.args.hub_token, "run_as_future": True}
        upload["revision"] = self.args.hub_revision
        jobs = [
            hf_api().upload_folder(
                folder_path=output_dir, commit_message=message, ignore_patterns=HUB_IGNORE, **upload
            )
        ]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            last = self.args.hub_strategy == HubStrategy.CHECKPOINT
            where = "last-checkpoint" if last else os.path.basename(checkpoint_folder)
            jobs.append(
                hf_api().upload_folder(
                    folder_path=checkpoint_folder,
                    path_in_repo=where,
                    commit_message=f"{message}, checkpoint",
                    **upload,
                )
            )
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)

    def push_output_dir(self, commit_message: str = "End of training"):
        """Uploads the finished output folder (student, tokenizer, model card, report) as `Trainer.push_to_hub`
        does, without saving the model again (a merged LoRA model has already consumed its adapters).
        Returns the CommitInfo on the main process, None elsewhere and when push_to_hub is off."""
        if not self.args.push_to_hub:
            return None
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        if not self.is_world_process_zero():
            return None
        if self.hub_model_id is None:
            self.init_hf_repo()
        self._finish_current_push()
        return hf_api().upload_folder(
            repo_id=self.hub_model_id,
            folder_path=self.args.output_dir,
            commit_message=commit_message,
            token=self.args.hub_token,
            ignore_patterns=HUB_IGNORE,
            revision=self.args.hub_revision,
        )

    def create_model_card(self, *args, **kwargs) -> None:
        """`Trainer.push_to_hub` calls this: llmkd's card (kept if the folder has one) instead of transformers'."""
        if not self.is_world_process_zero():
            return
        from llmkd.publish.card import is_llmkd_card, write_model_card

        if not is_llmkd_card(os.path.join(self.args.output_dir, "README.md")):
            write_model_card(self, measure_models=False)


class FinetuneTrainer(SafeCheckpoints, Trainer):
    """`transformers.Trainer` with llmkd's checkpoints (complete or ignored, no pickles) and Hub pushes."""


def _model_files(folder: str) -> list[str]:
    import json

    names = [
        CONFIG_NAME,
        GENERATION_CONFIG_NAME,
        SAFE_WEIGHTS_NAME,
        ADAPTER_CONFIG_NAME,
        ADAPTER_SAFE_WEIGHTS_NAME,
    ]
    index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            names += [SAFE_WEIGHTS_INDEX_NAME, *sorted(set(json.load(handle)["weight_map"].values()))]
    return [name for name in names if os.path.isfile(os.path.join(folder, name))]


def _copy(source: str, target: str) -> None:
    import shutil

    shutil.copyfile(source, target + ".tmp")
    os.replace(target + ".tmp", target)
