"""Paths in a recipe: found relative to the working directory, else relative to the recipe's own folder.

A recipe such as `recipes/demo/distil.yaml` names `runs/demo/data/train.jsonl`, relative to the folder it is run
from. Run from elsewhere, such a path used to reach `from_pretrained` as a "repo id" and fail with a traceback.
Now a data or model path that does not exist relative to the working directory, but does relative to the recipe
file, is used from there; one that exists nowhere fails before any model is loaded, naming both places.

`output_dir` is not touched: like `transformers`' TrainingArguments, outputs go relative to the working directory.
Values given as `--key value` flags are the user's own, relative to the working directory.
"""

from __future__ import annotations

import os
import re

# key -> kind: "data" (always a local file or folder), "model" (a local folder or a Hub id: `org/name`, or a bare
# legacy name such as `gpt2`) or "output" (a folder one run writes and another reads, e.g. `llmkd cache-teacher`
# writes teacher_cache: found like the others when it exists, never refused when it does not).
KINDS = {
    "train_file": "data",
    "validation_file": "data",
    "data_dir": "data",
    "teacher": "model",
    "student": "model",
    "model": "model",
    "generator": "model",
    "mlm": "model",
    "teacher_cache": "output",
}
# Nested: `teachers: [{model: …, cache: …} or a bare model]`, `born_again: {student_init: …}`.
NESTED = {"teachers": {"model": "model", "cache": "output"}, "born_again": {"student_init": "model"}}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _pathlike(value) -> bool:
    # `embedded:NAME` aliases and URLs are not paths.
    return isinstance(value, str) and bool(value) and ":" not in value.split(os.sep)[0].split("/")[0]


def _relocated(value, recipe_dir: str, kind: str):
    """The recipe-relative path when `value` is missing from the working directory but present there (for a
    model: a saved model's folder, so that a Hub id is not taken for an unrelated folder of the same name)."""
    if not _pathlike(value):
        return value
    path = os.path.expanduser(value)
    if os.path.exists(path) or os.path.isabs(path):
        return value
    beside = os.path.normpath(os.path.join(recipe_dir, path))
    if kind == "model":
        found = any(os.path.isfile(os.path.join(beside, f)) for f in ("config.json", "adapter_config.json"))
    else:
        found = os.path.exists(beside)
    return beside if found else value


def resolve_recipe_paths(values: dict, recipe_path: str) -> dict:
    """`values` (one recipe's top-level keys, stages included) with relocated data and model paths."""
    recipe_dir = os.path.dirname(os.path.abspath(recipe_path))
    out = dict(values)
    for key, kind in KINDS.items():
        if key in out:
            out[key] = _relocated(out[key], recipe_dir, kind)
    for key, inner in NESTED.items():
        entries = out.get(key)
        if isinstance(entries, dict):
            out[key] = {
                k: _relocated(v, recipe_dir, inner[k]) if k in inner else v for k, v in entries.items()
            }
        elif isinstance(entries, list):
            out[key] = [
                {k: _relocated(v, recipe_dir, inner[k]) if k in inner else v for k, v in e.items()}
                if isinstance(e, dict)
                else _relocated(e, recipe_dir, "model")  # a bare string in `teachers:` is a model
                for e in entries
            ]
    if isinstance(out.get("stages"), list):
        out["stages"] = [
            resolve_recipe_paths(stage, recipe_path) if isinstance(stage, dict) else stage
            for stage in out["stages"]
        ]
    return out


def looks_local(value: str) -> bool:
    """A path that cannot be a Hub id: ./x, ../x, /x, ~/x, a/b/c, or anything with a backslash on Windows."""
    return value.startswith((".", "/", "~", os.sep)) or not HUB_ID.fullmatch(value)


def check_recipe_paths(values: dict, recipe_path: str, skip=(), flags=()) -> None:
    """Raises FileNotFoundError for a data path, or a local-looking model path, that exists nowhere.

    `values` are one stage's merged keys (after `resolve_recipe_paths`); keys in `skip` are not checked (a later
    stage's student is the previous stage's output, written during the run); keys in `flags` came from the
    command line, so they were looked for relative to the working directory only.
    """
    recipe_dir = os.path.dirname(os.path.abspath(recipe_path))
    for kind, value, where in _path_values(values):
        key = where.split("[")[0].split(".")[0]
        if key in skip or kind == "output" or not _pathlike(value):
            continue
        path = os.path.expanduser(value)
        if os.path.exists(path) or (kind == "model" and not looks_local(value)):
            continue  # a Hub id: the CLI adds advice if the Hub cannot give it (llmkd.cli.usage.hub_hint)
        places = [os.path.abspath(path)]
        if not os.path.isabs(path) and key not in flags:
            places.append(os.path.normpath(os.path.join(recipe_dir, path)))
        relative = "the working directory" + (
            f", then to the recipe {recipe_path}" if len(places) > 1 else ""
        )
        raise FileNotFoundError(
            f"{where}: {value!r} does not exist; looked for {' and for '.join(places)} (relative to {relative}). "
            f"Fix the path{' in the recipe (relative to either place)' if len(places) > 1 else ''}, or pass "
            f"--{key} PATH"
        )


def _path_values(values: dict):
    """(kind, value, where) for every path-valued key of one stage, nested ones included."""
    for key, kind in KINDS.items():
        if values.get(key) is not None:
            yield kind, values[key], key
    for key, inner in NESTED.items():
        entries = values.get(key)
        listed = isinstance(entries, list)
        for i, entry in enumerate(entries if listed else [entries]):
            where = f"{key}[{i}]" if listed else key
            if isinstance(entry, str) and key == "teachers":
                yield "model", entry, where
            elif isinstance(entry, dict):
                for k, kind in inner.items():
                    if entry.get(k) is not None:
                        yield kind, entry[k], f"{where}.{k}"
