"""Does the exported model predict what the PyTorch one does? Data for the check, and the agreement figures.

The check runs on the validation set when there is one (a file given to `llmkd export`, or the one recorded in
the checkpoint's llmkd_report.json), else on a fixed set of sentences. Inputs are tokenised and right-padded
exactly as `llmkd eval` does (`llmkd.evaluation.checkpoints.logits_for_texts`), so padded batches of mixed
lengths are part of what is compared.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np

from llmkd.content import file_sha256
from llmkd.evaluation.any_data import recorded_data  # noqa: F401  (re-exported: the report key is read there)

logger = logging.getLogger(__name__)

# Used when no validation data is known: short and long, questions, negations, non-ASCII, so that batches are
# padded and the tokenizer's unknown-token and accent paths are exercised.
SENTENCES = (
    "A gorgeous, witty, seductive movie.",
    "The plot is nothing but boilerplate clichés from start to finish.",
    "It's not a bad film, but it is not a good one either.",
    "Is this the best thing the director has made in a decade?",
    "An utterly charming and hilarious film that reminded me of my childhood, with a wonderful cast.",
    "Boring.",
    "I wanted to like it, and for the first hour I did; then the last act threw everything away.",
    "Naïve, tender and funny — a café romance that earns its tears.",
    "The effects are cheap, the acting is wooden and the script was clearly written in a weekend.",
    "Two hours of my life I will never get back.",
    "A masterpiece of quiet, patient storytelling.",
    "Neither as funny nor as clever as it thinks it is.",
    "What a ride!",
    "The soundtrack alone is worth the price of admission, even if the story drags in the middle.",
    "Ok.",
    "Visually stunning but emotionally empty, a film that mistakes spectacle for meaning and noise for wit.",
)
TEXT_COLUMNS = ("sentence", "text")  # tried in this order when no --text_columns is given
AGREEMENT_WARNING = 0.99  # a quantised model agreeing less than this with PyTorch gets a warning


@dataclass
class CheckData:
    """Texts to compare on: `columns` (one list of strings per text column; two for sentence pairs), gold
    `labels` in the model's logit order (-1 where unknown) or None, and `source` describing where they came from."""

    columns: list[list[str]]
    labels: np.ndarray | None = None
    source: dict = field(default_factory=dict)


def check_data(
    student_dir: str,
    config,
    validation_file: str | None = None,
    text_columns=None,
    label_column: str | None = None,
    max_samples: int | None = None,
) -> CheckData:
    """The examples to check the export on (see the module docstring for which). A given file that is missing or
    lacks the columns is an error (FileNotFoundError / ValueError naming the columns it has)."""
    recorded = {} if validation_file else recorded_data(student_dir)
    path = validation_file or recorded.get("validation_file")
    if path and not validation_file and not os.path.isfile(path):
        logger.warning("the recorded validation file %r is not here: checking on built-in sentences", path)
        path = None
    if not path:
        return CheckData([list(SENTENCES[:max_samples])], None, {"data": "built-in sentences"})
    from llmkd.data.loading import read_files

    dataset = read_files({"validation": path})["validation"]
    if max_samples:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    columns = _text_columns(text_columns or recorded.get("text_columns"), dataset.column_names, path)
    label_column = label_column or recorded.get("label_column") or "label"
    labels = None
    if label_column in dataset.column_names and config.num_labels > 1:
        labels = model_label_ids(dataset[label_column], config)
    source = {"data": os.path.abspath(path), "data_sha256": file_sha256(path), "text_columns": columns}
    return CheckData([[str(t) for t in dataset[c]] for c in columns], labels, source)


def _text_columns(wanted, available: list[str], path: str) -> list[str]:
    if wanted:
        wanted = [wanted] if isinstance(wanted, str) else list(wanted)
        missing = [c for c in wanted if c not in available]
        if missing:
            raise ValueError(
                f"{path}: text columns {missing} are not in the file, which has {available}; "
                "pass --text_columns with the right names"
            )
        return wanted
    for name in TEXT_COLUMNS:
        if name in available:
            return [name]
    raise ValueError(
        f"{path}: no text column given and none of {list(TEXT_COLUMNS)} in the file, which has {available}; "
        "pass --text_columns"
    )


def model_label_ids(values, config) -> np.ndarray:
    """Gold labels as the model's logit indices: names through config.label2id (any case), ids as they are;
    a name the model does not know is a ValueError."""
    from llmkd.data.glue import _label_key, model_label_names

    index = {_label_key(name): i for i, name in enumerate(model_label_names(config))}
    out = []
    for value in values:
        if isinstance(value, str) and not value.lstrip("-").isdigit():
            if _label_key(value) not in index:
                raise ValueError(f"label {value!r} is not one of the model's labels {sorted(index)}")
            value = index[_label_key(value)]
        out.append(int(value))
    return np.asarray(out, dtype=np.int64)


def compare(reference: np.ndarray, logits: np.ndarray, labels: np.ndarray | None) -> dict:
    """Top-1 agreement and max |logit difference| of `logits` (N, C) with `reference` (N, C); with gold labels
    (-1: unknown) the accuracy of both and the drop (reference - candidate, as a fraction)."""
    out = {"examples": int(len(reference)), "max_abs_logit_diff": float(np.max(np.abs(logits - reference)))}
    if reference.shape[-1] > 1:  # a regression score has no argmax
        out["agreement"] = float(np.mean(logits.argmax(-1) == reference.argmax(-1)))
    if labels is not None and reference.shape[-1] > 1 and (labels >= 0).any():
        known = labels >= 0
        accuracy = {
            n: float(np.mean(x[known].argmax(-1) == labels[known]))
            for n, x in (("ref", reference), ("new", logits))
        }
        out |= {
            "accuracy_pytorch": accuracy["ref"],
            "accuracy": accuracy["new"],
            "accuracy_drop": accuracy["ref"] - accuracy["new"],
        }
    return out


def check_fp32(figures: dict, atol: float, path: str) -> None:
    """Raises ExportMismatch when the float32 export's logits differ from PyTorch's by more than `atol`."""
    if figures["max_abs_logit_diff"] > atol:
        raise ExportMismatch(
            f"the ONNX model {path} disagrees with PyTorch: max |logit difference| "
            f"{figures['max_abs_logit_diff']:.3g} > tolerance {atol:g} on {figures['examples']} examples "
            f"(top-1 agreement {figures.get('agreement', float('nan')):.4f}); nothing was written. An operator "
            "may be traced for one input shape: report it with the model's architecture"
        )


def warn_quantised(figures: dict, name: str) -> str | None:
    """A warning (logged and returned) when a quantised model agrees with PyTorch on < 99% of examples."""
    agreement = figures.get("agreement")
    if agreement is None or agreement >= AGREEMENT_WARNING:
        return None
    message = (
        f"{name} agrees with PyTorch on only {100 * agreement:.1f}% of {figures['examples']} examples "
        f"(< {100 * AGREEMENT_WARNING:.0f}%): check its accuracy before deploying it"
    )
    logger.warning(message)
    return message


class ExportMismatch(ValueError):
    """The exported model's outputs are not the PyTorch model's."""
