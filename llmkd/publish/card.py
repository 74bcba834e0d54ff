"""The model card (README.md) of an llmkd output folder, written with huggingface_hub's ModelCard / ModelCardData.

The card says what the student was distilled from (`base_model`: the teacher's Hub id, or "local" for a folder,
whose name stays in the text) and how: tags (llmkd, distillation, knowledge types, losses, trainer), data, an
evaluation table measured at the end of training (teacher vs student metric, % of teacher, top-1 agreement,
parameters, CPU latency at batch 1 and speed-up; also as model-index results), the recipe that produced it (YAML
file with its command-line flags merged in, secrets removed), the llmkd / transformers / torch versions and a
content hash of the teacher's files. A fine-tuning run's card names its base model and its metric instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re

import torch
import transformers
from huggingface_hub import EvalResult, ModelCard, ModelCardData

import llmkd
from llmkd.atomic import atomic_write
from llmkd.content import checkpoint_key, hub_snapshot
from llmkd.modeling import CAUSAL_LM, modality, task_of
from llmkd.publish import measure
from llmkd.publish.card_text import TEMPLATE, evaluation_section, number, recipe_section, training_section

logger = logging.getLogger(__name__)
CARD = "README.md"
SECRET = re.compile(r"(^|_)(token|secret|password|api_key|apikey|credentials?)$", re.IGNORECASE)
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # a repo id: [namespace/]name
PIPELINES = {CAUSAL_LM: "text-generation", "sequence_classification": "text-classification"}
# Classifiers of other inputs: their pipeline, Auto class and processor class.
MODALITIES = {
    "audio": ("audio-classification", "AutoModelForAudioClassification", "AutoFeatureExtractor"),
    "image": ("image-classification", "AutoModelForImageClassification", "AutoImageProcessor"),
}
_RECIPE: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("llmkd_recipe", default=None)
_MEASURE: contextvars.ContextVar[bool] = contextvars.ContextVar("llmkd_card_measure", default=True)


@contextlib.contextmanager
def cards_without_measurement():
    """While inside, cards skip the teacher-vs-student measurement (`llmkd compress`'s short search runs, whose
    folders are intermediate: the measurement would cost more than some of the runs)."""
    token = _MEASURE.set(False)
    try:
        yield
    finally:
        _MEASURE.reset(token)


@contextlib.contextmanager
def recipe_context(command: str, path: str, values: dict):
    """While inside, cards name this recipe: `values` is the YAML file's mapping with the flags merged in."""
    token = _RECIPE.set((command, os.fspath(path), values))
    try:
        yield
    finally:
        _RECIPE.reset(token)


def without_secrets(values):
    """A copy of a recipe mapping without keys that hold credentials (hub_token, …), at any depth."""
    if isinstance(values, dict):
        return {k: without_secrets(v) for k, v in values.items() if not SECRET.search(str(k))}
    if isinstance(values, list):
        return [without_secrets(v) for v in values]
    return values


def is_llmkd_card(path: str) -> bool:
    return os.path.isfile(path) and "llmkd" in (ModelCard.load(path).data.tags or [])


def write_model_card(trainer, report: dict | None = None, run=None, *, measure_models: bool = True) -> str:
    """Writes `<output_dir>/README.md` (atomically) on the main process and returns its path.

    Args:
        trainer: the finished trainer (KDTrainer, a scheme, or `finetune`'s); its eval set is the card's.
        report: llmkd_report.json's dict (metrics, sizes); the measured comparison is added to it as `card`.
        run: the recipe's RunConfig / FinetuneConfig, None from the Python API (names then come from models).
        measure_models: compare teacher and student on the eval set and time them (a few seconds for the demo).
    """
    report = report if report is not None else {}
    path = os.path.join(trainer.args.output_dir, CARD)
    if not trainer.is_world_process_zero():
        return path
    facts = gather(trainer, report, run, measure_models and _MEASURE.get())
    report["card"] = {k: facts[k] for k in ("comparison", "latency", "parameters") if facts.get(k)}
    card = ModelCard.from_template(card_data(facts), template_str=TEMPLATE, **sections(facts))
    atomic_write(path, lambda handle: handle.write(str(card)))
    return path


# ---- facts -------------------------------------------------------------------------------------------
def gather(trainer, report: dict, run, measure_models: bool) -> dict:
    student = getattr(trainer, "student", None) or trainer.accelerator.unwrap_model(trainer.model)
    teachers = teacher_names(trainer, run)
    facts = {
        "name": os.path.basename(os.path.abspath(trainer.args.output_dir)),
        "kind": "distillation" if teachers else "fine-tuning",
        "sources": teachers or [base_name(trainer, run)],
        "revision": getattr(run, "teacher_revision", None) or getattr(run, "revision", None),
        "task": _task(student),
        "modality": modality(student),
        "trainer": report.get("trainer") or type(trainer).__name__,
        "scheme": getattr(run, "trainer", None),
        "terms": [t.to_dict() for t in getattr(trainer.args, "terms", [])],
        "args": trainer.args,
        "report": report,
        "data": data_facts(trainer, run),
        "recipe": _RECIPE.get(),
        "versions": {
            "llmkd": llmkd.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }
    facts["hashes"] = {name: content_hash(name, facts["revision"]) for name in facts["sources"]}
    teacher = comparable_teacher(trainer, student, report)
    facts["parameters"] = parameter_counts(report, teacher, student)
    if measure_models and teacher is not None and trainer.eval_dataset is not None:
        facts["comparison"] = measure.compare_on_eval(
            trainer, teacher, student, report.get("eval"), getattr(trainer, "vocab_rows", None)
        )
        facts["latency"] = measure.time_batch_one(trainer, teacher, student)
    elif report.get("eval"):  # the student's own numbers (fine-tuning, or a scheme without a frozen teacher)
        facts["student_eval"] = report["eval"]
    return facts


def _task(model) -> str | None:
    try:
        return task_of(model)
    except ValueError:
        return None


def teacher_names(trainer, run) -> list[str]:
    """The teachers' Hub ids or folders, as the recipe gave them (or from the models, without a recipe)."""
    if run is not None and getattr(run, "teachers", None):
        return [_member(m) for m in run.teachers]
    if run is not None and hasattr(run, "teacher"):
        return [str(run.teacher)] if run.teacher else []
    if run is not None or not hasattr(trainer, "source"):  # a fine-tuning recipe or trainer
        return []
    teacher = getattr(
        trainer, "teacher", None
    )  # a KDTrainer from Python: the model's own name, if it has one
    name = getattr(getattr(teacher, "config", None), "_name_or_path", None)
    return [name or f"an in-memory {type(teacher).__name__}"]


def _member(entry) -> str:
    if isinstance(entry, dict):
        return str(entry.get("model") or entry.get("cache") or entry.get("name"))
    return str(entry)


def base_name(trainer, run) -> str:
    if run is not None and getattr(run, "model", None):
        return str(run.model)
    model = trainer.accelerator.unwrap_model(trainer.model)
    return getattr(getattr(model, "config", None), "_name_or_path", "") or "unknown"


def is_local(name: str) -> bool:
    return os.path.isdir(name)


def is_hub_id(name: str) -> bool:
    return not is_local(name) and HUB_ID.match(name) is not None


def content_hash(name: str, revision: str | None) -> str | None:
    """llmkd.content.checkpoint_key of the folder from_pretrained read (a local folder or the Hub-cache
    snapshot); None when the files are not here (a Hub id never downloaded to this machine, a cache folder)."""
    folder = name if is_local(name) else hub_snapshot(name, revision)
    if not folder:
        return None
    try:
        return checkpoint_key(folder)
    except (ValueError, OSError):
        return None


def comparable_teacher(trainer, student, report: dict):
    """The frozen teacher model to score beside the student, or None: caches, ensembles, peers, a moving
    average, exits of the student itself and teachers reading another tokenisation are not one comparable
    model on the student's inputs."""
    teacher = getattr(trainer, "teacher", None)
    source = getattr(trainer, "source", None)
    if not isinstance(teacher, torch.nn.Module) or not hasattr(teacher, "config") or teacher is student:
        return None
    if getattr(source, "input_prefix", "") or report.get("teacher_source") or report.get("teachers"):
        return None
    return teacher


def parameter_counts(report: dict, teacher, student) -> dict:
    sizes = {"student": (report.get("student") or report.get("size") or {}).get("parameters")}
    sizes["teacher"] = (report.get("teacher_size") or {}).get("parameters")
    if sizes["student"] is None:
        sizes["student"] = measure.parameters(student)
    if sizes["teacher"] is None and teacher is not None:
        sizes["teacher"] = measure.parameters(teacher)
    return {k: v for k, v in sizes.items() if v is not None}


def data_facts(trainer, run) -> dict:
    """Where the data came from (Hub dataset, GLUE task or file names) and how many rows were used."""
    out = {
        "train_rows": _rows(trainer.train_dataset),
        "eval_rows": {k: len(v) for k, v in measure.splits(trainer.eval_dataset).items()},
        "max_length": getattr(run, "max_length", None),
    }
    if run is None:
        return out
    if getattr(run, "glue_task", None):
        return out | {"hub": ["nyu-mll/glue"], "names": [f"GLUE {run.glue_task}"]}
    if getattr(run, "dataset_name", None):
        config = f" ({run.dataset_config})" if getattr(run, "dataset_config", None) else ""
        return out | {"hub": [run.dataset_name], "names": [f"{run.dataset_name}{config}"]}
    files = [f for f in (getattr(run, "train_file", None), getattr(run, "validation_file", None)) if f]
    return out | {"names": [os.path.basename(f) for f in files]}


def _rows(dataset) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # an iterable dataset
        return None


# ---- the card ----------------------------------------------------------------------------------------
def tags(facts: dict) -> list[str]:
    out = ["llmkd", facts["kind"]]
    for term in facts["terms"]:
        out += [f"knowledge:{term['knowledge']}", f"loss:{term['loss']}"]
    if facts["kind"] == "distillation":
        out.append(f"trainer:{facts['scheme'] or facts['trainer']}")
    return list(dict.fromkeys(out))


def card_data(facts: dict) -> ModelCardData:
    sources = ["local" if is_local(s) else s for s in facts["sources"] if is_local(s) or is_hub_id(s)]
    return ModelCardData(
        base_model=(sources[0] if len(sources) == 1 else sources) or None,
        library_name="transformers",
        pipeline_tag=pipeline(facts),
        tags=tags(facts),
        datasets=facts["data"].get("hub"),
        model_name=facts["name"],
        eval_results=eval_results(facts) or None,
    )


def eval_results(facts: dict) -> list[EvalResult]:
    """The student's metrics as model-index entries (dataset: the Hub id, else the local file's name)."""
    data = facts["data"]
    dataset = (data.get("hub") or [None])[0]
    names = data.get("names") or ["evaluation set"]
    common = {
        "task_type": pipeline(facts) or "text-classification",
        "dataset_type": dataset or "json",
    }
    out = []
    for split, values in student_metrics(facts).items():
        name = names[-1] if dataset is None else names[0]
        for metric, value in values.items():
            if isinstance(value, (int, float)):
                out.append(
                    EvalResult(
                        **common,
                        dataset_name=name,
                        dataset_split="validation" if split == "eval" else split,
                        metric_type=metric,
                        metric_value=number(value),
                    )
                )
    return out


def student_metrics(facts: dict) -> dict[str, dict]:
    """{split: {metric: value}}: the measured comparison's student column, else the trainer's eval metrics."""
    if facts.get("comparison"):
        out = {}
        for split, row in facts["comparison"].items():
            out[split] = dict(row["student"]) | (
                {"teacher_agreement": row["agreement"]} if "agreement" in row else {}
            )
        return out
    metrics = facts.get("student_eval") or {}
    skip = ("loss", "runtime", "per_second", "epoch", "distill/")
    values = {k.removeprefix("eval_"): v for k, v in metrics.items() if not any(s in k for s in skip)}
    return {"eval": values} if values else {}


def sections(facts: dict) -> dict:
    recipe = facts.get("recipe")
    return {
        "title": facts["name"],
        "summary": summary(facts),
        "evaluation": evaluation_section(facts, student_metrics(facts)),
        "training": training_section(facts),
        "recipe": recipe_section(recipe[0], recipe[1], without_secrets(recipe[2])) if recipe else "",
        "usage": usage(facts),
    }


def _source_text(name: str) -> str:
    if is_local(name):
        return f"the local folder `{os.path.basename(os.path.normpath(name))}` (`{name}`)"
    return f"[{name}](https://huggingface.co/{name})" if is_hub_id(name) else name


def summary(facts: dict) -> str:
    sources = ", ".join(_source_text(s) for s in facts["sources"])
    link = "llmkd"
    if facts["kind"] == "fine-tuning":
        return f"Fine-tuned by {link} from {sources}."
    terms = ", ".join(
        f"{t['knowledge']} / {t['loss']} (weight {number(t['weight'])})" for t in facts["terms"]
    )
    args = facts["args"]
    how = f"with {facts['trainer']}" + (f" on the terms {terms}" if terms else " on the labels only")
    hard = getattr(args, "hard_label_weight", None)
    extra = f", temperature {number(args.temperature)}" if hasattr(args, "temperature") else ""
    extra += f", hard-label weight {number(hard)}" if hard is not None else ""
    return f"A student distilled by {link} from {sources} {how}{extra}."


def pipeline(facts: dict) -> str | None:
    """The Hub pipeline tag of the student: its modality's for audio and image classifiers."""
    if facts.get("modality") in MODALITIES:
        return MODALITIES[facts["modality"]][0]
    return PIPELINES.get(facts["task"])


def usage(facts: dict) -> str:
    auto = "AutoModelForCausalLM" if facts["task"] == CAUSAL_LM else "AutoModelForSequenceClassification"
    processor, variable = "AutoTokenizer", "tokenizer"
    if facts.get("modality") in MODALITIES:
        _, auto, processor = MODALITIES[facts["modality"]]
        variable = "processor"
    return (
        f"```python\nfrom transformers import {auto}, {processor}\n\n"
        f'model = {auto}.from_pretrained("{facts["name"]}")  # this folder, or its Hub id once pushed\n'
        f'{variable} = {processor}.from_pretrained("{facts["name"]}")\n```'
    )
