"""GLUE task table, metrics against hand-computed values, local data loading and label alignment."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from datasets import Dataset, DatasetDict
from transformers import BertConfig, EvalPrediction

import llmkd.data.glue as glue
from llmkd.data.glue import (
    GLUE_TASKS,
    align_labels,
    load_glue,
    load_validation,
    remap_dataset_labels,
    resolve_tasks,
    to_dataset_order,
)
from llmkd.evaluation.metrics import compute_metrics, make_compute_metrics, task_score

# ------------------------------------------------------------------------------------------- task table

EXPECTED = {  # columns, num_labels, metrics: from the nyu-mll/glue dataset card and the GLUE paper
    "cola": (("sentence",), 2, ("matthews_correlation",)),
    "sst2": (("sentence",), 2, ("accuracy",)),
    "mrpc": (("sentence1", "sentence2"), 2, ("f1", "accuracy")),
    "stsb": (("sentence1", "sentence2"), 1, ("pearson", "spearmanr")),
    "qqp": (("question1", "question2"), 2, ("f1", "accuracy")),
    "mnli": (("premise", "hypothesis"), 3, ("accuracy",)),
    "qnli": (("question", "sentence"), 2, ("accuracy",)),
    "rte": (("sentence1", "sentence2"), 2, ("accuracy",)),
    "wnli": (("sentence1", "sentence2"), 2, ("accuracy",)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_task_table(name):
    task = GLUE_TASKS[name]
    columns, num_labels, metrics = EXPECTED[name]
    assert (task.name, task.text_columns, task.num_labels) == (name, columns, num_labels)
    assert set(task.metrics) == set(metrics) and task.main_metric in task.metrics
    assert task.is_regression == (name == "stsb")


def test_task_table_has_exactly_the_nine_tasks_and_hub_label_orders():
    assert set(GLUE_TASKS) == set(EXPECTED)
    assert GLUE_TASKS["mnli"].validation_splits == ("validation_matched", "validation_mismatched")
    assert all(t.validation_splits == ("validation",) for n, t in GLUE_TASKS.items() if n != "mnli")
    assert GLUE_TASKS["mnli"].label_names == ("entailment", "neutral", "contradiction")
    assert GLUE_TASKS["rte"].label_names == ("entailment", "not_entailment")
    assert GLUE_TASKS["wnli"].label_names == (
        "not_entailment",
        "entailment",
    )  # reversed w.r.t. RTE on the Hub
    assert GLUE_TASKS["cola"].label_names == ("unacceptable", "acceptable")


def test_unknown_task_is_an_error():
    with pytest.raises(ValueError, match="unknown GLUE task 'sst-2'.*sst2"):
        compute_metrics("sst-2", [0], [0])


# ---------------------------------------------------------------------------------------------- metrics


def one_hot(ids, classes=2):
    return np.eye(classes)[ids] * 3.0 - 1.0  # logits whose argmax is `ids`


def test_matthews_correlation_by_hand():
    labels = [1, 1, 1, 0, 0, 0, 1, 0]
    preds = [1, 1, 0, 0, 0, 1, 1, 0]
    tp, tn, fp, fn = 3, 3, 1, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert mcc == 0.5
    assert compute_metrics("cola", one_hot(preds), labels) == pytest.approx({"matthews_correlation": mcc})


def test_f1_and_accuracy_by_hand():
    labels = [1, 1, 1, 1, 0, 0]
    preds = [1, 1, 0, 0, 1, 0]
    precision, recall = 2 / 3, 2 / 4  # TP=2, FP=1, FN=2
    f1 = 2 * precision * recall / (precision + recall)
    out = compute_metrics("mrpc", one_hot(preds), labels)
    assert out == pytest.approx({"f1": 4 / 7, "accuracy": 3 / 6}) and f1 == pytest.approx(4 / 7)
    assert task_score("mrpc", out) == pytest.approx((4 / 7 + 0.5) / 2)  # GLUE averages F1 and accuracy


def test_accuracy_uses_argmax_of_logits_and_accepts_class_ids():
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.3, 0.2], [-5.0, 5.0]])
    labels = [1, 0, 1, 1]
    assert compute_metrics("sst2", logits, labels) == {"accuracy": 0.75}
    assert compute_metrics("sst2", np.array([1, 0, 0, 1]), labels) == {"accuracy": 0.75}
    three = one_hot([0, 1, 2, 2], classes=3)
    assert compute_metrics("mnli", three, [0, 1, 1, 2]) == {"accuracy": 0.75}


def test_pearson_and_spearman_by_formula():
    scores = np.array([[0.5], [2.0], [1.0], [4.0]])  # (N, 1) as a regression head returns them
    labels = np.array([1.0, 2.0, 3.0, 4.0])
    x, y = scores[:, 0] - scores.mean(), labels - labels.mean()
    pearson = float(x @ y / np.sqrt((x @ x) * (y @ y)))
    d = np.array([1, 3, 2, 4]) - np.array([1, 2, 3, 4])  # rank differences
    spearman = 1 - 6 * (d**2).sum() / (4 * (4**2 - 1))
    assert spearman == 0.8 and pearson == pytest.approx(4.75 / math.sqrt(7.1875 * 5))
    assert compute_metrics("stsb", scores, labels) == pytest.approx(
        {"pearson": pearson, "spearmanr": spearman}
    )
    assert compute_metrics("stsb", scores[:, 0], labels) == pytest.approx(
        {"pearson": pearson, "spearmanr": 0.8}
    )


def test_make_compute_metrics_takes_eval_predictions_and_tuples():
    fn = make_compute_metrics("mrpc")
    logits, labels = one_hot([1, 1, 0, 0, 1, 0]), np.array([1, 1, 1, 1, 0, 0])
    expected = {"f1": pytest.approx(4 / 7), "accuracy": 0.5}
    assert fn(EvalPrediction(predictions=logits, label_ids=labels)) == expected
    hidden = np.zeros((6, 3, 4))
    assert fn(EvalPrediction(predictions=(logits, hidden), label_ids=labels)) == expected


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        compute_metrics("sst2", one_hot([0, 1, 1]), [0, 1])


# ------------------------------------------------------------------------------------------------- data


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_load_glue_from_csv_with_string_labels(tmp_path):
    (tmp_path / "train.csv").write_text("sentence,label\nw1 w2,positive\nw3,Negative\nw4 w5,1\n")
    (tmp_path / "validation.csv").write_text("sentence,label,idx\nw6,negative,0\nw7 w8,POSITIVE,1\n")
    data = load_glue("sst2", data_dir=str(tmp_path))
    assert set(data) == {"train", "validation"}
    assert data["train"]["label"] == [1, 0, 1] and data["validation"]["label"] == [0, 1]
    assert data["validation"]["sentence"] == ["w6", "w7 w8"] and data["validation"]["idx"] == [0, 1]


def test_load_glue_from_unquoted_tsv_pairs(tmp_path):
    rows = ["sentence1\tsentence2\tlabel", '" yes , he said\tno " here\t1', "w1 w2\tw3\t0"]
    for split in ("train", "validation"):
        (tmp_path / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    data = load_glue("mrpc", data_dir=str(tmp_path))
    assert data["validation"]["sentence1"] == ['" yes , he said', "w1 w2"]  # the quote is text, not quoting
    assert data["validation"]["sentence2"] == ['no " here', "w3"] and data["validation"]["label"] == [1, 0]


def test_load_glue_mnli_two_validation_files_jsonl(tmp_path):
    def rows(labels):
        return [{"premise": f"w{i}", "hypothesis": "w0", "label": y} for i, y in enumerate(labels)]

    write_jsonl(tmp_path / "train.jsonl", rows(["entailment", "neutral", "contradiction"]))
    write_jsonl(tmp_path / "validation_matched.jsonl", rows(["contradiction", "entailment"]))
    write_jsonl(tmp_path / "validation_mismatched.jsonl", rows([1, 1, 2]))
    data = load_glue("mnli", data_dir=str(tmp_path))
    assert set(data) == {"train", "validation_matched", "validation_mismatched"}
    assert data["train"]["label"] == [0, 1, 2] and data["validation_matched"]["label"] == [2, 0]
    assert data["validation_mismatched"]["label"] == [1, 1, 2]
    only = load_glue(
        "mnli",
        data_files={"validation_matched": str(tmp_path / "validation_matched.jsonl")},
        splits=["validation_matched"],
    )
    assert list(only) == ["validation_matched"]


def test_load_glue_errors(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\nw1,1\n")
    (tmp_path / "validation.csv").write_text("text,label\nw1,1\n")
    with pytest.raises(
        ValueError, match=r"columns \['sentence'\] are missing; the data has \['text', 'label'\]"
    ):
        load_glue("sst2", data_dir=str(tmp_path))
    (tmp_path / "train.csv").write_text("sentence,label\nw1,great\n")
    with pytest.raises(ValueError, match="'great' is not one of"):
        load_glue("sst2", data_files={"train": str(tmp_path / "train.csv")}, splits=["train"])
    with pytest.raises(FileNotFoundError, match="no validation_matched file"):
        load_glue("mnli", data_dir=str(tmp_path))


def test_load_glue_without_local_files_asks_the_hub(monkeypatch):
    calls = []
    fake = DatasetDict(
        {s: Dataset.from_dict({"sentence": ["w1"], "label": [1]}) for s in ("train", "validation", "test")}
    )
    monkeypatch.setattr(glue, "load_dataset", lambda *args, **kw: calls.append(args) or fake)
    data = load_glue("sst2")
    assert calls == [("nyu-mll/glue", "sst2")] and set(data) == {"train", "validation"}


def test_task_lists_and_one_folder_per_task(tmp_path):
    assert sorted(resolve_tasks("all")) == sorted(EXPECTED) and resolve_tasks("sst2, mrpc") == [
        "sst2",
        "mrpc",
    ]
    with pytest.raises(ValueError, match="unknown GLUE task 'glue'"):
        resolve_tasks(["sst2", "glue"])
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "validation.csv").write_text(
        "sentence,label\nw1,positive\nw2,negative\nw3,positive\n"
    )
    (tmp_path / "validation.csv").write_text(
        "sentence,label\nw9,acceptable\n"
    )  # used when there is no <task>/
    assert load_validation("sst2", data_dir=str(tmp_path), max_eval_samples=2)["validation"]["label"] == [
        1,
        0,
    ]
    assert load_validation("cola", data_dir=str(tmp_path))["validation"]["sentence"] == ["w9"]
    with pytest.raises(ValueError, match="but not \\['validation_mismatched'\\]"):
        load_validation(
            "mnli",
            DatasetDict(validation_matched=Dataset.from_dict({"premise": [], "hypothesis": [], "label": []})),
        )


# ---------------------------------------------------------------------------------------- label alignment

MNLI = ["entailment", "neutral", "contradiction"]


def config_with(names):
    return BertConfig(
        num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
    )


def test_alignment_identity_and_case():
    assert align_labels("mnli", config_with(MNLI)) is None
    assert align_labels("rte", config_with(["ENTAILMENT", "NOT ENTAILMENT"])) is None
    assert align_labels(["negative", "positive"], config_with(["Negative", "Positive"])) is None


def test_alignment_generic_names_are_accepted_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="llmkd.data.glue"):
        assert align_labels("mnli", BertConfig(num_labels=3)) is None
    assert "cannot be checked" in caplog.text


def test_alignment_remaps_a_swapped_order_and_accuracy_collapses_without_it():
    model_order = ["contradiction", "entailment", "neutral"]  # e.g. roberta-large-mnli-style ordering
    mapping = align_labels("mnli", config_with(model_order))
    assert mapping == {0: 1, 1: 2, 2: 0}  # dataset id -> model logit index
    labels = np.array([0, 1, 2, 0, 1, 2, 2, 0])
    # A model that is right every time, in its own label order.
    model_logits = one_hot(np.array([mapping[y] for y in labels]), classes=3)
    assert compute_metrics("mnli", model_logits, labels)["accuracy"] == 0.0  # negative control: no remap
    assert compute_metrics("mnli", to_dataset_order(model_logits, mapping), labels)["accuracy"] == 1.0
    dataset = remap_dataset_labels(Dataset.from_dict({"label": labels.tolist() + [-1]}), mapping)
    assert dataset["label"] == [mapping[y] for y in labels] + [-1]
    assert compute_metrics("mnli", model_logits, dataset["label"][:-1])["accuracy"] == 1.0


def test_alignment_errors_name_both_label_maps():
    with pytest.raises(
        ValueError, match=r"model's labels are \{0: 'negative', 1: 'positive'\}.*entailment.*fine-tuned"
    ):
        align_labels("rte", config_with(["negative", "positive"]))
    with pytest.raises(ValueError, match="num_labels=2.*the data has 3"):
        align_labels("mnli", config_with(["negative", "positive"]))
    with pytest.raises(ValueError, match="num_labels=2.*the data has 1"):
        align_labels("stsb", BertConfig(num_labels=2))
    assert align_labels("stsb", BertConfig(num_labels=1)) is None
