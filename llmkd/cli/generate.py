"""`llmkd generate RECIPE.yaml [--field value …]`: synthesise a transfer set from the teacher (data-free KD).

The recipe names a `method` (teacher_sampling, zerogen, gibbs or inversion), the models, and the method's config
fields. Under `torchrun` / `accelerate launch recipes/generate.py RECIPE.yaml`, every process loads the models on
its own device and writes its own shards; the main process merges them (see llmkd.data.synthesis.io).
"""

from __future__ import annotations

import dataclasses
import difflib

from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from llmkd.cli.recipe import parse_overrides, read_yaml

MODEL_KEYS = (
    "teacher",
    "teacher_revision",
    "generator",
    "generator_revision",
    "student",
    "mlm",
    "mlm_revision",
    "trust_remote_code",
)


def _device():
    """This process's device; under torchrun / accelerate launch it also joins the process group."""
    from accelerate import PartialState

    return PartialState().device


def _load(kind, name: str, revision: str | None, trust: bool):
    from llmkd.cli.preflight import check_model_folder
    from llmkd.students.loading import resolve_path  # `embedded:smollm2-135m-instruct` and the like

    name = resolve_path(name)
    check_model_folder("model", name)  # llmkd.cli.preflight: a missing path, a folder without a tokenizer
    model, info = kind.from_pretrained(
        name, revision=revision, trust_remote_code=trust, output_loading_info=True
    )
    if kind is AutoModelForMaskedLM and info.get("missing_keys"):
        # A classifier checkpoint loads as a masked LM with a random head: its samples would be noise.
        raise ValueError(
            f"mlm={name!r} has no trained masked-LM head (missing {sorted(info['missing_keys'])[:4]}); use a "
            "checkpoint trained with masked language modelling, e.g. bert-base-uncased, not a fine-tuned classifier"
        )
    tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust)
    return model.to(_device()).eval(), tokenizer


def _method_config(method: str, values: dict):
    from llmkd.data.synthesis import METHODS

    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {sorted(METHODS)}")
    config_cls, run = METHODS[method]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        hints = [
            f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, fields, n=1)) else k
            for k in unknown
        ]
        raise ValueError(f"unknown {method} keys: " + ", ".join(hints))
    return config_cls(**values), run


def generate(config_path: str, overrides: list[str] = ()):
    """Loads the models the recipe names, runs the method, returns the `datasets` dataset it wrote."""
    values = read_yaml(config_path) | parse_overrides(list(overrides))
    method = values.pop("method", None)
    models = {k: values.pop(k, None) for k in MODEL_KEYS}
    if not models["teacher"]:
        raise ValueError("no teacher: set teacher to a Hub id or a local model directory")
    config, run = _method_config(method, values)  # validated before any model is loaded
    trust = bool(models["trust_remote_code"])
    if method == "teacher_sampling":
        teacher, tok = _load(AutoModelForCausalLM, models["teacher"], models["teacher_revision"], trust)
        return run(teacher, tok, config)
    if method == "gibbs" and not models["mlm"]:
        raise ValueError(
            "gibbs needs mlm: a masked LM (Hub id or local directory) with its MLM head, e.g. bert-base-uncased"
        )
    if method in ("gibbs", "inversion"):
        teacher, tok = _load(
            AutoModelForSequenceClassification, models["teacher"], models["teacher_revision"], trust
        )
        if method == "inversion":
            return run(teacher, tok, config)
        mlm, mlm_tok = _load(AutoModelForMaskedLM, models["mlm"], models["mlm_revision"], trust)
        return run(teacher, tok, mlm, mlm_tok, config)
    if not models["generator"]:
        raise ValueError(
            "zerogen needs a generator: a causal LM (Hub id or local directory) that writes the text"
        )
    teacher, tok = _load(
        AutoModelForSequenceClassification, models["teacher"], models["teacher_revision"], trust
    )
    generator, gen_tok = _load(AutoModelForCausalLM, models["generator"], models["generator_revision"], trust)
    extra = {}
    if models["student"]:
        extra["student"], extra["student_tokenizer"] = _load(
            AutoModelForSequenceClassification, models["student"], None, trust
        )
    return run(teacher, tok, generator, config, generator_tokenizer=gen_tok, **extra)
