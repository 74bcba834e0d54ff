"""`llmkd … --help` and a recipe's unknown keys are answered before torch is imported (llmkd.cli.usage).

The keys are read from the sources (llmkd.cli.keys); here every set read that way is held equal to
`dataclasses.fields` of the imported classes, so the fast path cannot go stale silently. Timing is not tested
(it depends on the machine); what makes it fast is: torch and transformers are never imported.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import yaml
from transformers import TrainingArguments

from llmkd.cli import keys as K
from llmkd.cli import main, usage

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def _init_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def test_training_arguments_keys_read_from_source_equal_the_dataclass():
    read = usage.training_argument_keys()
    assert read is not None and list(read) == _init_fields(TrainingArguments)  # the same names, same order


def test_scheme_keys_read_from_source_equal_the_config_dataclasses():
    from llmkd.schemes import SCHEMES

    read = usage.scheme_keys()
    assert read is not None and set(read) == set(SCHEMES)
    for trainer, (_, config) in SCHEMES.items():
        name, keys = read[trainer]
        assert name == config.__name__ and list(keys) == _init_fields(config), trainer
        for f in dataclasses.fields(config):  # llmkd's help texts, as `--help` prints them
            if (
                "help" in f.metadata
                and not f.name.startswith("_")
                and f.name not in _init_fields(TrainingArguments)
            ):
                assert keys[f.name].help == f.metadata["help"], (trainer, f.name)


def test_generate_method_keys_read_from_source_equal_the_config_dataclasses():
    from llmkd.cli.generate import MODEL_KEYS
    from llmkd.data.synthesis import METHODS

    read = K.registry("llmkd.data.synthesis", "METHODS", 0)
    assert read is not None and set(read) == set(METHODS)
    for method, (config, _) in METHODS.items():
        assert read[method][0] == config.__name__
        assert list(read[method][1]) == [f.name for f in dataclasses.fields(config)], method
    assert K.constant("llmkd.cli.generate", "MODEL_KEYS") == MODEL_KEYS


def test_nested_keys_cover_what_the_full_validation_accepts():
    from llmkd.cli.ensemble import MEMBER_KEYS
    from llmkd.cli.self_distill import BORN_AGAIN_KEYS, MEAN_TEACHER_KEYS
    from llmkd.knowledge import TERM_KEYS
    from llmkd.losses import LOSSES

    nested = usage.nested_keys()
    assert nested["mean_teacher"] == MEAN_TEACHER_KEYS and nested["born_again"] == BORN_AGAIN_KEYS
    assert nested["teachers"] == set(MEMBER_KEYS)
    every_param = set().union(*(loss.params for losses in LOSSES.values() for loss in losses.values()))
    # A superset (keyword parameters of every function in llmkd.losses): the fast check never refuses a valid
    # term key; a key no loss takes is refused there, one only another loss takes by parse_term.
    assert TERM_KEYS | every_param <= usage.term_keys()
    assert "temprature" not in usage.term_keys()


def test_literals_the_fast_path_repeats_match_the_library():
    from llmkd.cli.recipe import TASKS
    from llmkd.modeling import CAUSAL_LM, SEQ_CLS
    from llmkd.students.loading import EMBEDDED

    assert TASKS == (CAUSAL_LM, SEQ_CLS) and set(usage.EMBEDDED_MODELS) == set(EMBEDDED)


def test_the_source_reader_on_dataclass_corners(tmp_path, monkeypatch):
    """ClassVar, init=False, field(metadata=...), a helper, inheritance, a redefined field; None when unreadable."""
    package = tmp_path / "corner_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "base.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass, field
            def opt(text, default=None):
                return field(default=default, metadata={"help": text})
            @dataclass
            class Base:
                a: int = opt("A's help.", 1)
                b: str = field(default="x", metadata={"help": "B" "'s help."})
            """
        )
    )
    (package / "child.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass, field
            from typing import ClassVar
            from .base import Base, opt
            @dataclass
            class Child(Base):
                limit: ClassVar[int] = 3
                c: float = opt("C's help.", 0.5)
                hidden: int = field(default=0, init=False)
                a: int = opt("A again.", 2)
            """
        )
    )
    (package / "broken.py").write_text(
        "from dataclasses import dataclass\n@dataclass\nclass Broken(Missing):\n    x: int = 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    keys = K.dataclass_keys("corner_pkg.child", "Child")
    from corner_pkg.child import Child

    assert list(keys) == [f.name for f in dataclasses.fields(Child)] == ["a", "b", "c", "hidden"]
    assert [k for k, v in keys.items() if v.init] == _init_fields(Child)
    assert (keys["a"].help, keys["a"].default, keys["b"].help) == ("A again.", "2", "B's help.")
    assert K.dataclass_keys("corner_pkg.broken", "Broken") is None  # an unresolvable base: no fast check
    assert K.dataclass_keys("corner_pkg.child", "Nowhere") is None


FAST_SCRIPT = """
import contextlib, io, json, sys
from llmkd.cli import main
out = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()) as stdout, contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exit:
            rc = exit.code
    out[name] = {"rc": rc, "out": stdout.getvalue(), "err": err.getvalue()}
out["heavy"] = sorted(m for m in ("torch", "transformers", "datasets") if m in sys.modules)
print(json.dumps(out))
"""


def test_help_and_unknown_keys_never_import_torch(tmp_path):
    recipe = yaml.safe_load((ROOT / "recipes" / "demo" / "distil.yaml").read_text())
    bad = {
        "top": recipe | {"temprature": 2},
        "term": recipe | {"terms": [{"knowledge": "logits", "loss": "forward_kl", "temprature": 2}]},
        "lora": recipe | {"lora": {"r": 4, "alpah": 8}},
        "stage": recipe | {"stages": [{}, {"learning_rte": 1e-4}]},
    }
    for name, values in bad.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(values))
    calls = {c: [c, "--help"] for c in ("distill", "finetune", "generate", "cache-teacher")}
    calls |= {"top-level": ["--help"], "recipe-help": ["distill", str(tmp_path / "top.yaml"), "--help"]}
    calls["export"] = ["export", "--help"]  # argparse's help: exits 0 (SystemExit)
    calls |= {name: ["distill", str(tmp_path / f"{name}.yaml")] for name in bad}
    calls["flag"] = ["distill", str(ROOT / "recipes" / "demo" / "distil.yaml"), "--num_train_epoch", "1"]
    done = subprocess.run(
        [sys.executable, "-c", FAST_SCRIPT, json.dumps(calls)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["heavy"] == []  # neither torch nor transformers nor datasets was imported
    for command in ("distill", "finetune", "generate", "cache-teacher", "recipe-help"):
        assert result[command]["rc"] == 0 and "usage: llmkd" in result[command]["out"], command
    assert result["top-level"]["rc"] == 0 and "export" in result["top-level"]["out"]
    assert result["export"]["rc"] == 0 and "usage: llmkd export" in result["export"]["out"]
    expected = {
        "top": "unknown config keys: temprature (did you mean temperature?)",
        "term": "unknown terms[0] keys: temprature (did you mean temperature?)",
        "lora": "unknown lora keys: alpah (did you mean alpha?)",
        "stage": "unknown config keys: learning_rte (did you mean learning_rate?)",
        "flag": "unknown config keys: num_train_epoch (did you mean num_train_epochs?)",
    }
    for name, message in expected.items():
        assert result[name]["rc"] == 2 and f"llmkd: error: {message}" in result[name]["err"], name


def test_eval_and_data_help_never_import_torch():
    calls = {"eval": ["eval", "--help"], "data": ["data", "--help"]}
    done = subprocess.run(
        [sys.executable, "-c", FAST_SCRIPT, json.dumps(calls)], capture_output=True, text=True, timeout=120
    )
    result = json.loads(done.stdout)
    assert result["eval"]["rc"] == result["data"]["rc"] == 0 and result["heavy"] == []


def test_eval_help_names_every_glue_task():
    from llmkd.cli.eval import TASK_NAMES
    from llmkd.data.glue import GLUE_TASKS

    assert sorted(GLUE_TASKS) == TASK_NAMES


def test_the_fast_message_is_the_full_validations(tmp_path):
    from llmkd.cli.recipe import load_stages

    recipe = yaml.safe_load((ROOT / "recipes" / "demo" / "distil.yaml").read_text())
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe | {"temprature": 2, "per_device_batch_size": 8}))
    with pytest.raises(ValueError) as fast:
        usage.check_recipe("distill", str(path), [])
    with pytest.raises(ValueError) as full:
        load_stages(str(path), [])
    assert str(fast.value) == str(full.value) and "per_device_batch_size (did you mean" in str(fast.value)


def _command_of(recipe: Path) -> str | None:
    values = yaml.safe_load(recipe.read_text())
    if "method" in values:
        return "generate"
    if {"speedup", "budget_minutes"} & set(values):
        return "compress"
    # Without teacher or model: a method's config read by a script (recipes/data_free/sampling.yaml).
    return "finetune" if "model" in values else "distill" if {"teacher", "teachers"} & set(values) else None


COMMAND_RECIPES = [r for r in RECIPES if "accelerate" not in r.parts and _command_of(r)]


def test_the_recipes_checked_below_are_most_of_them():
    # 7 accelerate configs; 3 configs read by scripts (2 data-free methods, the cross-modal demo's settings)
    assert len(COMMAND_RECIPES) >= len(RECIPES) - 10


def test_generate_recipes_are_checked_against_their_method(tmp_path):
    from llmkd.cli.generate import _method_config

    path = tmp_path / "synth.yaml"
    valid = {"method": "zerogen", "teacher": "t", "generator": "g", "num_candidates": 8, "output_dir": "o"}
    path.write_text(yaml.safe_dump(valid))
    usage.check_recipe("generate", str(path), [])
    with pytest.raises(
        ValueError, match=r"unknown zerogen keys: num_candiates \(did you mean num_candidates\?\)"
    ):
        usage.check_recipe("generate", str(path), ["--num_candiates", "4"])
    with pytest.raises(
        ValueError, match=r"unknown zerogen keys: num_candiates \(did you mean num_candidates\?\)"
    ):
        _method_config("zerogen", {"num_candiates": 4})  # the full check says the same


@pytest.mark.parametrize("recipe", COMMAND_RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_passes_the_fast_check(recipe):
    if _command_of(recipe) == "compress":  # its settings are one dataclass, checked before torch is imported
        from llmkd.compress.config import compress_config

        compress_config(yaml.safe_load(recipe.read_text()))
        return
    usage.check_recipe(_command_of(recipe), str(recipe), [])  # no valid key is ever refused


def test_distill_help_lists_every_recipe_key_with_its_help(tmp_path):
    from llmkd.cli.recipe import RunConfig
    from llmkd.schemes import DistillationConfig, MutualConfig, OnPolicyConfig

    text = " ".join(usage.command_help("distill").split())
    own = [f for f in dataclasses.fields(DistillationConfig) if f.name not in _init_fields(TrainingArguments)]
    for f in [*dataclasses.fields(RunConfig), *own]:
        assert f"{f.name}" in text and " ".join(f.metadata["help"].split()) in text, f.name
    assert "trainer: on_policy (OnPolicyConfig)" in text and "output_dir, per_device_train_batch_size" in text
    path = tmp_path / "mutual.yaml"
    path.write_text(yaml.safe_dump({"trainer": "mutual"}))
    narrowed = usage.command_help("distill", str(path))
    assert "trainer: mutual (MutualConfig)" in narrowed and "trainer: on_policy (" not in narrowed
    assert all(f.name in narrowed for f in dataclasses.fields(MutualConfig))
    assert "\n  lmbda (default" in usage.command_help("distill")  # an OnPolicyConfig key, listed as a key...
    assert "\n  lmbda (default" not in narrowed  # ...only where the recipe's trainer takes it
    assert "lmbda" in {f.name for f in dataclasses.fields(OnPolicyConfig)}


def test_export_dispatches_to_its_module(monkeypatch):
    seen = []
    fake = types.ModuleType("llmkd.cli.export")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "llmkd.cli.export", fake)
    assert main(["export", "STUDENT", "--onnx"]) == 0 and seen == [["STUDENT", "--onnx"]]


@pytest.mark.parametrize(
    "text, message",
    [
        ("teacher: [unclosed\n", r"r\.yaml is not valid YAML: .*line 2"),
        ("max_steps: 3\nmax_steps: 9\n", r"r\.yaml, line 2: 'max_steps' is given twice"),
        ("terms:\n  - {knowledge: logits, loss: jsd, loss: tvd}\n", r"line 2: 'loss' is given twice"),
        (b"teacher: caf\xe9\n", r"r\.yaml is not UTF-8 text"),
    ],
)
def test_a_recipe_file_is_read_strictly(tmp_path, text, message):
    from llmkd.cli.recipe import read_yaml

    path = tmp_path / "r.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=message):
        read_yaml(str(path))


def test_a_word_for_a_number_is_refused():
    from llmkd.cli.recipe import parse_overrides, split_config

    values = {"teacher": "t", "student_layers": [0], "train_file": "x.csv"}
    with pytest.raises(ValueError, match="learning_rate must be a number, got 'fast'"):
        split_config(values | parse_overrides(["--learning_rate", "fast"]))
    with pytest.raises(ValueError, match="--terms '\\[unclosed' is not a YAML value"):
        parse_overrides(["--terms", "[unclosed"])
