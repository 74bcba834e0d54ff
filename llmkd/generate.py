"""`llmkd generate RECIPE.yaml [--field value …]`: synthesise a transfer set from the teacher (data-free KD).

The recipe names a `method` (teacher_sampling or zerogen), the models, and the method's config fields.
"""

from __future__ import annotations

import dataclasses
import difflib

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from llmkd.recipe import parse_overrides, read_yaml

MODEL_KEYS = (
    "teacher",
    "teacher_revision",
    "generator",
    "generator_revision",
    "student",
    "trust_remote_code",
)


def _load(kind, name: str, revision: str | None, trust: bool):
    model = kind.from_pretrained(name, revision=revision, trust_remote_code=trust).eval()
    return model, AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust)


def _method_config(method: str, values: dict):
    from llmkd.synthesis import METHODS

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
