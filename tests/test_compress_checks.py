"""`llmkd compress`'s first stage: the data checks (check_data) and the teacher check (check_teacher).

Each problem a user's data can have gives its error or warning with its numbers (compared with counts the test
makes itself), and a clean dataset gives none (the negative control). Teachers: a trained tiny classifier passes
with the accuracy of its own forward pass, a random one is refused, a base encoder is flagged for fine-tuning.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import WORDS, bert_config, make_tokenizer
from datasets import Dataset
from transformers import BertForSequenceClassification, BertModel

from llmkd.compress.checks import check_data, drop_overlap, normalise
from llmkd.compress.profile import recommend_max_length, wilson_half_width
from llmkd.compress.teacher_checks import check_teacher

NOISE = WORDS[10:]


def toy(n: int, seed: int, labels=None, words: int = 5) -> Dataset:
    """n rows of random words; the class (0 or 1 unless `labels` says) is told by one word, w1 or w2."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n).tolist() if labels is None else list(labels)
    texts = []
    for y in labels:
        row = list(rng.choice(NOISE, words))
        row.insert(int(rng.integers(0, words + 1)), WORDS[1 + int(y) % 3])
        texts.append(" ".join(row))
    return Dataset.from_dict({"text": texts, "label": labels})


def balanced(n: int, seed: int) -> Dataset:
    return toy(n, seed, np.random.default_rng(seed).permutation(np.arange(n) % 2))


@pytest.fixture(scope="module")
def clean():
    return balanced(800, 0), balanced(800, 1)


def test_clean_data_gives_no_error_and_no_warning(clean):
    """The negative control: every check runs (its info is there) and none complains."""
    train, validation = clean
    report = check_data(train, validation, tokenizer=make_tokenizer(), max_length=32)
    assert report.errors == [] and report.warnings == []
    assert {"majority_baseline", "overlap", "lengths", "precision"} <= report.codes("info")
    assert report.stats["order"]["sorted"] is False
    assert report.stats["majority"]["baseline_accuracy"] == pytest.approx(0.5)
    report.raise_errors()  # nothing to raise
    json.dumps(report.to_dict())
    assert "| 0 | 400 (50.0%) | 400 (50.0%) |" in report.markdown()


def test_missing_label_column_is_an_error_naming_the_columns(clean):
    train, validation = clean
    report = check_data(train, validation, label_column="labels")
    assert report.codes("error") == {"columns"}
    with pytest.raises(ValueError, match=r"'labels' \(did you mean 'label'\?\)"):
        report.raise_errors()
    # Not given and not guessable either: the guess says why and how to name it.
    unlabelled = check_data(train.remove_columns("label"), validation)
    assert "pass --label_column NAME" in str(unlabelled.errors[0])
    # Present in train, missing from validation.
    report = check_data(train, validation.remove_columns("label"))
    assert "validation data: column 'label'" in str(report.errors[0])


def test_one_class_only_is_an_error_with_its_fix(clean):
    _, validation = clean
    train = toy(300, 2, [1] * 300)
    report = check_data(train, validation)
    assert "one_class" in report.codes("error")
    message = str(next(e for e in report.errors if e.code == "one_class"))
    assert "every one of its 300 rows has label '1'" in message and "at least two classes" in message
    # The validation class that train lacks is reported too, and ONE ValueError lists both errors.
    assert "class_only_in_validation" in report.codes("error")
    with pytest.raises(ValueError, match="2 problems") as raised:
        report.raise_errors()
    assert "one class only" in str(raised.value) and "never in train" in str(raised.value)


@pytest.mark.parametrize("copied, level", [(0, None), (3, "warning"), (60, "error"), (800, "error")])
def test_overlapping_splits_counted_after_case_and_space_normalisation(clean, copied, level):
    train, validation = clean
    rows = validation.to_dict()
    for i in range(copied):  # a train text written in upper case and with extra spaces
        rows["text"][i] = "  " + train[i]["text"].upper().replace(" ", "   ")
    validation = Dataset.from_dict(rows)
    report = check_data(train, validation)
    train_texts = {" ".join(t.lower().split()) for t in train["text"]}
    expected = sum(" ".join(t.lower().split()) in train_texts for t in validation["text"])
    assert expected == copied
    assert report.stats["overlap"]["validation_rows_in_train"] == expected
    found = [f for f in report.errors + report.warnings if f.code == "overlap"]
    if level is None:
        assert found == [] and "overlap" in report.codes("info")
        return
    assert "overlap" in report.codes(level) and "deduplicate" in found[0].fix
    said = "every validation row (800)" if copied == 800 else f"{copied} of 800 validation rows"
    assert said in found[0].message
    assert len(report.stats["overlap"]["examples"]) == min(copied, 3)
    kept = drop_overlap(train, validation, ["text"])
    assert len(kept) == len(train) - copied
    assert check_data(kept, validation).stats["overlap"]["validation_rows_in_train"] == 0


def test_sentence_pairs_overlap_as_pairs():
    first = Dataset.from_dict({"a": ["x y", "p q"], "b": ["z", "r"], "label": [0, 1]})
    second = Dataset.from_dict({"a": ["X  y", "p q"], "b": ["z", "other"], "label": [0, 1]})
    assert normalise(("X  y", "z")) == normalise(("x y", "z")) != normalise(("x y", "other"))
    report = check_data(first, second, ["a", "b"], "label")
    assert report.stats["overlap"]["validation_rows_in_train"] == 1


def test_class_only_in_validation_is_an_error_and_one_missing_from_it_a_warning(clean):
    train, _ = clean
    validation = toy(900, 3, [0, 1, 2] * 300)
    report = check_data(train, validation)
    error = next(e for e in report.errors if e.code == "class_only_in_validation")
    assert "classes ['2'] occur in validation (300 rows)" in error.message
    missing = check_data(toy(900, 4, [0, 1, 2] * 300), balanced(800, 5))
    warning = next(w for w in missing.warnings if w.code == "class_missing_from_validation")
    assert "classes ['2'] occur in train (300 rows)" in warning.message
    assert missing.errors == []


def test_label_names_are_matched_ignoring_case_and_named_ids(clean):
    train, validation = clean
    named = train.map(lambda r: {"label": ["negative", "Positive"][r["label"]]})
    other = validation.map(lambda r: {"label": ["NEGATIVE", "positive"][r["label"]]})
    report = check_data(named, other)
    assert report.errors == [] and report.stats["classes"] == ["negative", "Positive"]
    ids = check_data(train, validation, label_names=["neg", "pos"])
    assert ids.stats["counts"]["train"] == {"neg": 400, "pos": 400}


def test_scores_ids_and_empty_labels_are_errors(clean):
    train, validation = clean
    scores = train.map(lambda r, i: {"label": 0.25 + i}, with_indices=True)
    assert "label_scores" in check_data(scores, validation).codes("error")
    ids = train.map(lambda r, i: {"label": i}, with_indices=True)
    assert "label_ids" in check_data(ids, validation).codes("error")
    holes = Dataset.from_dict({"text": train["text"], "label": [None, *train["label"][1:]]})
    report = check_data(holes, validation)
    assert "1 of 800 rows have no label" in str(report.errors[0])
    blank = Dataset.from_dict({"text": ["  ", *train["text"][1:]], "label": train["label"]})
    assert "texts" in check_data(blank, validation).codes("error")


def test_dominant_class_warns_with_its_baseline():
    labels = [0] * 950 + [1] * 50
    train = toy(1000, 6, np.random.default_rng(0).permutation(labels))
    validation = toy(1000, 7, np.random.default_rng(1).permutation(labels))
    report = check_data(train, validation)
    assert "imbalanced" in report.codes("warning")
    assert report.stats["majority"] == {"class": "0", "train_share": 0.95, "baseline_accuracy": 0.95}


def test_sorted_train_warns_that_a_slice_from_the_top_is_one_sided(clean):
    """The demo's train.jsonl: half positive, but its first 4,000 of 9,511 rows are 97% positive."""
    rng = np.random.default_rng(0)
    head = rng.permutation([1] * 388 + [0] * 12)
    tail = rng.permutation([1] * 112 + [0] * 488)
    train = toy(1000, 8, [*head, *tail])
    report = check_data(train, clean[1], max_train_samples=400)
    warning = next(w for w in report.warnings if w.code == "sorted_train")
    assert "the first 400 of 1000 rows are 97.0% '1' (whole file: 50.0%" in warning.message
    assert "shuffle" in warning.fix
    shuffled = toy(1000, 8, rng.permutation([*head, *tail]))  # the negative control: same labels, shuffled
    assert "sorted_train" not in check_data(shuffled, clean[1], max_train_samples=400).codes()


def test_long_texts_recommend_a_max_length_from_the_p95(clean):
    tokenizer = make_tokenizer()
    words = np.random.default_rng(0).integers(4, 100, 800)
    train = Dataset.from_dict(
        {"text": [" ".join(["w5"] * int(k)) for k in words], "label": clean[0]["label"]}
    )
    validation = clean[1]  # shorter texts: train's p95 is the larger one
    report = check_data(train, validation, tokenizer=tokenizer, max_length=32)
    lengths = words + 2  # [CLS] ... [SEP]
    p95 = np.percentile(lengths, 95)
    step = 8 if p95 < 128 else 16
    expected = int(math.ceil(p95 / step) * step)
    assert report.stats["lengths"]["recommended_max_length"] == expected == recommend_max_length(p95)
    assert report.stats["lengths"]["cut_at_max_length"]["share"] == pytest.approx(np.mean(lengths > 32))
    warning = next(w for w in report.warnings if w.code == "truncated")
    assert f"{100 * np.mean(lengths > 32):.1f}% of train rows" in warning.message
    assert f"max_length={expected}" in warning.fix
    capped = check_data(train, validation, tokenizer=tokenizer, max_length=32, model_max_length=64)
    assert capped.stats["lengths"]["recommended_max_length"] == 64
    assert "longer_than_model" in capped.codes("warning")


def test_tiny_validation_gives_its_plus_minus_points(clean):
    validation = balanced(50, 9)
    report = check_data(clean[0], validation)
    z, p, n = 1.959964, 0.8, 50  # the Wilson interval, written out
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert report.stats["precision"]["half_width_points"] == pytest.approx(100 * half, abs=1e-4)
    warning = next(w for w in report.warnings if w.code == "tiny_validation")
    assert (
        f"validation has 50 rows: an accuracy near 80% is known to ±{100 * half:.1f} points"
        in warning.message
    )
    seven = wilson_half_width(0.8, 7)[0]  # 80% of 7 rows is no whole count: the formula at 0.8, not 6/7
    assert seven == pytest.approx(z / (1 + z * z / 7) * math.sqrt(0.16 / 7 + z * z / 196), abs=1e-6)


def test_files_are_read_like_datasets(tmp_path, clean):
    paths = []
    for name, data in zip(("train.jsonl", "dev.csv"), clean):
        paths.append(str(tmp_path / name))
        data.to_json(paths[-1]) if name.endswith("jsonl") else data.to_csv(paths[-1], index=False)
    from_files, from_data = check_data(*paths).to_dict(), check_data(*clean).to_dict()
    assert from_files == from_data
    with pytest.raises(FileNotFoundError):
        check_data(str(tmp_path / "absent.csv"))


# ---- the teacher ----------------------------------------------------------------------------------------------


def _classifier(seed: int, **config) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config.setdefault("id2label", {0: "neg", 1: "pos"})
    config.setdefault("label2id", {"neg": 0, "pos": 1})
    return BertForSequenceClassification(bert_config(layers=1, hidden=32, heads=2, **config)).eval()


@pytest.fixture(scope="module")
def trained():
    """A tiny classifier trained on the toy task (the class word decides), and its tokenizer."""
    model, tokenizer, data = _classifier(0).train(), make_tokenizer(), balanced(256, 10)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        rows = data[(step % 8) * 32 : (step % 8 + 1) * 32]
        batch = tokenizer(rows["text"], padding=True, return_tensors="pt")
        loss = model(**batch, labels=torch.tensor(rows["label"])).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    return model.eval(), tokenizer


def test_a_trained_teacher_passes_with_its_own_accuracy(trained, tmp_path):
    model, tokenizer = trained
    validation = balanced(200, 11)
    model.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    report = check_teacher(str(tmp_path / "teacher"), None, validation, resamples=200)
    with torch.no_grad():  # the reference: one forward pass of the whole set
        batch = tokenizer(list(validation["text"]), padding=True, return_tensors="pt")
        expected = float((model(**batch).logits.argmax(-1).numpy() == np.array(validation["label"])).mean())
    assert expected > 0.9
    assert report.usable and report.errors == [] and not report.needs_fine_tuning
    assert report.stats["accuracy"] == pytest.approx(expected)
    low, high = report.stats["intervals"]["accuracy"]
    assert low <= expected <= high
    assert report.stats["baseline"]["accuracy"] == 0.5 and report.stats["vs_baseline"]["interval"][0] > 0
    assert "## Teacher" in report.markdown()


def test_an_in_memory_classifier_is_what_its_class_says_and_may_see_a_subset_of_its_classes(trained):
    model, tokenizer = trained
    model.config.architectures = ["BertForMaskedLM"]  # fine-tuned from a base checkpoint, never saved
    report = check_teacher(model, tokenizer, balanced(200, 11), resamples=200)
    assert report.usable and not report.needs_fine_tuning
    three = _classifier(0, num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    data = Dataset.from_dict({"text": ["w1 w2", "w3 w4"] * 5, "label": ["b", "a"] * 5})  # no row of class c
    assert not check_teacher(three, tokenizer, data, resamples=50).needs_fine_tuning
    four = Dataset.from_dict(
        {"text": ["w1 w2", "w3 w4"] * 5, "label": ["b", "d"] * 5}
    )  # control: d is unknown
    assert check_teacher(three, tokenizer, four, resamples=50).needs_fine_tuning


def test_a_random_head_is_an_error(trained):
    _, tokenizer = trained
    validation = balanced(200, 11)
    for seed in (0, 3):  # a random tiny classifier answers one class for every row: the baseline, no more
        report = check_teacher(_classifier(seed), tokenizer, validation, resamples=200)
        assert not report.usable and "teacher_not_better_than_baseline" in report.codes("error")
        assert "majority baseline (always" in report.errors[0].message
        with pytest.raises(ValueError, match="nothing to teach"):
            report.raise_errors()


def test_swapped_class_names_score_below_the_baseline(trained):
    """Data labelled by name with the teacher's names swapped: matched by name, the teacher is always wrong."""
    model, tokenizer = trained
    validation = balanced(200, 11).map(lambda r: {"label": ["pos", "neg"][r["label"]]})
    report = check_teacher(model, tokenizer, validation, resamples=200)
    assert report.stats["accuracy"] < 0.1 and "teacher_not_better_than_baseline" in report.codes("error")


def test_a_base_encoder_needs_fine_tuning(trained, tmp_path):
    _, tokenizer = trained
    validation = balanced(100, 12)
    BertModel(bert_config(layers=1, hidden=32, heads=2)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    report = check_teacher(str(tmp_path / "base"), None, validation)
    assert report.needs_fine_tuning and not report.usable and report.errors == []
    assert "no sequence-classification head (architectures ['BertModel'])" in report.reasons[0]
    assert "accuracy" not in report.stats
    # Its config claims a classification head, but the weights have none: the head is newly initialised.
    path = tmp_path / "base" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(config | {"architectures": ["BertForSequenceClassification"]}))
    report = check_teacher(str(tmp_path / "base"), None, validation)
    assert report.needs_fine_tuning and "classifier.weight" in report.reasons[0]


def test_a_head_for_other_classes_needs_fine_tuning(trained):
    _, tokenizer = trained
    validation = balanced(100, 12)
    three = _classifier(0, num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    report = check_teacher(three, tokenizer, validation)
    assert report.needs_fine_tuning and "predicts 3 classes" in report.reasons[0]
    sports = _classifier(0, id2label={0: "sports", 1: "politics"}, label2id={"sports": 0, "politics": 1})
    named = validation.map(lambda r: {"label": ["neg", "pos"][r["label"]]})
    report = check_teacher(sports, tokenizer, named)
    assert report.needs_fine_tuning and "not the data's" in report.reasons[0]


def test_the_data_class_set_comes_from_both_splits(trained):
    """A validation set that lacks a class is no reason to fine-tune: the class set given by check_data counts."""
    model, tokenizer = trained
    positives = toy(100, 13, [1] * 100)
    alone = check_teacher(model, tokenizer, positives)
    assert alone.needs_fine_tuning and "the data has 1" in alone.reasons[0]
    report = check_teacher(model, tokenizer, positives, classes=["0", "1"], baseline_class="0", resamples=200)
    assert report.usable and report.stats["baseline"] == {"class": "neg", "accuracy": 0.0}
