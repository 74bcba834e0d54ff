"""LoRA and QLoRA students through `peft`: the student's base stays frozen, only low-rank adapters learn.

LoRA (Hu et al. 2021, arXiv 2106.09685) adds ΔW = (α/r)·B·A with A ∈ R^{r×k}, B ∈ R^{d×r} (B = 0 at start)
beside each frozen weight W, so the student starts as its base model and trains r·(d+k) numbers per layer.
QLoRA (Dettmers et al. 2023, arXiv 2305.14314) keeps the frozen base in 4-bit NormalFloat (NF4) and
backpropagates through it into the adapters.

As a `DistillationTrainer` student a `PeftModel` behaves like its base model (llmkd.modeling unwraps it for
task, config, forward keys and the output head); the trainer's checkpoints and final save write the adapter
(`adapter_model.safetensors` + `adapter_config.json`), not the full model. `merge_and_save` writes a plain one.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import torch
from packaging.version import Version
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

from llmkd import modeling as A

TASK_TYPES = {A.CAUSAL_LM: TaskType.CAUSAL_LM, A.SEQ_CLS: TaskType.SEQ_CLS}
# transformers 5 loads 4-bit weights only with bitsandbytes >= 0.46.1, whose CPU backend also runs them.
BNB_MIN_VERSION = Version("0.46.1")
QLORA_FIX = "pip install 'llmkd[qlora]' (or pip install 'bitsandbytes>=0.46.1')"


def _check_lora_args(r, alpha, dropout, target_modules, modules_to_save) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"lora r (the adapter rank) must be a positive integer, got {r!r}; typical: 8 or 16")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(
            f"lora alpha must be > 0, got {alpha!r}; the adapter is scaled by alpha/r (typical 2r)"
        )
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"lora dropout must be in [0, 1), got {dropout!r}")
    for key, value in (("target_modules", target_modules), ("modules_to_save", modules_to_save)):
        ok = value is None or isinstance(value, str)
        ok = ok or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))
        if not ok:
            raise ValueError(f"lora {key} must be a module name, a list of names or null, got {value!r}")


def lora_config(
    model: nn.Module, r=8, alpha=16, dropout=0.0, target_modules=None, modules_to_save=None
) -> LoraConfig:
    """The `peft.LoraConfig` for `model`'s task. `target_modules=None` means every Linear layer except the
    output head ("all-linear"), which QLoRA found necessary to match full fine-tuning. Sequence classifiers
    also train their (freshly initialised) head: peft adds `classifier`/`score` to `modules_to_save`."""
    _check_lora_args(r, alpha, dropout, target_modules, modules_to_save)
    if isinstance(model, PeftModel):
        raise ValueError(
            "the model already carries peft adapters; pass its base model (model.get_base_model())"
        )
    targets = "all-linear" if target_modules is None else target_modules
    return LoraConfig(
        task_type=TASK_TYPES[A.task_of(model)],
        r=r,
        lora_alpha=alpha,
        lora_dropout=float(dropout),
        target_modules=list(targets) if isinstance(targets, (list, tuple)) else targets,
        modules_to_save=None if modules_to_save is None else list(modules_to_save),
    )


def lora_student(
    model: nn.Module, r=8, alpha=16, dropout=0.0, target_modules=None, modules_to_save=None
) -> PeftModel:
    """Wraps a causal LM or sequence classifier in LoRA adapters; every base parameter is frozen."""
    config = lora_config(model, r, alpha, dropout, target_modules, modules_to_save)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:  # peft names the unmatched modules; add which ones exist
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"lora target_modules={target_modules!r}: {err}; Linear layers here: {names}"
        ) from err
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise ValueError(f"lora target_modules={target_modules!r} left no trainable parameter")
    return peft_model


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Trainable vs total parameter counts (what a LoRA report should state)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total}


def load_lora_student(adapter_dir: str | os.PathLike, base: nn.Module, trainable: bool = False) -> PeftModel:
    """Re-attaches a saved adapter (the trainer's output or a checkpoint) to its base model."""
    path = os.fspath(adapter_dir)
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise FileNotFoundError(f"{path} holds no adapter_config.json: it is not a LoRA adapter folder")
    return PeftModel.from_pretrained(base, path, is_trainable=trainable)


def merge_and_save(model: PeftModel, out_dir: str | os.PathLike, processing_class=None) -> nn.Module:
    """Folds the adapters into the base weights (W + (α/r)·B·A) and saves a plain transformers checkpoint.

    Consumes `model` (peft's `merge_and_unload` works in place, so no second copy of the weights is made).
    For a QLoRA student, reload the base in full precision with `load_lora_student` first: merging into
    4-bit weights rounds the adapter away."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"merge_and_save needs a peft PeftModel, got {type(model).__name__}")
    if getattr(model.get_base_model(), "is_loaded_in_4bit", False):
        raise ValueError(
            "this LoRA student's base is 4-bit (QLoRA): reload the base in full precision, attach the adapter "
            "with load_lora_student(adapter_dir, base) and merge that"
        )
    merged = model.merge_and_unload()
    merged.save_pretrained(os.fspath(out_dir))
    if processing_class is not None:
        processing_class.save_pretrained(os.fspath(out_dir))
    return merged


# ---- QLoRA ---------------------------------------------------------------------------------------


def check_qlora_available(device: str | None = None) -> None:
    """Fails with the missing piece and the fix, before any model is loaded."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            f"QLoRA loads the frozen base in 4-bit NF4 through bitsandbytes, which is not installed: {QLORA_FIX}"
        )
    version = Version(importlib.metadata.version("bitsandbytes"))
    if version < BNB_MIN_VERSION:
        raise RuntimeError(
            f"bitsandbytes {version} is too old: transformers loads 4-bit NF4 weights with bitsandbytes>="
            f"{BNB_MIN_VERSION} (which also runs them on CPU); upgrade it: {QLORA_FIX}"
        )
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            "QLoRA on device='cuda' but torch sees no CUDA GPU; use device='cpu' or a GPU machine"
        )


def qlora_student(
    name_or_path: str | os.PathLike,
    task: str = A.CAUSAL_LM,
    r=8,
    alpha=16,
    dropout=0.0,
    target_modules=None,
    modules_to_save=None,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: str | None = None,
    gradient_checkpointing: bool = False,
    **from_pretrained_kwargs,
) -> PeftModel:
    """Loads `name_or_path` with its Linear layers in 4-bit NF4 (double quantisation, as in QLoRA), prepares it
    for k-bit training (norms in float32, input grads) and adds LoRA adapters. `device` defaults to CUDA when
    available, else CPU (bitsandbytes >= 0.46.1 has a CPU backend: slow, but fine for smoke tests)."""
    if task not in TASK_TYPES:
        raise ValueError(f"task must be one of {sorted(TASK_TYPES)}, got {task!r}")
    _check_lora_args(r, alpha, dropout, target_modules, modules_to_save)
    check_qlora_available(device)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    auto = AutoModelForCausalLM if task == A.CAUSAL_LM else AutoModelForSequenceClassification
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = auto.from_pretrained(
        os.fspath(name_or_path), quantization_config=quant, device_map={"": device}, **from_pretrained_kwargs
    )
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing)
    return lora_student(base, r, alpha, dropout, target_modules, modules_to_save)
