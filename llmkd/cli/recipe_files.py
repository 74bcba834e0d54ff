"""Reading a recipe: its YAML file (strictly: no key twice, UTF-8, plain data) and its `--key value` flags."""

from __future__ import annotations

import re

import yaml

NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_overrides(tokens: list[str]) -> dict:
    """`--key value`, `--key=value` or a bare `--flag` (true); values are read as YAML scalars/lists."""
    out, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ValueError(f"unexpected argument {token!r}; overrides look like --learning_rate 1e-4")
        key, eq, value = token[2:].partition("=")
        if not eq:
            has_value = i + 1 < len(tokens) and not tokens[i + 1].startswith("--")
            value = tokens[i + 1] if has_value else "true"
            i += has_value
        try:
            out[key.replace("-", "_")] = _numbers(yaml.safe_load(value))
        except yaml.YAMLError as err:
            raise ValueError(
                f"--{key} {value!r} is not a YAML value ({' '.join(str(err).split())})"
            ) from None
        i += 1
    return out


class _RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML would silently keep the last)."""


def _unique_mapping(loader: _RecipeLoader, node, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            twice = key in seen
        except TypeError:  # an unhashable key: construct_mapping says so
            break
        if twice:
            raise ValueError(
                f"{key_node.start_mark.name}, line {key_node.start_mark.line + 1}: {key!r} is given twice; keep one"
            )
        seen.add(key)
    return loader.construct_mapping(node, deep)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _numbers(value):
    """YAML 1.1 reads `1e-4` as a string; recipes mean the number."""
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def read_yaml(path: str) -> dict:
    """The recipe's keys, numbers read as numbers and data/model paths found relative to the working directory
    or else to the recipe's folder (llmkd.cli.paths; FileNotFoundError names both places)."""
    from llmkd.cli.paths import resolve_recipe_paths

    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.load(handle, Loader=_RecipeLoader) or {}  # a SafeLoader: plain data only
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); save it as UTF-8") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of config keys, got {type(values).__name__}")
    return resolve_recipe_paths({k: _numbers(v) for k, v in values.items()}, path)
