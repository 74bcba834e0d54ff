"""Recipes with several teachers: the `teachers:` list, checked when the recipe is read, and the ensemble source.

    teacher: runs/demo/teacher          # builds the student (student_layers / student_config) and its labels
    teachers:                           # every teacher, `teacher:` included if it should teach
      - runs/demo/teacher               # a model folder or Hub id; name: the folder's name ("teacher")
      - {model: runs/methods/teacher-seed43, name: seed43, weight: 2.0}
      - {cache: runs/cache/roberta, name: roberta}   # a classifier cache from `llmkd cache-teacher`
    teacher_combination: mean           # weights, confidence, entropy, random, route (llmkd.losses.ensemble)
    route_column: null                  # route: the data column naming each example's teacher

A model whose tokenizer maps tokens to other ids than the student's reads its own tokenisation of each example
(`EnsembleTeacher.prepare` adds it to the tokenised data); the others read the student's ids. Terms name a teacher
with ``teacher: NAME``. `teacher:` stays required: the student is built from it (or, with `student:`, takes its
labels); it teaches only if it is listed in `teachers:` too (then it is loaded once).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from transformers import AutoTokenizer

from llmkd.data import glue
from llmkd.data.loading import load_raw
from llmkd.losses.ensemble import COMBINATIONS, fixed_weights
from llmkd.modeling import task_of
from llmkd.students.loading import load_model, resolve_path
from llmkd.teachers.cached.binding import expected_components, named_splits
from llmkd.teachers.cached.reader import CachedTeacher
from llmkd.teachers.ensemble import NAME, EnsembleTeacher

MEMBER_KEYS = ("model", "cache", "name", "weight")


@dataclass(frozen=True)
class Member:
    """One entry of `teachers:`."""

    name: str
    model: str | None = None
    cache: str | None = None
    weight: float | None = None


def parse_teachers(teachers, combination: str = "mean") -> list[Member]:
    """The `teachers:` list as `Member`s; a ValueError names the entry, the value and the fix."""
    if not isinstance(teachers, list) or not teachers:
        raise ValueError(
            f"teachers must be a non-empty list of {{model: PATH}} / {{cache: FOLDER}}, got {teachers!r}"
        )
    members = [_member(spec, i) for i, spec in enumerate(teachers)]
    names = [m.name for m in members]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"teachers: the name(s) {repeated} repeat; give each teacher its own `name:`")
    weighted = [m.name for m in members if m.weight is not None]
    if weighted and len(weighted) != len(members):
        missing = sorted(set(names) - set(weighted))
        raise ValueError(f"teachers {missing} have no weight; give every teacher one, or none")
    if weighted and combination not in ("weights", "random"):
        raise ValueError(
            f"teachers {weighted} have a weight, which teacher_combination {combination!r} does not read; remove "
            "the weights, or set teacher_combination: weights (fixed weights) or random (draw probabilities)"
        )
    if combination == "weights" and not weighted:
        raise ValueError("teacher_combination: weights needs a `weight:` for every teacher")
    if weighted:
        fixed_weights([m.weight for m in members])  # finite, >= 0, not all 0
    return members


def _member(spec, index: int) -> Member:
    where = f"teachers[{index}]"
    if isinstance(spec, str):
        spec = {"model": spec}
    if not isinstance(spec, dict) or set(spec) - set(MEMBER_KEYS):
        raise ValueError(
            f"{where} must be a model path or a mapping with keys from {MEMBER_KEYS}, got {spec!r}"
        )
    sources = [k for k in ("model", "cache") if spec.get(k)]
    if len(sources) != 1:
        raise ValueError(
            f"{where}: set exactly one of model (a Hub id or folder) and cache (a teacher-logit cache)"
        )
    path = str(spec[sources[0]])
    name = spec.get("name") or re.sub(r"[^A-Za-z0-9_-]", "-", os.path.basename(os.path.normpath(path)))
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"{where}: name {name!r}: use letters, digits, '-' and '_' only (terms name it)")
    return Member(name, spec.get("model"), spec.get("cache"), spec.get("weight"))


def check_run(run) -> None:
    """RunConfig's checks of teachers, teacher_combination and route_column (each takes effect or is refused)."""
    mode = run.teacher_combination
    if mode not in COMBINATIONS:
        raise ValueError(f"teacher_combination={mode!r}: choose one of {', '.join(COMBINATIONS)}")
    if run.teachers is None:
        if mode != "mean" or run.route_column is not None:
            raise ValueError(
                "teacher_combination and route_column combine several teachers; list them in teachers: (or remove "
                "these keys)"
            )
        return
    parse_teachers(run.teachers, mode)
    if (mode == "route") != (run.route_column is not None):
        raise ValueError(
            "teacher_combination: route reads each example's teacher from route_column, and route_column is read "
            f"only by route (got teacher_combination={mode!r}, route_column={run.route_column!r})"
        )
    if run.trainer != "distill":
        raise ValueError(f"teachers: works with trainer: distill, not {run.trainer!r}")
    if run.teacher_cache:
        raise ValueError(
            "teacher_cache is the single teacher's cache; with teachers:, list caches as {cache: FOLDER} entries"
        )


def ensemble_source(run, args, teacher, student_tok, train, evaluation) -> tuple:
    """(EnsembleTeacher, train, evaluation, report entries) for a recipe with `teachers:`.

    `teacher` is the model `teacher:` loaded (reused when it is also listed); the datasets get the columns the
    members read (their own tokenisations, cache row indices, the route index)."""
    members = parse_teachers(run.teachers, run.teacher_combination)
    sources, tokenizers, vocab = {}, {}, student_tok.get_vocab()
    for member in members:
        if member.cache is not None:
            sources[member.name] = CachedTeacher(member.cache)
            continue
        path = resolve_path(member.model)
        common = {"trust_remote_code": run.trust_remote_code}
        sources[member.name] = (
            teacher
            if path == run.teacher
            else load_model(path, task_of(teacher), attn_implementation=run.attn_implementation, **common)
        )
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
        if tokenizer.get_vocab() != vocab:  # other ids for the same text: it reads its own tokenisation
            tokenizers[member.name] = tokenizer
    weights = [m.weight for m in members] if members[0].weight is not None else None
    source = EnsembleTeacher(
        sources, run.teacher_combination, weights, tokenizers=tokenizers, route_column=run.route_column
    )
    _check_caches(source, args, student_tok, named_splits(train, evaluation), run.max_length)
    train, evaluation = _prepare(run, source, train, evaluation)
    report = {
        "teachers": [{k: v for k, v in vars(m).items() if v is not None} for m in members],
        "teacher_combination": run.teacher_combination,
        "own_tokenisation": sorted(tokenizers),
    }
    return source, train, evaluation, report


def _check_caches(source, args, student_tok, splits: dict, max_length: int) -> None:
    """Each cache member was built from this run's tokenizer, data and max_length (classifiers: any T)."""
    expected = expected_components(args, student_tok, splits)
    expected |= {"temperature": None, "max_length": max_length}
    for source_ in source.sources.values():
        if isinstance(source_, CachedTeacher):
            source_.check_components(expected)


def _prepare(run, source: EnsembleTeacher, train, evaluation) -> tuple:
    """The datasets with the members' columns, from the raw rows build_data tokenised (same files, same limits)."""
    if not source.tokenizers and not source.route_column and not _has_cache(source):
        return train, evaluation
    raw = raw_splits(run) if source.tokenizers or source.route_column else {}
    columns = list(glue.get_task(run.glue_task).text_columns) if run.glue_task else run.text_columns
    eval_names = list(evaluation) if isinstance(evaluation, dict) else ["eval"]
    out = {}
    for split, data in named_splits(train, evaluation).items():
        rows = _raw_split(raw, split)
        if rows is not None and len(rows) != len(data):
            raise ValueError(
                f"the {split} data has {len(rows)} rows but {len(data)} after tokenising (causal-LM rows without "
                "text are dropped); remove empty rows from the data to route or re-tokenise it per teacher"
            )
        out[split] = source.prepare(data, rows, text_columns=columns, max_length=run.max_length, split=split)
    if evaluation is None:
        return out["train"], None
    return out["train"], {n: out[n] for n in eval_names} if isinstance(evaluation, dict) else out["eval"]


def _raw_split(raw: dict, split: str):
    """The raw rows of a tokenised split: same name, or the one validation split build_data named "eval"."""
    if split in raw:
        return raw[split]
    others = [name for name in raw if name != "train"]
    return raw[others[0]] if split == "eval" and others else None


def _has_cache(source: EnsembleTeacher) -> bool:
    return any(isinstance(s, CachedTeacher) for s in source.sources.values())


def raw_splits(run) -> dict:
    """The raw rows of every split, as llmkd.cli.pipeline.build_data reads them before tokenising."""
    if run.glue_task:
        raw = glue.load_glue(glue.get_task(run.glue_task), data_dir=run.data_dir)
    else:
        raw = load_raw(run.train_file, run.validation_file, run.dataset_name, run.dataset_config)
    out = {}
    for split, data in raw.items():
        limit = run.max_train_samples if split == "train" else run.max_eval_samples
        out[split] = data.select(range(min(limit, len(data)))) if limit else data
    return out
