"""A table of bad inputs, each through the real `llmkd` command on tiny models: exit code 2 and one line that
names the bad value and the fix, before any training, with the output folder's files unchanged.

Every row starts from a valid recipe (the controls at the end reach training with it) and spoils one thing.
The output folder of each row already holds a sentinel file and a previous run's llmkd_report.json.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass, field

import pytest
import yaml
from conftest import (
    BertForSequenceClassification,
    LlamaForCausalLM,
    bert_config,
    llama_config,
    make_tokenizer,
    seeded,
    sentences,
)
from transformers import Trainer

from llmkd.cli import main


class TrainingStarted(BaseException):  # not an Exception: nothing on the way may swallow it
    pass


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny models and data files, built once: a named 2-class BERT teacher, a causal LM, a 3-class BERT, a
    model folder without its tokenizer, and train / validation JSONL."""
    root = tmp_path_factory.mktemp("bad_inputs")
    names = {"id2label": {0: "negative", 1: "positive"}, "label2id": {"negative": 0, "positive": 1}}
    for name, model, tok in (
        ("teacher", seeded(BertForSequenceClassification, bert_config(**names), 0), "bert"),
        ("lm", seeded(LlamaForCausalLM, llama_config(), 0), "llama"),
        ("three", seeded(BertForSequenceClassification, bert_config(layers=2, num_labels=3), 1), "bert"),
        ("notok", seeded(BertForSequenceClassification, bert_config(**names), 0), None),
    ):
        model.save_pretrained(root / name)
        if tok:
            make_tokenizer(tok).save_pretrained(root / name)
    for split, n in (("train", 16), ("validation", 8)):
        rows = [{"sentence": s, "label": i % 2} for i, s in enumerate(sentences(n, seed=len(split)))]
        jsonl(root / f"{split}.jsonl", rows)
    return root


def jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def base(world, out) -> dict:
    return {
        "teacher": str(world / "teacher"),
        "student_layers": [0, 2],
        "train_file": str(world / "train.jsonl"),
        "validation_file": str(world / "validation.jsonl"),
        "text_columns": ["sentence"],
        "max_length": 32,
        "output_dir": str(out),
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
    }


def write_recipe(world, out, changes=None, text=None, command="distill") -> list[str]:
    values = base(world, out) | (changes or {})
    path = out.parent / "recipe.yaml"
    path.write_text(
        text if text is not None else yaml.safe_dump({k: v for k, v in values.items() if v is not None})
    )
    return [command, str(path)]


def data_file(out, name, content) -> str:
    path = out.parent / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return str(path)


def labelled(out, labels, name="labels.jsonl") -> str:
    return jsonl(
        out.parent / name, [{"sentence": f"w{i} w{i + 1}", "label": v} for i, v in enumerate(labels)]
    )


@dataclass
class Row:
    id: str
    argv: object  # (world, out) -> the command line
    value: list  # words of the message that name the bad value
    fix: list  # words that name the fix
    patch: object = None  # (monkeypatch, out) -> None: a read-only or full disk
    marks: list = field(default_factory=list)


def changed(**changes):
    return lambda world, out: write_recipe(world, out, changes)


def finetune(**changes):
    def argv(world, out):
        values = {"model": str(world / "teacher"), "class_names": ["negative", "positive"]}
        values |= {"train_file": str(world / "train.jsonl"), "text_columns": "sentence", "max_steps": 1}
        values |= {"output_dir": str(out), "report_to": "none", "use_cpu": True} | changes
        return write_recipe(world, out, text=yaml.safe_dump(values), command="finetune")

    return argv


def with_file(key, name, content, **changes):
    return lambda world, out: write_recipe(world, out, {key: data_file(out, name, content)} | changes)


def with_labels(labels, build=changed):
    return lambda world, out: build(train_file=labelled(out, labels))(world, out)


def model(key, name, **changes):
    return lambda world, out: write_recipe(world, out, {key: str(world / name)} | changes)


def generate(**changes):
    def argv(world, out):
        values = {"method": "teacher_sampling", "teacher": str(world / "lm"), "output_dir": str(out)}
        values |= {"num_samples": 4, "max_new_tokens": 3, "progress_bar": False} | changes
        return write_recipe(world, out, text=yaml.safe_dump(values), command="generate")

    return argv


def read_only(monkeypatch, out):
    """chmod a-w stops only other users: root (and the tests may run as root) still writes, so creating a file
    under `out` also fails as on a read-only file system."""
    real = os.open

    def refusing(path, flags, *args, **kwargs):
        if os.fspath(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)


def full_disk(monkeypatch, out):
    real = os.write

    def refusing(fd, data):
        if os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(out)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", refusing)


def little_space(monkeypatch, out):
    real = shutil.disk_usage
    monkeypatch.setattr(
        shutil,
        "disk_usage",
        lambda p: real(p)._replace(free=1000) if os.fspath(p).startswith(str(out)) else real(p),
    )


CSV = "sentence,label\n"
# fmt: off
ROWS = [
    # the recipe file and its keys, at every depth
    Row("malformed yaml", lambda w, o: write_recipe(w, o, text="teacher: [unclosed\n"), ["recipe.yaml", "line"], ["YAML"]),
    Row("recipe is a list", lambda w, o: write_recipe(w, o, text="- teacher\n"), ["got list"], ["mapping of config keys"]),
    Row("duplicate key", lambda w, o: write_recipe(w, o, text=yaml.safe_dump(base(w, o)) + "max_steps: 9\n"), ["max_steps"], ["twice"]),
    Row("unknown top-level key", changed(temprature=2.0), ["temprature"], ["temperature"]),
    Row("unknown key in a term", changed(terms=[{"knowledge": "logits", "loss": "forward_kl", "temprature": 2}]), ["temprature"], ["temperature"]),
    Row("unknown lora key", changed(lora={"r": 4, "alpah": 8}), ["alpah"], ["alpha"]),
    Row("unknown qat key", changed(qat={"bit": 4}), ["bit"], ["bits"]),
    Row("unknown teachers key", lambda w, o: write_recipe(w, o, {"teachers": [{"model": str(w / "teacher"), "wieght": 1}]}), ["wieght"], ["weight"]),
    Row("unknown born_again key", changed(born_again={"generation": 2}), ["generation"], ["generations"]),
    Row("unknown student_config key", changed(student_layers=None, student_config={"num_hiden_layers": 1}), ["num_hiden_layers"], ["num_hidden_layers"]),
    Row("misspelt trainer", changed(trainer="distil"), ["'distil'"], ["choose one of"]),
    Row("learning rate not a number", changed(learning_rate="fast"), ["learning_rate", "fast"], ["number"]),
    # numbers out of range
    Row("temperature 0", changed(temperature=0), ["got 0"], ["> 0"]),
    Row("temperature < 0", changed(temperature=-1.5), ["-1.5"], ["> 0"]),
    Row("max_length < 0", changed(max_length=-1), ["max_length", "-1"], ["positive integer"]),
    Row("max_train_samples 0", changed(max_train_samples=0), ["max_train_samples", "0"], ["positive integer"]),
    Row("batch size 0", changed(per_device_train_batch_size=0), ["per_device_train_batch_size", "0"], ["positive integer"]),
    Row("accumulation 0", changed(gradient_accumulation_steps=0), ["gradient_accumulation_steps", "0"], ["positive integer"]),
    Row("max_steps < -1", changed(max_steps=-3), ["-3"], ["-1 (the default)"]),
    Row("no epochs", changed(max_steps=None, num_train_epochs=0), ["num_train_epochs", "0"], ["set max_steps"]),
    Row("learning rate < 0", changed(learning_rate=-0.1), ["learning_rate", "-0.1"], [">= 0"]),
    Row("cache_top_k 0", changed(cache_top_k=0), ["cache_top_k", "0"], ["positive integer"]),
    Row("layer map out of range", changed(terms=[{"knowledge": "hidden", "loss": "mse", "layer_map": [[1, 9]]}]), ["teacher index 9"], ["valid indices 0..4"]),
    Row("student layer out of range", changed(student_layers=[0, 7]), ["[7]"], ["0..3"]),
    # data files
    Row("csv without the text column", with_file("train_file", "t.csv", "text,label\nw1 w2,1\n", validation_file=None), ["'sentence'"], ["set text_columns"]),
    Row("csv with a misspelt text column", with_file("train_file", "t.csv", "sentense,label\nw1 w2,1\n", validation_file=None), ["'sentence'", "'sentense'"], ["text_columns"]),
    Row("csv with a misspelt label column", with_file("train_file", "t.csv", "sentence,lable\nw1 w2,1\n", validation_file=None), ["'label'", "'lable'"], ["label_column"]),
    Row("validation with other columns", with_file("validation_file", "v.jsonl", '{"text": "w1", "label": 0}\n'), ["validation data", "'sentence'"], ["text_columns"]),
    Row("empty text", with_file("train_file", "e.jsonl", '{"sentence": "  ", "label": 1}\n{"sentence": "w1", "label": 0}\n'), ["1 of 2 rows have no text", "rows [0]"], ["fill them in"]),
    Row("csv with an empty text cell", with_file("train_file", "e.csv", CSV + "w1 w2,1\n,0\n"), ["no text", "rows [1]"], ["fill them in"]),
    Row("text column of numbers", with_file("train_file", "n.csv", CSV + "12,1\n13,0\n"), ["'sentence'", "int64"], ["name a text column"]),
    Row("three text columns", changed(text_columns=["sentence"] * 3), ["text_columns=['sentence', 'sentence', 'sentence']"], ["one or two"]),
    Row("csv not utf-8", with_file("train_file", "u.csv", CSV.encode() + b"w1 w\xe92,1\n"), ["0xe9", "line 2"], ["re-save it as UTF-8"]),
    Row("jsonl not utf-8", with_file("train_file", "u.jsonl", b'{"sentence": "w1 \xff", "label": 1}\n'), ["0xff", "line 1"], ["re-save it as UTF-8"]),
    Row("empty training file", with_file("train_file", "empty.jsonl", ""), ["empty.jsonl", "is empty"], ["write its rows"]),
    Row("csv with only a header", with_file("train_file", "h.csv", CSV), ["h.csv", "no rows"], ["write its rows"]),
    Row("broken jsonl line", with_file("train_file", "b.jsonl", '{"sentence": "w1", "label": 1}\n{"sentence": \n'), ["b.jsonl", "could not be read as json"], ["one JSON object per line"]),
    Row("missing training file", changed(train_file="/nonexistent/train.jsonl"), ["/nonexistent/train.jsonl"], ["--train_file"]),
    # labels outside the label set
    Row("labels -1/1", with_labels([-1, 1] * 4), ["-1", "4 of 8 rows", "'negative'"], ["-1/1 -> 0/1"]),
    Row("labels 1/2", with_labels([1, 2] * 4), ["labels 2 (4 of 8 rows)"], ["map them to ids 0..1"]),
    Row("label names not the model's", with_labels(["pos", "neg"] * 2), ["'neg', 'pos'", "4 of 4"], ["use the names ['negative', 'positive']"]),
    Row("fractional labels", with_labels([0.5, 1.0]), ["0.5"], ["map them to ids 0..1"]),
    Row("finetune labels -1/1", with_labels([-1, 1, 1], finetune), ["-1", "1 of 3"], ["-1/1 -> 0/1", "class_names"]),
    # model folders
    Row("teacher folder without a tokenizer", model("teacher", "notok"), ["notok", "no tokenizer"], ["tokenizer.save_pretrained"]),
    Row("finetune model without a tokenizer", lambda w, o: finetune(model=str(w / "notok"))(w, o), ["notok"], ["tokenizer.save_pretrained"]),
    Row("missing teacher folder", changed(teacher="/nonexistent/teacher"), ["/nonexistent/teacher"], ["--teacher"]),
    Row("teacher folder that is not a model", lambda w, o: write_recipe(w, o, {"teacher": str(o.parent)}), ["no config.json"], ["save_pretrained"]),
    Row("causal LM teacher, classifier student", lambda w, o: write_recipe(w, o, {"teacher": str(w / "lm"), "student_layers": None, "student": str(w / "teacher")}), ["causal_lm", "sequence_classification checkpoint"], ["set task: causal_lm"]),
    Row("classifier teacher, causal LM student", lambda w, o: write_recipe(w, o, {"student_layers": None, "student": str(w / "lm")}), ["LlamaForCausalLM"], ["set task: sequence_classification"]),
    Row("student with other classes", lambda w, o: write_recipe(w, o, {"student_layers": None, "student": str(w / "three")}), ["3 classes", "2 (negative, positive)"], ["student_layers / student_config"]),
    Row("ensemble teacher with other classes", lambda w, o: write_recipe(w, o, {"teachers": [str(w / "teacher"), str(w / "three")]}), ["num_labels=3"], ["student's classes"]),
    # the output folder
    Row("output_dir is a file", lambda w, o: write_recipe(w, o, {"output_dir": str(o / "sentinel.txt")}), ["is a file"], ["choose another output_dir"]),
    Row("read-only output_dir", changed(), ["cannot write", "Read-only file system"], ["--output_dir"], read_only),
    Row("full disk", changed(), ["is full", "No space left"], ["free some space"], full_disk),
    Row("too little space for the student", lambda w, o: write_recipe(w, o, {"student_layers": None, "student": str(w / "teacher")}), ["MiB free"], ["free some space"], little_space),
    Row("output_dir holds a finished run", changed(), ["already holds a finished run", "previous-teacher"], ["new output_dir"]),
    # the other commands
    Row("generate: unknown key", generate(num_sample=3), ["num_sample"], ["did you mean num_samples"]),
    Row("generate: zero samples", generate(num_samples=0), ["num_samples", "got 0"], [">= 1"]),
    Row("generate: temperature 0", generate(temperature=0), ["temperature", "got 0"], ["(0.0, inf]"]),
    Row("generate: model without a tokenizer", lambda w, o: generate(teacher=str(w / "notok"))(w, o), ["notok"], ["tokenizer.save_pretrained"]),
    Row("cache-teacher without a folder", lambda w, o: write_recipe(w, o, command="cache-teacher"), ["no cache folder"], ["--teacher_cache"]),
]
# fmt: on
PREVIOUS = {"trainer": "DistillationTrainer", "teacher": "previous-teacher", "eval": {"eval_accuracy": 0.9}}


def fill(out) -> dict:
    """The output folder of an earlier run: a sentinel and a report; returns {name: bytes}."""
    out.mkdir(parents=True)
    (out / "sentinel.txt").write_text("an earlier run's file\n")
    (out / "llmkd_report.json").write_text(json.dumps(PREVIOUS))
    return snapshot(out)


def snapshot(out) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def no_training(*args, **kwargs):
    raise TrainingStarted("Trainer.train was reached")


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=r.marks) for r in ROWS])
def test_bad_input_fails_before_training_naming_value_and_fix(row, world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    before = fill(out)
    argv = row.argv(world, out)
    monkeypatch.setattr(Trainer, "train", no_training)
    if row.patch:
        row.patch(monkeypatch, out)
    code = main(argv)
    monkeypatch.undo()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("llmkd: error: ")]
    assert code == 2 and len(errors) == 1, errors
    for word in row.value + row.fix:
        assert word in errors[0], (word, errors[0])
    assert snapshot(out) == before  # nothing written, nothing overwritten, no checkpoint-* folder


def test_the_table_is_long_enough():
    assert len(ROWS) >= 30 and len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize(
    "labels",
    [
        pytest.param([0, 1] * 4, id="ids"),
        pytest.param(["negative", "positive"] * 4, id="names"),
        pytest.param([0.0, 1.0] * 4, id="whole-number floats"),
        pytest.param([-1, 0, 1, 1], id="-1 as no gold label"),
    ],
)
def test_controls_reach_training(labels, world, tmp_path, monkeypatch):
    """The base recipe with valid labels passes every check into an empty folder: the rows fail for their one
    change, and the label check does not refuse valid labels."""
    out = tmp_path / "out"
    argv = write_recipe(world, out, {"train_file": labelled(out, labels)})
    monkeypatch.setattr(Trainer, "train", no_training)
    with pytest.raises(TrainingStarted):
        main(argv)


def _one_error(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("llmkd: error: ")]
    assert len(errors) == 1, errors
    return errors[0]


def test_an_interrupted_run_or_a_checkpoint_folder_is_not_written_over(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    monkeypatch.setattr(Trainer, "train", no_training)
    assert main(write_recipe(world, out)) == 2
    error = _one_error(capsys)
    assert "holds checkpoint-2 of an interrupted run" in error and "--resume_from_checkpoint true" in error
    assert main(write_recipe(world, out / "checkpoint-2")) == 2  # a checkpoint folder as output_dir
    assert "is a checkpoint folder of another run" in _one_error(capsys)
    assert os.listdir(out / "checkpoint-2") == ["trainer_state.json"]
    with pytest.raises(TrainingStarted):  # control: an empty folder reaches training
        main(write_recipe(world, tmp_path / "fresh"))


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--save_strategy", "no"], "no"),  # YAML 1.1 reads the word as false: the strategy "no" is meant
        (["--eval_strategy", "no"], "no"),
        (["--save_strategy", "epoch"], "epoch"),  # control: other words pass unchanged
    ],
)
def test_strategy_no_is_the_word_no(flags, expected, world, tmp_path):
    from llmkd.cli.recipe import load_config

    _, args = load_config(write_recipe(world, tmp_path / "out")[1], flags)
    assert getattr(args, flags[0][2:]) == expected


def test_a_boolean_for_another_word_field_names_the_quoting_fix(world, tmp_path, capsys):
    assert main([*write_recipe(world, tmp_path / "out"), "--report_to", "yes"]) == 2
    error = _one_error(capsys)
    assert "report_to takes a word, got the boolean True" in error and "quote the word" in error
