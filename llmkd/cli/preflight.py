"""Checks a run passes before anything is trained: the output folder, the model folders, the counts, the data.

A bad input fails here with a ValueError / FileNotFoundError that names the value and the fix (the command line
prints it as one line and exits 2), before a model is trained and before any file of the output folder changes.

- `check_distill(run, args)` / `check_finetune(run, args)`: at the start of a job (llmkd.cli.pipeline).
- `check_split(run, split, data, task, model_config, columns, names)`: each split's texts and labels, before
  tokenising (llmkd.cli.pipeline.build_data).
- `refuse_finished_run(args)`: right before training, so that a finished run is never overwritten silently
  (transformers 5 has no `overwrite_output_dir`; its Trainer writes over whatever output_dir holds). It runs
  after every other check, so the message a user reads first is about their other bad inputs.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile

from llmkd.cli.paths import looks_local
from llmkd.content import TOKENIZER_CORE, has_tokenizer
from llmkd.modeling import CAUSAL_LM, SEQ_CLS

REPORT = "llmkd_report.json"  # llmkd.cli.pipeline.REPORT
FULL = (errno.ENOSPC, errno.EDQUOT)
PROCESSOR_FILE = "preprocessor_config.json"  # an audio feature extractor's or an image processor's settings
CLASSIFIERS = ("ForSequenceClassification", "ForAudioClassification", "ForImageClassification")
CHECKPOINT_FILES = ("llmkd_checkpoint.json", "trainer_state.json")  # what only a checkpoint-N folder holds


def _listdir(folder: str) -> list[str]:
    return os.listdir(folder) if os.path.isdir(folder) else []


def check_distill(run, args) -> None:
    """Output folder, training counts, teacher / student folders and their tasks and label counts."""
    check_output_dir(args.output_dir, _local_weights(run.student))
    check_counts(args)
    check_models(run)


def check_finetune(run, args) -> None:
    check_output_dir(args.output_dir, _local_weights(run.model))
    check_counts(args)
    check_model_folder("model", run.model)


# ---- the output folder ----------------------------------------------------------------------------------------


def check_output_dir(output_dir: str, needed_bytes: int = 0) -> None:
    """output_dir is (or can become) a folder we can write `needed_bytes` and more into; nothing is created.

    Raises ValueError for a file in its place, a read-only folder and a full disk."""
    path = os.path.abspath(output_dir)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(
            f"output_dir {output_dir!r}: {existing} is a file, not a folder; choose another output_dir or move "
            "the file away"
        )
    probe = None
    try:  # what a save does: create a file, write, flush to disk
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".llmkd-write-test-")
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        raise ValueError(_unwritable(output_dir, existing, err)) from err
    finally:
        if probe is not None and os.path.exists(probe):
            os.unlink(probe)
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise ValueError(
            f"output_dir {output_dir!r}: its disk has {free / 2**20:.1f} MiB free, but the student alone takes "
            f"{needed_bytes / 2**20:.1f} MiB; free some space or choose an output_dir on another disk"
        )


def _unwritable(output_dir: str, folder: str, err: OSError) -> str:
    if err.errno in FULL:
        return (
            f"output_dir {output_dir!r}: the disk holding {folder} is full ({err.strerror}); free some space or "
            "choose an output_dir on another disk"
        )
    return (
        f"output_dir {output_dir!r}: cannot write into {folder} ({err.strerror}: read-only or not yours); choose "
        "a folder you can write to (--output_dir PATH)"
    )


def _local_weights(name) -> int:
    """Bytes of the weight files of a local model folder (0 for a Hub id)."""
    if not isinstance(name, str) or not os.path.isdir(name):
        return 0
    weights = (".safetensors", ".bin", ".pt")
    return sum(e.stat().st_size for e in os.scandir(name) if e.is_file() and e.name.endswith(weights))


def refuse_finished_run(args) -> None:
    """A finished run (its llmkd_report.json) or an interrupted one (its checkpoint-N folders) in output_dir is
    not overwritten, unless the run resumes it; nor is a checkpoint folder used as an output_dir."""
    if args.resume_from_checkpoint:
        return
    if any(os.path.isfile(os.path.join(args.output_dir, name)) for name in CHECKPOINT_FILES):
        raise ValueError(
            f"output_dir {args.output_dir!r} is a checkpoint folder of another run; training would write over "
            "it. Choose a new output_dir"
        )
    interrupted = sorted(n for n in _listdir(args.output_dir) if n.startswith("checkpoint-"))
    if interrupted and not os.path.isfile(os.path.join(args.output_dir, REPORT)):
        raise ValueError(
            f"output_dir {args.output_dir!r} holds {', '.join(interrupted)} of an interrupted run; starting over "
            "would write over them. Resume it with --resume_from_checkpoint true (the last complete checkpoint), "
            "or choose a new output_dir, or delete the folder to start over"
        )
    path = os.path.join(args.output_dir, REPORT)
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as handle:
            report = json.load(handle)
        what = ", ".join(f"{k}: {report[k]}" for k in ("trainer", "teacher", "model") if k in report)
    except (OSError, ValueError, TypeError):
        what = "unreadable"
    raise ValueError(
        f"output_dir {args.output_dir!r} already holds a finished run ({REPORT}: {what or 'no details'}); "
        f"training would overwrite its model and report. Choose a new output_dir, or delete {args.output_dir} "
        "to train it again"
    )


# ---- counts ---------------------------------------------------------------------------------------------------


def check_counts(args) -> None:
    """Training counts transformers accepts but fails on later (or silently trains nothing with)."""
    for name in ("gradient_accumulation_steps", "per_device_train_batch_size", "per_device_eval_batch_size"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not args.learning_rate >= 0:
        raise ValueError(f"learning_rate must be a number >= 0, got {args.learning_rate!r}")
    if args.max_steps == 0 or args.max_steps < -1:
        raise ValueError(
            f"max_steps must be a positive number of optimizer steps, or -1 (the default) to train "
            f"num_train_epochs epochs; got {args.max_steps!r}"
        )
    if args.max_steps == -1 and not args.num_train_epochs > 0:
        raise ValueError(
            f"num_train_epochs must be > 0 (or set max_steps), got {args.num_train_epochs!r}: nothing would be trained"
        )


# ---- model folders --------------------------------------------------------------------------------------------


def check_models(run) -> None:
    """Teacher(s) and student exist with a config and a tokenizer; a student checkpoint's head suits the task."""
    cached_only = (
        getattr(run, "teacher_cache", None) and run.student is not None
    )  # the teacher is never loaded
    if not cached_only:
        check_model_folder("teacher", run.teacher)
    check_model_folder("student", run.student)
    for k, entry in enumerate(getattr(run, "teachers", None) or []):
        model = entry if isinstance(entry, str) else entry.get("model") if isinstance(entry, dict) else None
        check_model_folder(f"teachers[{k}]", model)
    teacher, student = _config(run.teacher), _config(run.student)
    if teacher is None or student is None or cached_only:
        return
    task = run.task or _head_task(teacher)
    head = _head_task(student)
    if task and head and head != task and run.task is None:
        fresh = "a fresh classification head" if task == SEQ_CLS else "a fresh language-model head"
        raise ValueError(
            f"the teacher {run.teacher} is a {task} model but the student {run.student} a {head} checkpoint "
            f"(architectures {student.architectures}); use a student of the teacher's task, or set task: {task} "
            f"to train {fresh} on it"
        )
    if task == SEQ_CLS and head == SEQ_CLS and student.num_labels != teacher.num_labels:
        raise ValueError(
            f"the student {run.student} predicts {student.num_labels} classes ({_names(student)}), the teacher "
            f"{run.teacher} {teacher.num_labels} ({_names(teacher)}); use a student with the teacher's classes, "
            "or build one from the teacher (student_layers / student_config instead of student)"
        )


def check_model_folder(role: str, name) -> None:
    """A local model folder has config.json and a tokenizer; a path that does not exist is named as such.

    Hub ids ('namespace/name') and `embedded:` models are left to their loaders."""
    if not isinstance(name, str) or name.startswith("embedded:"):
        return
    if not os.path.isdir(name):
        if looks_local(name):
            where = (
                ""
                if os.path.isabs(name)
                else f" (relative paths start at the working directory {os.getcwd()})"
            )
            raise FileNotFoundError(
                f"{role} {name!r} is not a folder{where}; give the folder of a saved model (config.json, weights, "
                "tokenizer) or a Hub id such as 'namespace/name'"
            )
        return
    if not os.path.isfile(os.path.join(name, "config.json")):
        raise FileNotFoundError(
            f"{role} {name!r} has no config.json, so it is not a saved model; save one with "
            "model.save_pretrained(FOLDER) and tokenizer.save_pretrained(FOLDER)"
        )
    if not has_tokenizer(name) and not os.path.isfile(os.path.join(name, PROCESSOR_FILE)):
        raise FileNotFoundError(
            f"{role} {name!r} has no tokenizer (none of {', '.join(TOKENIZER_CORE)}, ...) nor {PROCESSOR_FILE}: "
            "transformers would make a tokenizer that reads every word as unknown; save the model's tokenizer "
            "there with tokenizer.save_pretrained(FOLDER) (an audio or image model: its feature extractor or image "
            "processor, processor.save_pretrained(FOLDER))"
        )


def _config(name):
    """The config of a local model folder, else None (Hub ids are not fetched here)."""
    if not isinstance(name, str) or not os.path.isfile(os.path.join(name, "config.json")):
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError):  # an unknown or remote-code architecture: its loader will say
        return None


def _head_task(config) -> str | None:
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") for a in architectures):
        return CAUSAL_LM
    if any(a.endswith(CLASSIFIERS) for a in architectures):
        return SEQ_CLS
    return None


def _names(config) -> str:
    return (
        ", ".join(str(config.id2label[i]) for i in range(config.num_labels)) if config.id2label else "unnamed"
    )


# ---- data -----------------------------------------------------------------------------------------------------


def check_split(run, split: str, data, task: str, model_config, columns, names):
    """One split's texts (no missing or blank rows, the columns exist) and labels (in the model's label set:
    llmkd.data.loading.check_labels); returns the split with whole-number float labels as ids."""
    from llmkd.data.loading import check_labels, check_texts, missing_columns

    source = getattr(run, f"{split}_file", None) or getattr(run, "dataset_name", None) or run.glue_task
    where = f"{split} data ({source})" if source else f"{split} data"
    prompts = getattr(run, "prompt_column", None) or getattr(run, "trainer", None) == "on_policy"
    if not prompts:  # prompt/completion data is checked by its own tokenizer (tokenize_prompt_completion)
        check_texts(data, columns, task, where)
    label = run.label_column
    if task != SEQ_CLS or model_config is None or not label:
        return data
    if message := missing_columns(data, [label], where):
        raise ValueError(message)
    finetune = hasattr(run, "class_names")  # the plain Trainer's loss has no "unlabelled" rows
    return check_labels(data, label, model_config.num_labels, names, where, unlabelled=not finetune)
