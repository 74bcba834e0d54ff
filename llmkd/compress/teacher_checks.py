"""The teacher check `llmkd compress` runs before distilling: `check_teacher(...) -> TeacherReport`.

A teacher can teach as it is when it is a sequence classifier for the data's classes (names matched as `llmkd
eval` matches them: llmkd.evaluation.any_data.label_space; integer labels are class ids in the teacher's order)
whose validation accuracy beats the majority-class baseline beyond chance. Otherwise:

- "needs fine-tuning" (a flag, not an error: compress fine-tunes it on the training data first): its
  `architectures` hold no *ForSequenceClassification, its head weights were newly initialised on loading, or its
  head is for other classes (another number of them, or names that are not the data's);
- an error: a head for the data's classes whose accuracy does not beat the baseline — the lower end of the
  paired 95% bootstrap interval (llmkd.evaluation.intervals) of accuracy − baseline accuracy is not above
  `margin`. Such a teacher would pass on nothing but noise.

The score: accuracy and macro-F1 on the validation rows, each with its bootstrap interval, from one batched
forward pass without gradients (llmkd.evaluation.checkpoints.logits_for_texts: right-padded as in training).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from datasets import Dataset
from torch import nn

from llmkd.cli.preflight import check_model_folder
from llmkd.compress.checks import Report
from llmkd.compress.label_checks import class_keys
from llmkd.data.glue import _label_key, model_label_names
from llmkd.data.loading import check_texts, read_files
from llmkd.evaluation.any_data import label_space, resolve_columns
from llmkd.evaluation.checkpoints import logits_for_texts, trained_length
from llmkd.evaluation.intervals import RESAMPLES, percentile_interval, replicate_scores, split_replicates
from llmkd.modeling import SEQ_CLS

METRICS = ("accuracy", "macro_f1")


@dataclass
class TeacherReport(Report):
    """`check_teacher`'s findings; `needs_fine_tuning` and its `reasons`; stats: teacher, num_labels,
    label_names, architectures, rows, accuracy, macro_f1, intervals, baseline, vs_baseline."""

    title: ClassVar[str] = "teacher check"
    needs_fine_tuning: bool = False
    reasons: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        """The teacher can teach as it is: a head for the data's classes that beats the baseline."""
        return not self.needs_fine_tuning and not self.errors

    def markdown(self) -> str:
        s, lines = self.stats, ["## Teacher", ""]
        if "accuracy" in s:
            acc, f1, b = s["intervals"]["accuracy"], s["intervals"]["macro_f1"], s["baseline"]
            d = s["vs_baseline"]
            lines += [
                f"`{s['teacher']}` on {s['rows']} validation rows: accuracy {_pct(s['accuracy'])} "
                f"[{_pct(acc[0])}, {_pct(acc[1])}], macro-F1 {_pct(s['macro_f1'])} [{_pct(f1[0])}, {_pct(f1[1])}]; "
                f"majority baseline ({b['class']!r}) {_pct(b['accuracy'])}, difference "
                f"{100 * d['difference']:+.1f} points [{100 * d['interval'][0]:+.1f}, {100 * d['interval'][1]:+.1f}].",
                "",
            ]
        return "\n".join(lines + self.findings_markdown())


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def check_teacher(
    teacher,
    tokenizer,
    validation: Dataset | str,
    text_columns=None,
    label_column: str | None = None,
    *,
    classes=None,
    baseline_class: str | None = None,
    batch_size: int = 64,
    max_length: int | None = None,
    max_eval_samples: int | None = None,
    margin: float = 0.0,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> TeacherReport:
    """Checks whether `teacher` can teach on this data; bad teachers are reported, not raised (see the report).

    `teacher`: a model folder / Hub id / embedded:NAME, or an in-memory classifier (then `tokenizer` is required; for a folder,
    None loads its own). `validation`: a dataset or a data file (llmkd.data.loading.read_files); its columns are
    guessed when not given. `classes`: the data's class set (check_data's stats["classes"], train and validation
    together; default: the validation rows' classes, which may lack one). `baseline_class`: the class the baseline
    always predicts (check_data's stats["majority"]["class"], the train majority); default: the validation
    majority. `max_length`: tokens per text (default: the length the tokenizer records, else 128);
    `max_eval_samples`: a seeded sample of the rows. `margin` (accuracy, 0-1): how far above the baseline the
    interval's lower end must lie; `resamples`, `seed`: the bootstrap's.
    Raises FileNotFoundError for a folder that is no saved model, ValueError for missing columns or empty texts
    and for an in-memory teacher without a tokenizer.
    """
    if isinstance(teacher, nn.Module) and tokenizer is None:
        raise ValueError("an in-memory teacher needs its tokenizer: pass tokenizer=...")
    if isinstance(teacher, str):
        from llmkd.students.loading import resolve_path

        teacher = resolve_path(teacher)  # embedded:NAME -> its folder
    report = TeacherReport()
    data, text, label = _validation(validation, text_columns, label_column, max_eval_samples, seed)
    name, model, config = _config(teacher)
    report.stats |= {
        "teacher": name,
        "num_labels": config.num_labels,
        "label_names": model_label_names(config),
        "architectures": _architectures(config, model),
    }
    model = _head(report, teacher, model, config, data, label, classes)
    if report.needs_fine_tuning:
        return report
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(teacher)
    length = max_length or trained_length(tokenizer)
    logits = logits_for_texts(model, tokenizer, [list(data[c]) for c in text], batch_size, length)
    gold = _gold_ids(data, label, config)
    _score(report, logits.argmax(axis=1), gold, baseline_class, config, margin, resamples, seed)
    return report


def _validation(validation, text_columns, label_column, max_eval_samples, seed) -> tuple[Dataset, list, str]:
    """(the rows to score, their text columns, their label column), checked (columns, no empty text)."""
    if not isinstance(validation, Dataset):
        validation = read_files({"validation": validation})["validation"]
    text, label, _ = resolve_columns(validation, "validation data", text_columns, label_column)
    check_texts(validation, text, SEQ_CLS, "validation data")
    if max_eval_samples and len(validation) > max_eval_samples:
        rows = np.random.default_rng(seed).choice(len(validation), max_eval_samples, replace=False)
        validation = validation.select(np.sort(rows))
    return validation, text, label


def _head(report, teacher, model, config, data, label, classes):
    """The model to score (loaded from its folder when its head fits the data), or the reasons it needs
    fine-tuning in `report`."""
    report.reasons = _head_reasons(config, model, data, label, report.stats["teacher"], classes)
    if model is None and not report.reasons:  # a base encoder is not loaded: it is fine-tuned anyway
        model, missing = _load(teacher)
        if missing:
            report.reasons.append(f"its weights {sorted(missing)[:4]} were newly initialised on loading")
    if report.reasons:
        report.needs_fine_tuning = True
        report.add(
            "warning",
            "needs_fine_tuning",
            f"teacher {report.stats['teacher']!r} cannot teach as it is: " + "; ".join(report.reasons),
            "compress fine-tunes it on the training data first (or give a teacher fine-tuned on this task)",
        )
    return model


def _config(teacher):
    """(name, in-memory model or None, config); a folder is checked first (config.json, tokenizer)."""
    if isinstance(teacher, nn.Module):
        return f"<in-memory {type(teacher).__name__}>", teacher.eval(), teacher.config
    from transformers import AutoConfig

    check_model_folder("teacher", teacher)
    return str(teacher), None, AutoConfig.from_pretrained(teacher)


def _architectures(config, model) -> list[str]:
    # A model in memory is what its class says: one fine-tuned from a base checkpoint and never saved keeps the
    # base's config.architectures (e.g. BertForMaskedLM). A folder's class is what its config names.
    return [type(model).__name__] if model is not None else list(getattr(config, "architectures", None) or [])


def _load(teacher):
    """(model in eval mode, the weights newly initialised when loading it from its folder)."""
    from transformers import AutoModelForSequenceClassification

    loaded, info = AutoModelForSequenceClassification.from_pretrained(teacher, output_loading_info=True)
    return loaded.eval(), set(info.get("missing_keys") or ())


def _head_reasons(config, model, data: Dataset, label: str, name: str, classes=None) -> list[str]:
    """Why the teacher's head cannot score this data: no classification head, or another label space."""
    architectures = _architectures(config, model)
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        return [f"it has no sequence-classification head (architectures {architectures})"]
    seen = classes is None  # only the classes the validation rows happen to hold
    if seen:
        classes = sorted(class_keys(data[label])[1].values(), key=str)
    names = model_label_names(config)
    ids = [int(c) for c in classes if str(c).strip().lstrip("-").isdigit()]
    # Named classes are matched by name, so the rows may hold a subset of the teacher's; ids name nothing, so the
    # counts must agree (pass `classes` from check_data when the validation rows lack a class).
    subset_ok = seen and not ids
    if (config.num_labels < len(classes) if subset_ok else config.num_labels != len(classes)) or any(
        not 0 <= i < config.num_labels for i in ids
    ):
        return [
            f"its head predicts {config.num_labels} classes {names} but the data has {len(classes)} {list(classes)}"
        ]
    known = {_label_key(n) for n in names}
    strangers = [
        c for c in classes if not str(c).strip().lstrip("-").isdigit() and _label_key(c) not in known
    ]
    if strangers:
        return [f"its classes {names} are not the data's {list(classes)} ({strangers} are not among them)"]
    try:
        label_space({name: config}, data, label, name, "validation data")
    except ValueError as err:
        return [f"its classes {names} do not fit the validation labels ({err})"]
    return []


def _gold_ids(data: Dataset, label: str, config) -> np.ndarray:
    """Gold labels as the teacher's logit indices: names matched by key, ids taken as the teacher's ids."""
    index = {_label_key(n): i for i, n in enumerate(model_label_names(config))}
    values = data[label]
    ids = [
        int(v) if not isinstance(v, str) or v.strip().lstrip("-").isdigit() else index[_label_key(v)]
        for v in values
    ]
    return np.asarray(ids, dtype=np.int64)


def _score(report, predicted, gold, baseline_class, config, margin, resamples, seed) -> None:
    """Accuracy and macro-F1 with intervals, the baseline, and the error when the teacher does not beat it."""
    names = model_label_names(config)
    if baseline_class is None:
        base = int(np.bincount(gold, minlength=len(names)).argmax())
    else:
        base = {_label_key(n): i for i, n in enumerate(names)}.get(_label_key(baseline_class))
        base = int(baseline_class) if base is None else base  # an id written as text ("1")
    constant = np.full_like(gold, base)
    reps = split_replicates({"teacher": predicted, "baseline": constant}, gold, METRICS, resamples, seed, 0)
    whole = np.arange(len(gold))[None]
    point = {m: float(replicate_scores(m, predicted, gold, whole)[0]) for m in METRICS}
    baseline = float(np.mean(constant == gold))
    difference = percentile_interval(reps["teacher"]["accuracy"] - reps["baseline"]["accuracy"])
    report.stats |= point | {
        "rows": len(gold),
        "intervals": {m: percentile_interval(reps["teacher"][m]) for m in METRICS},
        "baseline": {"class": names[base], "accuracy": baseline},
        "vs_baseline": {"difference": point["accuracy"] - baseline, "interval": difference, "margin": margin},
    }
    low, high = difference
    said = (
        f"teacher {report.stats['teacher']!r}: accuracy {_pct(point['accuracy'])}, macro-F1 "
        f"{_pct(point['macro_f1'])} on {len(gold)} validation rows; the majority baseline (always "
        f"{names[base]!r}) scores {_pct(baseline)}: difference {100 * (point['accuracy'] - baseline):+.1f} points, "
        f"95% interval [{100 * low:+.1f}, {100 * high:+.1f}]"
    )
    if low > margin:
        report.add("info", "teacher_score", said)
        return
    report.add(
        "error",
        "teacher_not_better_than_baseline",
        f"{said}: not above the baseline{f' by {100 * margin:.1f} points' if margin else ''} beyond chance, "
        "so it has nothing to teach",
        "give a teacher fine-tuned on this task, or a base encoder for compress to fine-tune; check that "
        "label_column holds the classes the teacher predicts, in its order (ids) or by its names",
    )
