"""`llmkd eval --validation_file`: any classification file (columns and labels from flags, records or the data)
and the 95% bootstrap intervals of every score and every difference to the teacher (paired)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import BertForSequenceClassification, sentences
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from test_evaluation import SST2, classifier, one_by_one, save

import llmkd.evaluation.checkpoints as checkpoints_module
from llmkd.cli.eval import main
from llmkd.evaluation.any_data import evaluate_file, load_data_file, recorded_file
from llmkd.evaluation.checkpoints import evaluate_checkpoints
from llmkd.evaluation.intervals import (
    add_intervals,
    percentile_interval,
    replicate_scores,
    resample_indices,
)
from llmkd.evaluation.report import markdown_table

QUICK = {"speed_repeats": 0, "bootstrap": 200}
REFERENCE_METRICS = {  # the independent reference: scikit-learn / scipy on each resample, in a Python loop
    "accuracy": lambda p, y: accuracy_score(y, p),
    "f1": lambda p, y: f1_score(y, p),
    "macro_f1": lambda p, y: f1_score(y, p, average="macro"),
    "matthews_correlation": lambda p, y: matthews_corrcoef(y, p),
    "pearson": lambda p, y: pearsonr(p, y)[0],
    "spearmanr": lambda p, y: spearmanr(p, y)[0],
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    return {
        "teacher": save(classifier(0), folder / "teacher"),
        "student": save(classifier(1, small=True), folder / "student"),
    }


@pytest.fixture(scope="module")
def data(models, tmp_path_factory):
    """60 texts whose gold labels are the teacher's predictions with every 5th flipped (teacher accuracy 0.8,
    so reading the labels in the wrong order would give 0.2); the first row's label is "positive" (id 1)."""
    texts = sentences(60, seed=5)
    gold = one_by_one(models["teacher"], texts)
    gold = np.where(np.arange(60) % 5 == 4, 1 - gold, gold)
    first = int(np.argmax(gold == 1))
    order = [first, *(i for i in range(60) if i != first)]
    texts, gold = [texts[i] for i in order], gold[order]
    return texts, gold, tmp_path_factory.mktemp("data")


def write_csv(path, columns: dict) -> str:
    names = list(columns)
    lines = [",".join(names)] + [",".join(str(v) for v in row) for row in zip(*columns.values())]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_string_labels_in_any_order_score_like_ids(models, data, tmp_path):
    texts, gold, _ = data
    names = write_csv(tmp_path / "dev.csv", {"text": texts, "label": [SST2[int(y)].upper() for y in gold]})
    ids = tmp_path / "dev_ids.jsonl"
    ids.write_text("".join(json.dumps({"sentence": t, "label": int(y)}) + "\n" for t, y in zip(texts, gold)))
    by_name = evaluate_file(models, names, **QUICK)
    by_id = evaluate_file(models, str(ids), **QUICK)
    for name, path in models.items():
        predicted = one_by_one(path, texts)
        expected = {
            "accuracy": accuracy_score(gold, predicted),
            "macro_f1": f1_score(gold, predicted, average="macro"),
        }
        assert by_name["models"][name]["metrics"]["dev"]["validation"] == pytest.approx(expected)
        assert by_id["models"][name]["metrics"]["dev_ids"]["validation"] == pytest.approx(expected)
    # 0.8, not 0.2: the names were matched to the model's, not numbered in the order they first occur
    assert by_name["models"]["teacher"]["score"] == pytest.approx(0.8)
    student = by_name["models"]["student"]
    assert student["score"] == student["metrics"]["dev"]["validation"]["accuracy"]  # the score is accuracy
    assert student["intervals"]["score"] == student["intervals"]["metrics"]["dev"]["validation"]["accuracy"]
    assert by_name["data"]["label_names"] == ["negative", "positive"]
    assert by_name["data"]["columns_from"] == "text: guessed; label: guessed"
    # A student with the classes in the other order (head rows swapped too) predicts the same classes.
    teacher = BertForSequenceClassification.from_pretrained(models["teacher"])
    swapped = classifier(0, names={0: "positive", 1: "negative"})
    swapped.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        swapped.classifier.weight.copy_(teacher.classifier.weight.flip(0))
        swapped.classifier.bias.copy_(teacher.classifier.bias.flip(0))
    runs = {"teacher": models["teacher"], "swapped": save(swapped, tmp_path / "swapped")}
    result = evaluate_file(runs, names, **QUICK)["models"]
    assert result["swapped"]["metrics"] == result["teacher"]["metrics"]
    assert result["swapped"]["vs_reference"]["score"] == 0.0
    assert result["swapped"]["vs_reference"]["intervals"]["score"] == [
        0.0,
        0.0,
    ]  # paired: identical predictions


def test_columns_from_the_recorded_report_else_flags_else_a_clear_error(models, data, tmp_path, capsys):
    texts, gold, _ = data
    columns = {"review": texts, "title": [t[:5] for t in texts], "sentiment": gold.tolist()}
    path = write_csv(tmp_path / "reviews.csv", columns)
    with pytest.raises(
        ValueError,
        match=r"cannot tell the label column.*review \(text\), title \(text\), sentiment \(int64\).*--label_column",
    ):
        load_data_file(path, models)
    with pytest.raises(
        ValueError, match=r"the text columns \['review', 'title'\] could each.*--text_columns"
    ):
        load_data_file(path, models, label_column="sentiment")
    spec, dataset, record = load_data_file(path, models, ["review"], "sentiment")
    assert spec.text_columns == ("review",) and dataset["validation"]["label"] == gold.tolist()
    assert record["columns_from"] == "text: --text_columns; label: --label_column"
    with pytest.raises(ValueError, match=r"'sentimnt' \(did you mean 'sentiment'\?\)"):
        load_data_file(path, models, ["review"], "sentimnt")
    # What llmkd recorded when it trained the checkpoints (llmkd.cli.pipeline.data_record)
    recorded = {
        "validation_file": path,
        "text_columns": ["review"],
        "label_column": "sentiment",
        "max_length": 32,
    }
    runs = {}
    for name, folder in models.items():
        copy = tmp_path / name
        save(BertForSequenceClassification.from_pretrained(folder), copy)
        (copy / "llmkd_report.json").write_text(json.dumps({"data": recorded}))
        runs[name] = str(copy)
    assert recorded_file(runs) == path  # `llmkd eval` with no data flags evaluates on it
    assert main(["--checkpoints", *(f"{k}={v}" for k, v in runs.items()), "--speed_repeats", "0"]) == 0
    assert capsys.readouterr().out.startswith("# llmkd eval: reviews.csv")
    results = evaluate_file(runs, path, **QUICK)
    assert (
        results["data"]["columns_from"]
        == "text: recorded by teacher, student; label: recorded by teacher, student"
    )
    assert results["models"]["teacher"]["score"] == pytest.approx(0.8)
    (tmp_path / "student" / "llmkd_report.json").write_text(
        json.dumps({"data": recorded | {"text_columns": "title"}})
    )
    with pytest.raises(
        ValueError, match=r"recorded different text_columns.*teacher: \['review'\].*--text_columns"
    ):
        load_data_file(path, runs)


def test_a_label_a_checkpoint_lacks_fails_before_any_evaluation(models, data, tmp_path, monkeypatch):
    texts, gold, _ = data
    labels = [SST2[int(y)] for y in gold]
    labels[7] = "neutral"
    path = write_csv(tmp_path / "three.csv", {"text": texts, "label": labels})

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was loaded before the data was checked")

    monkeypatch.setattr(checkpoints_module, "load_checkpoint", refuse)
    with pytest.raises(
        ValueError, match=r"labels \['neutral'\] \(1 of 60 rows\) are not classes of checkpoint 'teacher'"
    ):
        evaluate_file(models, path, **QUICK)
    nli = save(classifier(0, names={0: "entailment", 1: "neutral", 2: "contradiction"}), tmp_path / "nli")
    ok = write_csv(tmp_path / "two.csv", {"text": texts, "label": [SST2[int(y)] for y in gold]})
    with pytest.raises(ValueError, match=r"\['negative', 'positive'\].*not classes of checkpoint 'nli'"):
        evaluate_file(models | {"nli": nli}, ok, **QUICK)
    with pytest.raises(ValueError, match=r"labels 2 \(1 of 60 rows\) are not in the model's label set"):
        evaluate_file(
            models, write_csv(tmp_path / "ids.csv", {"text": texts, "label": [*gold[:-1], 2]}), **QUICK
        )
    unnamed = save(classifier(0, names={0: "LABEL_0", 1: "LABEL_1"}), tmp_path / "unnamed")
    with pytest.raises(ValueError, match=r"checkpoint 'teacher'.*no class names: set its config.id2label"):
        evaluate_file({"teacher": unnamed}, ok, **QUICK)


@pytest.mark.parametrize("metric", sorted(REFERENCE_METRICS))
def test_bootstrap_replicates_and_interval_equal_a_float64_loop(metric):
    rng = np.random.default_rng(3)
    n, resamples, seed = 45, 300, 11
    if metric in ("pearson", "spearmanr"):
        gold = rng.integers(0, 6, n) / 2.0  # ties, as in STS-B's half-point scores
        predicted = gold + rng.normal(0, 1.0, n)
    else:
        classes = 2 if metric == "f1" else 3
        gold = rng.integers(0, classes, n)
        predicted = np.where(rng.random(n) < 0.7, gold, rng.integers(0, classes, n))
    loop = []
    for r in range(resamples):
        index = np.random.default_rng((seed, 0, r)).integers(0, n, n)
        loop.append(float(REFERENCE_METRICS[metric](predicted[index], gold[index])))
    vectorised = replicate_scores(metric, predicted, gold, resample_indices(n, resamples, seed))
    np.testing.assert_allclose(vectorised, loop, rtol=0, atol=1e-12)
    assert percentile_interval(vectorised) == pytest.approx(list(np.percentile(loop, [2.5, 97.5])), abs=1e-12)
    chunked = np.concatenate([resample_indices(n, 100, seed, 0, start) for start in (0, 100, 200)])
    assert np.array_equal(chunked, resample_indices(n, resamples, seed))  # rows do not depend on chunking


def _accuracy_interval(correct: np.ndarray, resamples: int = 1000, seed: int = 0):
    predicted = correct.astype(int)
    return percentile_interval(
        replicate_scores(
            "accuracy", predicted, np.ones_like(predicted), resample_indices(len(correct), resamples, seed)
        )
    )


def test_accuracy_interval_matches_wilson_and_shrinks_with_n():
    correct = np.arange(400) % 5 != 0  # accuracy 0.8
    low, high = _accuracy_interval(correct)
    # Wilson score interval by hand: (p + z²/2n ± z·sqrt(p(1−p)/n + z²/4n²)) / (1 + z²/n)
    p, n, z = 0.8, 400, 1.959964
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    wilson = ((centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n))
    assert low < 0.8 < high
    assert low == pytest.approx(wilson[0], abs=0.01) and high == pytest.approx(wilson[1], abs=0.01)
    low4, high4 = _accuracy_interval(np.tile(correct, 4))  # the same data 4×: the width halves (1/sqrt(n))
    assert low4 < 0.8 < high4 and (high4 - low4) / (high - low) == pytest.approx(0.5, abs=0.08)


def test_interval_coverage_on_simulated_data():
    rng, covered = np.random.default_rng(0), 0
    for trial in range(150):
        correct = rng.random(150) < 0.7
        low, high = _accuracy_interval(correct, resamples=200, seed=trial)
        covered += low <= 0.7 <= high
    assert 0.88 <= covered / 150 <= 0.995  # nominal 0.95


def test_paired_difference_is_narrower_than_unpaired_for_correlated_models():
    rng, n = np.random.default_rng(1), 300
    gold = rng.integers(0, 2, n)
    teacher = np.where(rng.random(n) < 0.8, gold, 1 - gold)
    student = np.where(rng.random(n) < 0.04, 1 - teacher, teacher)  # differs from the teacher on 4% of rows
    independent = np.where(rng.random(n) < 0.78, gold, 1 - gold)  # errs on its own rows: the control

    def widths(other):
        models = {
            "teacher": {
                "score": accuracy_score(gold, teacher),
                "task_scores": {"t": accuracy_score(gold, teacher)},
            },
            "other": {
                "score": accuracy_score(gold, other),
                "task_scores": {"t": accuracy_score(gold, other)},
            },
        }
        predictions = {"teacher": {"t": teacher}, "other": {"t": other}}
        add_intervals(
            models, predictions, {"t": {"validation": gold}}, {"t": ["accuracy"]}, "teacher", 1000, 0
        )
        low, high = models["other"]["vs_reference"]["intervals"]["score"]
        assert low <= models["other"]["vs_reference"]["score"] <= high
        # Unpaired: each model on its own resamples (another seed), the replicates subtracted.
        own = [
            replicate_scores("accuracy", p, gold, resample_indices(n, 1000, seed))
            for p, seed in ((teacher, 0), (other, 1))
        ]
        unpaired = percentile_interval(own[1] - own[0])
        return high - low, unpaired[1] - unpaired[0]

    paired, unpaired = widths(student)
    assert paired < 0.4 * unpaired
    paired, unpaired = widths(independent)  # nothing shared: pairing gains little
    assert paired > 0.7 * unpaired


def test_task_and_macro_intervals_average_splits_and_tasks_replicate_by_replicate():
    rng = np.random.default_rng(2)
    gold = {
        "mnli": {"m": rng.integers(0, 3, 40), "mm": rng.integers(0, 3, 30)},
        "mrpc": {"v": rng.integers(0, 2, 50)},
    }
    predicted = {
        t: np.concatenate([np.where(rng.random(len(y)) < 0.6, y, 0) for y in s.values()])
        for t, s in gold.items()
    }
    metrics = {"mnli": ["accuracy"], "mrpc": ["f1", "accuracy"]}
    entry = {"score": 0.0, "task_scores": {"mnli": 0.0, "mrpc": 0.0}}
    add_intervals({"a": entry}, {"a": predicted}, gold, metrics, None, 200, 5)
    # By hand: streams numbered over (task, split) in order; a task averages metrics then splits; macro the tasks.
    m = replicate_scores(
        "accuracy", predicted["mnli"][:40], gold["mnli"]["m"], resample_indices(40, 200, 5, 0)
    )
    mm = replicate_scores(
        "accuracy", predicted["mnli"][40:], gold["mnli"]["mm"], resample_indices(30, 200, 5, 1)
    )
    index = resample_indices(50, 200, 5, 2)
    f1, accuracy = (
        replicate_scores(k, predicted["mrpc"], gold["mrpc"]["v"], index) for k in ("f1", "accuracy")
    )
    assert entry["intervals"]["task_scores"]["mnli"] == pytest.approx(percentile_interval((m + mm) / 2))
    assert entry["intervals"]["score"] == pytest.approx(
        percentile_interval(((m + mm) / 2 + (f1 + accuracy) / 2) / 2)
    )
    assert "vs_reference" not in entry


def test_glue_numbers_unchanged_intervals_added_and_reported(models, data, tmp_path):
    texts, gold, _ = data
    folder = tmp_path / "sst2"
    folder.mkdir()
    (folder / "validation.jsonl").write_text(
        "".join(json.dumps({"sentence": t, "label": int(y)}) + "\n" for t, y in zip(texts, gold))
    )
    plain = evaluate_checkpoints(models, "sst2", data_dir=str(folder), speed_repeats=0, bootstrap=0)
    with_ci = evaluate_checkpoints(models, "sst2", data_dir=str(folder), speed_repeats=0, bootstrap=300)
    assert plain["intervals"] is None and "intervals" not in plain["models"]["student"]
    for name in models:
        old, new = plain["models"][name], with_ci["models"][name]
        assert {k: new[k] for k in old} == old  # the old fields, the same numbers
    student = with_ci["models"]["student"]
    low, high = student["intervals"]["metrics"]["sst2"]["validation"]["accuracy"]
    assert low <= student["score"] <= high and student["intervals"]["score"] == [low, high]
    delta = student["vs_reference"]
    assert delta["score"] == pytest.approx(student["score"] - with_ci["models"]["teacher"]["score"])
    table = markdown_table(with_ci, "t")
    assert "| model | params | sst2 (acc) | macro | Δ vs teacher | % of teacher |" in table
    row = next(line for line in table.splitlines() if line.startswith("| student |"))

    def points(v):
        return f"{100 * v:.1f}".replace("-", "\u2212")

    assert f"| {points(student['score'])} ({points(low)}–{points(high)}) |" in row
    d_low, d_high = delta["intervals"]["score"]
    sign = "+" if delta["score"] > 0 else ""
    assert f"| {sign}{points(delta['score'])} ({points(d_low)}–{points(d_high)}) |" in row
    teacher_row = next(line for line in table.splitlines() if line.startswith("| teacher |"))
    assert teacher_row.split(" | ")[4] == "–"  # the reference has no difference to itself
    assert "95% intervals, percentile bootstrap" in table


def test_regression_checkpoint_on_a_file_gets_pearson_and_spearman(data, tmp_path):
    texts, _, _ = data
    scores = [round(len(t) / 10, 1) for t in texts]
    path = write_csv(tmp_path / "sts.csv", {"sentence": texts, "score": scores})
    regressor = save(classifier(0, names={0: "LABEL_0"}), tmp_path / "reg")
    results = evaluate_file({"teacher": regressor}, path, label_column="score", **QUICK)
    entry = results["models"]["teacher"]
    assert set(entry["metrics"]["sts"]["validation"]) == {"pearson", "spearmanr"} and entry["agreement"] == {}
    assert results["data"]["label_names"] == [] and "sts (P/S)" in markdown_table(results, "t")
    low, high = entry["intervals"]["score"]
    assert low <= entry["score"] <= high
    assert entry["score"] == pytest.approx(np.mean(list(entry["metrics"]["sts"]["validation"].values())))
    with pytest.raises(
        ValueError, match=r"\['teacher'\] are regression models .* but \['cls'\] are classifiers"
    ):
        evaluate_file(
            {"teacher": regressor, "cls": save(classifier(1), tmp_path / "c")}, path, label_column="score"
        )


def test_command_line_end_to_end(models, data, tmp_path, capsys):
    texts, gold, _ = data
    path = write_csv(
        tmp_path / "mine.csv", {"body": texts, "topic": [SST2[int(y)] for y in gold], "id": list(range(60))}
    )
    args = ["--validation_file", path, "--checkpoints", *(f"{k}={v}" for k, v in models.items())]
    args += [
        "--text_columns",
        "body",
        "--label_column",
        "topic",
        "--speed_repeats",
        "0",
        "--bootstrap",
        "200",
    ]
    assert main([*args, "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# llmkd eval: mine.csv") and "| mine (acc/macro-F1) |" in printed
    assert "Δ vs teacher" in printed and "Data: " in printed and "text: --text_columns" in printed
    payload = json.loads((tmp_path / "report" / "report.json").read_text())
    assert payload["data"]["label_column"] == "topic" and payload["intervals"]["resamples"] == 200
    assert payload["models"]["teacher"]["score"] == pytest.approx(0.8)
    assert len(payload["models"]["student"]["vs_reference"]["intervals"]["score"]) == 2
    for bad, message in (
        (["--task", "sst2"], "--validation_file replaces --task"),
        (["--text_columns", "a", "b", "c"], "one column or two"),
        (["--bootstrap", "-1"], "--bootstrap takes"),
    ):
        with pytest.raises(SystemExit):
            main([*args, *bad])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args[2:], "--task", "sst2"])  # columns with a GLUE task
    assert "go with --validation_file" in capsys.readouterr().err
    with pytest.raises(
        ValueError, match="the checkpoints recorded no validation file: pass --validation_file"
    ):
        main(args[2:])
