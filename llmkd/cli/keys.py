"""Recipe keys read from the source files, without importing torch (`llmkd … --help`, the fast key check).

Importing a scheme's config class imports transformers' TrainingArguments and with it torch: 8-11 s on two
cores, before a misspelt key could be reported. The keys, their defaults and help texts are literals in the
dataclass bodies, so they are read from the sources with `ast` instead (~0.1 s). tests/test_cli_fast.py holds
every set read here equal to `dataclasses.fields` of the imported classes, so nothing goes stale silently; when
a source cannot be read this way (another layout in a future transformers), a function returns None and its
caller skips the fast check: the full validation after the imports still runs.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path

HELP_PARAMS = ("help_text", "help", "text")  # how llmkd's field helpers name their help argument


@dataclass(frozen=True)
class Key:
    """One recipe key: its help text and default as written in the source ('' when there is none)."""

    name: str
    help: str = ""
    default: str = ""
    init: bool = True


def unknown_keys_error(unknown, known, where: str = "config") -> ValueError:
    """The error for keys a recipe may not hold, each with its closest valid key (shared by both checks)."""
    hints = {k: difflib.get_close_matches(k, known, n=1) for k in sorted(unknown)}
    described = [f"{k} (did you mean {h[0]}?)" if h else k for k, h in hints.items()]
    return ValueError(f"unknown {where} keys: " + ", ".join(described))


def module_file(dotted: str) -> Path | None:
    """The source file of a module, found without importing it or its package."""
    top, _, rest = dotted.partition(".")
    try:
        spec = importlib.util.find_spec(top)  # a top-level name: finds, imports nothing
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(next(iter(spec.submodule_search_locations)), *rest.split(".")) if rest else None
    candidates = [base.with_suffix(".py"), base / "__init__.py"] if base else []
    candidates.append(Path(next(iter(spec.submodule_search_locations)), "__init__.py"))
    return next((c for c in candidates if c.is_file()), None)


@cache
def _tree(dotted: str) -> ast.Module | None:
    path = module_file(dotted)
    try:
        return ast.parse(path.read_text(encoding="utf-8")) if path else None
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def _imported_from(dotted: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = dotted if module_file(dotted).name == "__init__.py" else dotted.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _binding(dotted: str, name: str) -> tuple[str, ast.AST] | None:
    """(module, ClassDef/FunctionDef) that `name` means in module `dotted`, following `from … import`."""
    for _ in range(8):  # re-exports nest a few levels at most
        tree = _tree(dotted)
        if tree is None:
            return None
        defined = [n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == name]
        if defined:
            return dotted, defined[0]
        source = _import_of(dotted, tree, name)
        if source is None:
            return None
        dotted, name = source
    return None


def _import_of(dotted: str, tree: ast.Module, name: str) -> tuple[str, str] | None:
    # ast.walk also sees imports inside functions and `if TYPE_CHECKING:` (transformers' lazy __init__).
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _imported_from(dotted, node), alias.name
    return None


def _module_alias(dotted: str, name: str) -> str | None:
    """The module a bare name refers to (`from llmkd.data.synthesis import sampling` -> its dotted name)."""
    source = _import_of(dotted, _tree(dotted), name) if _tree(dotted) else None
    return f"{source[0]}.{source[1]}" if source and module_file(f"{source[0]}.{source[1]}") else None


def _expr_binding(dotted: str, expr: ast.expr) -> tuple[str, ast.AST] | None:
    if isinstance(expr, ast.Name):
        return _binding(dotted, expr.id)
    if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name):
        module = _module_alias(dotted, expr.value.id)
        return _binding(module, expr.attr) if module else None
    return None


def _is_dataclass(node: ast.ClassDef) -> bool:
    names = [d.func if isinstance(d, ast.Call) else d for d in node.decorator_list]
    return any(getattr(n, "id", getattr(n, "attr", None)) == "dataclass" for n in names)


def dataclass_keys(dotted: str, class_name: str) -> dict[str, Key] | None:
    """Every field of a dataclass (inherited ones first), read from source; None if it cannot be read."""
    found = _binding(dotted, class_name)
    if found is None or not isinstance(found[1], ast.ClassDef):
        return None
    return _class_keys(*found)


def _class_keys(dotted: str, node: ast.ClassDef) -> dict[str, Key] | None:
    keys: dict[str, Key] = {}
    for base in reversed(node.bases):  # the MRO's order for the simple hierarchies recipes use
        if isinstance(base, ast.Name) and base.id in ("object", "Generic"):
            continue
        found = _expr_binding(dotted, base)
        inherited = _class_keys(*found) if found and isinstance(found[1], ast.ClassDef) else None
        if inherited is None:
            return None
        keys.update(inherited)
    if not _is_dataclass(node):
        return keys
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if "ClassVar" in ast.unparse(stmt.annotation) or "InitVar" in ast.unparse(stmt.annotation):
                continue
            # A redefined field keeps its base's place in the order, as in dataclasses.
            keys[stmt.target.id] = _field_key(dotted, stmt.target.id, stmt.value)
    return keys


def _field_key(dotted: str, name: str, value: ast.expr | None) -> Key:
    if value is None:
        return Key(name)
    if not isinstance(value, ast.Call):
        return Key(name, default=ast.unparse(value))
    func = value.func.id if isinstance(value.func, ast.Name) else getattr(value.func, "attr", "")
    kwargs = {k.arg: k.value for k in value.keywords if k.arg}
    if func == "field":
        init = not (isinstance(kwargs.get("init"), ast.Constant) and kwargs["init"].value is False)
        metadata = kwargs.get("metadata")
        help_node = None
        if isinstance(metadata, ast.Dict):
            help_node = next(
                (v for k, v in zip(metadata.keys, metadata.values) if _literal(k) == "help"), None
            )
        default = kwargs.get("default", kwargs.get("default_factory"))
        return Key(name, _text(help_node), ast.unparse(default) if default else "", init)
    helper = _binding(dotted, func)  # llmkd's `_field(default, help_text)`, `_help(text, default)`, …
    params = [a.arg for a in helper[1].args.args] if helper and isinstance(helper[1], ast.FunctionDef) else []
    by_name = dict(zip(params, value.args)) | kwargs
    help_node = next((by_name[p] for p in HELP_PARAMS if p in by_name), None)
    default = by_name.get("default")
    return Key(name, _text(help_node), ast.unparse(default) if default is not None else "")


def _literal(node):
    try:
        return ast.literal_eval(node) if node is not None else None
    except ValueError:
        return None


def _text(node) -> str:
    value = _literal(node)
    return value if isinstance(value, str) else (ast.unparse(node) if node is not None else "")


def constant(dotted: str, name: str):
    """A module-level literal (`TERM_KEYS = {...}`), or None."""
    tree = _tree(dotted)
    for stmt in tree.body if tree else []:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and stmt.value is not None:
            return _literal(stmt.value)
    return None


def registry(dotted: str, name: str, position: int) -> dict[str, tuple[str, dict[str, Key]]] | None:
    """{entry: (config class name, its keys)} of a dict of tuples such as SCHEMES = {"distill": (Trainer, Config)};
    `position` is the config class's place in the tuples. Also reads a dict returned lazily by the module's
    `__getattr__` when asked for `name` (llmkd.data.synthesis.METHODS)."""
    table = _registry_dict(_tree(dotted), name)
    if table is None:
        return None
    out = {}
    for key, value in zip(table.keys, table.values):
        if not isinstance(value, ast.Tuple) or not isinstance(_literal(key), str):
            return None
        found = _expr_binding(dotted, value.elts[position])
        keys = _class_keys(*found) if found and isinstance(found[1], ast.ClassDef) else None
        if keys is None:
            return None
        out[_literal(key)] = (found[1].name, keys)
    return out


def _registry_dict(tree: ast.Module | None, name: str) -> ast.Dict | None:
    for node in ast.walk(tree) if tree else []:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return node.value
        if isinstance(node, ast.If) and name in {
            _literal(c) for c in ast.walk(node.test) if isinstance(c, ast.Constant)
        }:
            returned = [n.value for n in ast.walk(node) if isinstance(n, ast.Return)]
            if returned and isinstance(returned[0], ast.Dict):
                return returned[0]
    return None


def keyword_params(package: str, exclude=()) -> set[str] | None:
    """Keyword-only parameter names of every function under a package (the union of the losses' parameters)."""
    init = module_file(package)
    if init is None or init.name != "__init__.py":
        return None
    names = set()
    for path in sorted(init.parent.rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            return None
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.update(a.arg for a in node.args.kwonlyargs)
    return names - set(exclude)
