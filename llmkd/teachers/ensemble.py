"""`EnsembleTeacher`: several teachers as one source (multi-teacher distillation, Gou et al. 2021 §5.2).

Logit terms without a ``teacher:`` key read the combination of every member's logits (llmkd.losses.ensemble:
z = T · log Σ_i w_i softmax(z_i / T) at the run's one temperature T, so softmax(z / T) is the mixture); a term
with ``teacher: NAME`` reads that member's own outputs. Feature and relation terms compare one teacher's states,
so with more than one member they must name it.

Members are frozen models (`LiveTeacher`) or classifier teacher-logit caches (`CachedTeacher`). A model given a
tokenizer in ``tokenizers=`` reads its own tokenisation of each example, columns ``teacher@<name>.input_ids``, …
added by `prepare` and padded by llmkd.data.collate (which pads them with 0; each member writes its own pad id
into the padded slots here, as decoder classifiers find their last token by it): classifier teachers of different
vocabularies can teach one student. Every other member reads the student's ids. A cache is keyed by the student's
tokenisation and rows: it reads the student's ids and its own row index, ``teacher@<name>.cache_index``.
Label spaces are aligned by name: each member's logit columns are permuted to the student's label order.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn

from llmkd.data.collate import padding_id
from llmkd.data.loading import tokenize
from llmkd.knowledge import KNOWLEDGE
from llmkd.losses.bucketed import RAW_LOGIT_LOSSES
from llmkd.losses.ensemble import COMBINATIONS, combination_weights, mixture_logits, random_teacher
from llmkd.modeling import CAUSAL_LM, SEQ_CLS, output_rows, text_config
from llmkd.teachers.base import TeacherOutputs, TeacherSource
from llmkd.teachers.cached.binding import attach_cache_index
from llmkd.teachers.cached.fingerprint import data_key
from llmkd.teachers.cached.reader import CACHE_COLUMN, CachedTeacher
from llmkd.teachers.live import CROSS_TOKENIZER_HINT, LiveTeacher

ROUTE_INDEX = "teacher@index"  # each row's member index, from the route column (see `prepare`)
NAME = re.compile(r"[A-Za-z0-9_-]+")
RESPONSES = frozenset({"logits", "topk"})  # what a source gives of its predictions; the rest are features


def prefix_of(name: str) -> str:
    """Column prefix of a member's own columns (its token stream, its cache row index)."""
    return f"teacher@{name}."


class EnsembleTeacher(TeacherSource):
    """Several teachers, combined (see the module docstring).

    Args:
        teachers: name -> a transformers model, a teacher source, or a teacher-logit cache folder. The first
            member's config stands for the ensemble's (layer counts for terms without ``teacher:``).
        combination: one of `llmkd.losses.ensemble.COMBINATIONS`.
        weights: name -> a_i >= 0 (or a list in member order): the fixed weights of ``weights`` (required there)
            or the draw probabilities of ``random``; refused by the other combinations, where it would do nothing.
        tokenizers: name -> tokenizer of each model member that reads its own tokenisation of the text.
        route_column: with ``route``: the raw data column naming each example's member (`prepare` reads it).
    """

    def __init__(
        self, teachers: Mapping, combination="mean", weights=None, *, tokenizers=None, route_column=None
    ):
        if not isinstance(teachers, Mapping) or not teachers:
            raise ValueError(f"teachers must be a non-empty mapping of name -> teacher, got {teachers!r}")
        self.tokenizers = dict(tokenizers or {})
        bad = [n for n in teachers if not isinstance(n, str) or not NAME.fullmatch(n)]
        if bad:
            raise ValueError(
                f"teacher names {bad}: use letters, digits, '-' and '_' only (they name columns)"
            )
        self.sources = {n: self._member(n, t) for n, t in teachers.items()}
        unknown = sorted(set(self.tokenizers) - set(self.sources))
        if unknown:
            raise ValueError(f"tokenizers names {unknown}, which are not teachers ({sorted(self.sources)})")
        self.combination, self.route_column = combination, route_column
        self.weights = self._weights(weights)
        tasks = {n: s.task for n, s in self.sources.items()}
        if len(set(tasks.values())) > 1:
            raise ValueError(
                f"the teachers' tasks differ ({tasks}); every teacher must do the student's task"
            )
        first = next(iter(self.sources.values()))
        self.task, self.config = first.task, _generic_labels(first.config, first.task)
        self.model = first.model if len(self.sources) == 1 else None
        provided = [s.provides for s in self.sources.values()]
        # The combined logits need every member's; a feature needs only the member a term names.
        self.provides = frozenset({"logits"} if all("logits" in p for p in provided) else ())
        self.provides |= frozenset().union(*provided) - RESPONSES
        self.temperature_value, self.seed, self._trainer, self._order = None, 0, None, {}
        self._pad_ids = {
            n: padding_id(self.tokenizers.get(n), s.config)
            for n, s in self.sources.items()
            if isinstance(s, LiveTeacher)
        }

    def _member(self, name: str, teacher) -> TeacherSource:
        own = name in self.tokenizers
        if isinstance(teacher, nn.Module):
            return LiveTeacher(teacher, prefix_of(name) if own else "")
        if isinstance(teacher, (str, os.PathLike)):
            teacher = CachedTeacher(teacher)  # a model folder has no manifest: the error says what a cache is
        if not isinstance(teacher, TeacherSource) or teacher.input_prefix or own:
            raise ValueError(
                f"teacher {name!r}: give a transformers model (with tokenizers[{name!r}] when it reads its own "
                f"tokenisation) or a teacher-logit cache folder, got {type(teacher).__name__}"
            )
        if isinstance(teacher, CachedTeacher) and teacher.task != SEQ_CLS:
            raise ValueError(
                f"teacher {name!r} is a causal-LM logit cache: it keeps each position's top-k log-probabilities, "
                "which cannot be mixed exactly with other teachers' distributions; use the live model"
            )
        return teacher

    def _weights(self, weights) -> list[float] | None:
        mode, names = self.combination, list(self.sources)
        if mode not in COMBINATIONS:
            raise ValueError(f"unknown teacher combination {mode!r}; choose one of {', '.join(COMBINATIONS)}")
        if (mode == "route") != (self.route_column is not None):
            raise ValueError(
                "teacher combination 'route' needs route_column (the data column naming each example's teacher), "
                f"and route_column is only read by 'route' (got combination {mode!r}, route_column "
                f"{self.route_column!r})"
            )
        if weights is None:
            if mode == "weights":
                raise ValueError(f"teacher combination 'weights' needs a weight for each teacher ({names})")
            return None
        if mode not in ("weights", "random"):
            raise ValueError(
                f"teacher weights {weights} have no effect with combination {mode!r} (only 'weights' and 'random' "
                "read them); remove them or use teacher combination 'weights'"
            )
        if isinstance(weights, Mapping):
            if set(weights) != set(names):
                raise ValueError(f"weights name {sorted(weights)}; give one for each teacher: {names}")
            weights = [weights[n] for n in names]
        if len(weights) != len(names):
            raise ValueError(f"{len(weights)} weights for {len(names)} teachers ({names})")
        combination_weights(torch.zeros(len(names), 1), "weights", weights=list(weights))  # checks the values
        return [float(w) for w in weights]

    # -- the contract --------------------------------------------------------------------------------
    def names(self) -> set[str]:
        return set(self.sources)

    def member(self, name: str | None) -> TeacherSource:
        if name is None:
            return self
        if name not in self.sources:
            raise ValueError(f"no teacher named {name!r}; this ensemble has {sorted(self.sources)}")
        return self.sources[name]

    def columns(self) -> set[str]:
        out = {ROUTE_INDEX} if self.route_column else set()
        for name, source in self.sources.items():
            out |= {prefix_of(name) + CACHE_COLUMN} if isinstance(source, CachedTeacher) else source.columns()
        return out

    def required_columns(self) -> set[str]:
        out = {ROUTE_INDEX} if self.route_column else set()
        for name, source in self.sources.items():
            if isinstance(source, CachedTeacher):
                out.add(prefix_of(name) + CACHE_COLUMN)
            elif name in self.tokenizers:
                out.add(prefix_of(name) + "input_ids")
        return out

    def check(self, pair) -> None:
        if pair.regression:
            raise ValueError(
                "an ensemble mixes class probabilities, but this is a regression task (num_labels=1); use one teacher"
            )
        self.seed = pair.args.seed
        self._check_terms(pair)
        if pair.task == SEQ_CLS:
            self._order = label_order(
                text_config(pair.student), {n: s.config for n, s in self.sources.items()}
            )
        for name, source in self.sources.items():
            if pair.task == CAUSAL_LM:
                _check_causal_member(name, source, pair.student, name in self.tokenizers)
            # teacher_processing_class: the tokenizer of the members that read the student's ids (checked)
            tokenizer = self.tokenizers.get(name, pair.teacher_tokenizer)
            source.check(replace(pair, source=source, teacher_tokenizer=tokenizer))

    def _check_terms(self, pair) -> None:
        """Each term's teacher exists and provides what it compares; one temperature for the combination."""
        names, args, temperatures = sorted(self.sources), pair.args, set()
        for i, term in enumerate(args.terms):
            where = f"terms[{i}] ({term.knowledge} {term.loss})"
            if term.teacher is not None and term.teacher not in self.sources:
                raise ValueError(f"{where} names teacher {term.teacher!r}; this ensemble has {names}")
            needs = KNOWLEDGE[term.knowledge].needs_for(term)
            features = needs - RESPONSES
            if features and term.teacher is None and len(names) > 1:
                raise ValueError(
                    f"{where} compares one teacher's {sorted(features)}, but there are {len(names)}: add "
                    f"`teacher: NAME` with one of {names}"
                )
            if features:
                _check_feature_member(
                    where, term.teacher or names[0], self.sources, self.tokenizers, features
                )
            elif (
                "logits" in needs and term.teacher is None
            ):  # reads the mixture (logit and adversarial terms)
                if term.knowledge == "logits" and term.loss in RAW_LOGIT_LOSSES:
                    raise ValueError(
                        f"{where}: {term.loss!r} compares raw logits, which a mixture of teachers' probabilities "
                        f"does not keep; use a KL/JSD-type loss, or name one teacher (`teacher:` one of {names})"
                    )
                temperatures.add(term.temperature if term.temperature is not None else args.temperature)
        if len(temperatures) > 1:
            raise ValueError(
                f"logit terms read the teachers' mixture at temperatures {sorted(temperatures)}, but the mixture is "
                "formed at one temperature (softmax(z / T) is the mixture only at that T); give them one temperature"
            )
        self.temperature_value = temperatures.pop() if temperatures else float(args.temperature)

    def place(self, trainer) -> None:
        self._trainer = trainer  # the draw of `random` reads its optimizer step
        for source in self.sources.values():
            source.place(trainer)

    def save(self, folder: str, trainer) -> None:
        for source in self.sources.values():
            source.save(folder, trainer)

    def load(self, folder: str, trainer) -> None:
        for source in self.sources.values():
            source.load(folder, trainer)

    # -- per batch -------------------------------------------------------------------------------------
    def draw(self, step: int) -> str:
        """The member `random` uses for optimizer step `step` (from the run's seed and the step only)."""
        probabilities = self.weights or [1.0] * len(self.sources)
        return list(self.sources)[random_teacher(self.seed, step, probabilities)]

    def outputs(self, batch: dict, flags: dict) -> TeacherOutputs:
        if self.temperature_value is None:
            raise RuntimeError(
                "EnsembleTeacher.check(pair) has not run; give the ensemble to a trainer as teacher="
            )
        members = {name: self._member_outputs(name, batch, flags) for name in self.sources}
        logits = torch.stack([out.logits.float() for out in members.values()])
        combined = mixture_logits(logits, self._combination_weights(logits, batch), self.temperature_value)
        only = next(iter(members.values())) if len(members) == 1 else TeacherOutputs()
        return TeacherOutputs(
            logits=combined, hidden_states=only.hidden_states, attentions=only.attentions, members=members
        )

    def _member_outputs(self, name: str, batch: dict, flags: dict) -> TeacherOutputs:
        out = self.sources[name].outputs(self._view(name, batch), flags)
        order = self._order.get(name)
        if order is not None:  # logit k means the student's class k
            out = replace(out, logits=out.logits.index_select(-1, order.to(out.logits.device)))
        return out

    def _view(self, name: str, batch: dict) -> dict:
        """The batch as the member reads it: its cache rows, or its ids with its own pad id in padded slots."""
        if isinstance(self.sources[name], CachedTeacher):
            return {**batch, CACHE_COLUMN: batch[prefix_of(name) + CACHE_COLUMN]}
        own = prefix_of(name) if name in self.tokenizers else ""
        ids, mask = batch.get(own + "input_ids"), batch.get(own + "attention_mask")
        if name not in self._pad_ids or ids is None or mask is None:
            return batch
        return {**batch, own + "input_ids": ids.masked_fill(mask == 0, self._pad_ids[name])}

    def _combination_weights(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        mode, draw, route = self.combination, None, None
        training = self._trainer is not None and self._trainer.model.training
        if mode == "random" and training:  # evaluation scores against the expectation, the weighted mean
            draw = list(self.sources).index(self.draw(self._trainer.state.global_step))
        if mode == "route":
            route = batch[ROUTE_INDEX].view(-1)
        weights = combination_weights(logits, mode, weights=self.weights, route=route, draw=draw)
        return weights.to(logits.device)

    # -- data ------------------------------------------------------------------------------------------
    def prepare(self, dataset, raw=None, *, text_columns="text", max_length: int = 128, split: str = "train"):
        """`dataset` (the student's tokenisation of `raw`, row for row) with the columns the members read.

        Adds each own-tokenizer member's tokenisation of `raw`'s text columns (``teacher@<name>.input_ids``, …,
        truncated to `max_length`), each cache member's row index for `split` (``teacher@<name>.cache_index``;
        the cache's tokenisation of this split is checked), and, for ``route``, ``teacher@index`` from `raw`'s
        route column (member names or indices). `raw` defaults to `dataset`."""
        raw = dataset if raw is None else raw
        if len(raw) != len(dataset):
            raise ValueError(
                f"raw data has {len(raw)} rows but the tokenised data {len(dataset)}; give the same rows"
            )
        for name, tokenizer in self.tokenizers.items():
            encoded = tokenize(raw, tokenizer, SEQ_CLS, text_columns, None, max_length)
            for column in (c for c in encoded.column_names if c != "label"):
                dataset = dataset.add_column(prefix_of(name) + column, encoded[column])
        for name, source in self.sources.items():
            if isinstance(source, CachedTeacher):
                source.check_components({"data": {split: data_key(dataset)}})
                index = attach_cache_index(dataset.select_columns(["input_ids"]), source, split)[CACHE_COLUMN]
                dataset = dataset.add_column(prefix_of(name) + CACHE_COLUMN, index)
        if self.route_column is not None:
            dataset = dataset.add_column(ROUTE_INDEX, self.route_indices(raw, self.route_column))
        return dataset

    def route_indices(self, raw, column: str) -> list[int]:
        """Each row's member index from `column` (a member's name or index); a ValueError names bad rows."""
        if column not in raw.column_names:
            raise ValueError(f"route_column {column!r} is not in the data, which has {raw.column_names}")
        names = list(self.sources)
        values = raw[column]
        indices = [names.index(v) if v in names else v for v in values]
        bad = [i for i, v in enumerate(indices) if type(v) is not int or not 0 <= v < len(names)]
        if bad:
            raise ValueError(
                f"route_column {column!r} must name one of the teachers {names} (or give its index) in every row; "
                f"rows {bad[:5]} have {[values[i] for i in bad[:5]]}"
            )
        return indices


def _generic_labels(config, task: str):
    """The first member's config, with generic class names: each member is aligned to the student by name."""
    if task != SEQ_CLS:
        return config
    config, names = copy.deepcopy(config), [f"LABEL_{i}" for i in range(config.num_labels)]
    config.id2label, config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}
    return config


def _names(config) -> list[str] | None:
    """Class names in id order, or None for generic ones (LABEL_i)."""
    id2label = {int(k): v for k, v in (config.id2label or {}).items()}
    names = [id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)]
    return None if all(n == f"LABEL_{i}" for i, n in enumerate(names)) else names


def label_order(student_config, configs: Mapping) -> dict:
    """name -> (C,) indices that put a member's logit columns in the student's class order (None: as is).

    The reference names are the student's, or the first named member's when the student's are generic
    (LABEL_i); a member with generic names is taken as it is. ValueError for other class counts or names."""
    reference = _names(student_config) or next((n for c in configs.values() if (n := _names(c))), None)
    order = {}
    for name, config in configs.items():
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if text.num_labels != student_config.num_labels:
            raise ValueError(
                f"teacher {name!r} has num_labels={text.num_labels}, the student {student_config.num_labels}; "
                "every teacher must predict the student's classes"
            )
        names = _names(text)
        if names is None or reference is None or names == reference:
            order[name] = None
        elif sorted(names) == sorted(reference):
            order[name] = torch.tensor([names.index(label) for label in reference])
        else:
            raise ValueError(
                f"teacher {name!r} predicts classes {names}, the student {reference}; the ensemble aligns "
                "teachers by class name, so give every teacher (and the student) the same class names"
            )
    return order


def _check_feature_member(where: str, name: str, sources: dict, tokenizers: dict, features) -> None:
    """A feature or relation term compares token positions: its member must read the student's ids."""
    if name in tokenizers:
        raise ValueError(
            f"{where} compares teacher {name!r}'s {sorted(features)} position by position, but that teacher reads "
            "its own tokenisation (other positions); name a teacher that reads the student's ids, or drop the term"
        )
    missing = features - sources[name].provides
    if missing:
        raise ValueError(
            f"{where} needs teacher {name!r}'s {sorted(missing)}, which its source ({type(sources[name]).__name__}) "
            "does not provide; name a live teacher"
        )


def _check_causal_member(name: str, source, student, own_tokenizer: bool) -> None:
    """Causal LMs are mixed position by position over one vocabulary: the student's ids and logit rows."""
    if own_tokenizer:
        raise ValueError(
            f"teacher {name!r} reads its own tokenisation, but causal-LM teachers are mixed position by position "
            "over the student's tokens; use a teacher with the student's tokenizer, or "
            + CROSS_TOKENIZER_HINT
        )
    if isinstance(source, LiveTeacher) and output_rows(source.model) != output_rows(student):
        raise ValueError(
            f"teacher {name!r} has {output_rows(source.model)} logit rows, the student {output_rows(student)}; "
            "an ensemble mixes one vocabulary, so every teacher needs the student's"
        )
