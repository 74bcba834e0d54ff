"""Cross-modal data and recipes: reading audio and images into paired inputs, the collator, `trainer: cross_modal`
from YAML (end to end, and every bad recipe refused before training) and the demo (llmkd.data.paired,
llmkd.cli.cross_modal, recipes/demo_cross_modal.py). The training properties are in test_cross_modal.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cross_modal_worker import STUDENTS, TERMS, raw_pairs, teacher, w2v_bert_student
from datasets import Dataset
from scipy.io import wavfile

from llmkd.data.collate import DistillationCollator
from llmkd.data.paired import encode_pairs, read_audio
from llmkd.modeling import SEQ_CLS, task_of
from llmkd.schemes import CrossModalConfig


def test_encode_pairs_reads_wav_paths_and_resamples(tmp_path):
    rate = 8000
    clip = (np.sin(np.arange(4000) * 0.05) * 20000).astype(np.int16)
    wavfile.write(tmp_path / "a.wav", rate, clip)
    read = read_audio("a.wav", 16000, str(tmp_path))
    assert read.dtype == np.float32 and len(read) == 8000  # 0.5 s at 16 kHz
    from_dict = read_audio({"array": clip / 32768.0, "sampling_rate": rate}, 16000)
    np.testing.assert_allclose(read, from_dict, atol=1e-6)
    _, extractor = w2v_bert_student()
    rows = Dataset.from_dict({"audio": ["a.wav"], "text": ["w1 w2"], "label": ["pos"]})
    data = encode_pairs(rows, extractor, teacher()[1], base_dir=str(tmp_path), label_names=["neg", "pos"])
    alone = extractor(read, sampling_rate=16000, return_tensors="np")["input_features"][0]
    np.testing.assert_allclose(data[0]["input_features"], alone, rtol=1e-6)
    assert data[0]["label"] == 1 and data[0]["teacher_input_ids"][0] == 2  # [CLS] of the teacher's tokenizer
    with pytest.raises(ValueError, match="does not exist"):
        read_audio("missing.wav", 16000, str(tmp_path))
    with pytest.raises(ValueError, match="columns"):
        encode_pairs(rows, extractor, teacher()[1], student_column="speech")


def test_collator_pads_each_stream_with_its_own_rule():
    _, extractor = w2v_bert_student()
    data = encode_pairs(raw_pairs(3), extractor, teacher()[1], student_column="audio", teacher_column="text")
    batch = DistillationCollator(extractor, teacher_tokenizer=teacher()[1])([data[i] for i in range(3)])
    lengths = [len(data[i]["input_features"]) for i in range(3)]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["input_features"].shape[:2] == (3, max(lengths))
    assert batch["teacher_attention_mask"].sum(1).tolist() == [
        len(data[i]["teacher_input_ids"]) for i in range(3)
    ]
    assert batch["labels"].tolist() == [data[i]["label"] for i in range(3)]


def recipe_files(tmp_path) -> str:
    """A teacher folder, a student folder (config + feature extractor, no weights), WAV files and a recipe."""
    model, tokenizer = teacher()
    model.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    student, extractor = w2v_bert_student()
    student.config.save_pretrained(tmp_path / "student")
    extractor.save_pretrained(tmp_path / "student")
    (tmp_path / "data" / "clips").mkdir(parents=True)
    raw = raw_pairs(12)
    for split, rows in (("train", range(8)), ("validation", range(8, 12))):
        lines = []
        for i in rows:
            wavfile.write(
                tmp_path / "data" / "clips" / f"{i}.wav",
                16000,
                (np.asarray(raw[i]["audio"]) * 32767).astype(np.int16),
            )
            lines.append(
                {"text": raw[i]["text"], "audio": f"clips/{i}.wav", "label": ["neg", "pos"][raw[i]["label"]]}
            )
        (tmp_path / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    recipe = {
        "trainer": "cross_modal",
        "teacher": str(tmp_path / "teacher"),
        "student": str(tmp_path / "student"),
        "student_column": "audio",
        "teacher_column": "text",
        "train_file": str(tmp_path / "data" / "train.jsonl"),
        "validation_file": str(tmp_path / "data" / "validation.jsonl"),
        "output_dir": str(tmp_path / "out"),
        "terms": TERMS,
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return str(tmp_path / "recipe.yaml")


def test_distill_command_runs_a_cross_modal_recipe(tmp_path):
    from transformers import AutoModelForAudioClassification

    from llmkd.cli.pipeline import distill

    report = distill(recipe_files(tmp_path))
    assert report["trainer"] == "CrossModalTrainer" and 0 <= report["eval"]["eval_accuracy"] <= 1
    assert {"eval_distill/logits_forward_kl", "eval_distill/pooled_cosine"} <= set(report["eval"])
    loaded, info = AutoModelForAudioClassification.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()) and not any("llmkd_aux" in k for k in loaded.state_dict())
    fresh = w2v_bert_student()[0]  # the recipe's student started from its config, seeded, and then trained
    assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"trainer": "distill"}, "are for trainer: cross_modal"),
        ({"student_column": None}, "needs student: FOLDER"),
        ({"lora": {"r": 4}}, "does not combine"),
        ({"max_seconds": 0}, "max_seconds"),
        ({"terms": [{"knowledge": "attention", "loss": "kl"}]}, "compare positions"),
    ],
)
def test_bad_cross_modal_recipes_are_refused_before_training(tmp_path, change, message):
    from llmkd.cli.pipeline import distill

    path = recipe_files(tmp_path)
    recipe = yaml.safe_load(Path(path).read_text()) | change
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({k: v for k, v in recipe.items() if v is not None}))
    with pytest.raises(ValueError, match=message):
        distill(path)
    assert not (tmp_path / "out").exists()


def test_the_demo_runs_end_to_end_when_espeak_is_installed(tmp_path):
    import shutil

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make demo-cross-modal installs it)")
    script = os.path.join(os.path.dirname(__file__), "..", "recipes", "demo_cross_modal.py")
    cmd = [sys.executable, script, "--smoke", "--seeds", "2", "--out", str(tmp_path / "out")]
    done = subprocess.run([*cmd, "--demo-dir", str(tmp_path / "demo")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "cross-modal KD" in report and (tmp_path / "out" / "cross_modal.png").is_file()


def test_the_demo_settings_build_its_configs_and_student(tmp_path):
    """recipes/cross_modal/demo.yaml: every row is a valid CrossModalConfig and the student config builds."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))
    import demo_cross_modal

    settings = yaml.safe_load(Path(demo_cross_modal.SETTINGS).read_text())
    for name, row in settings["rows"].items():
        args = CrossModalConfig(output_dir=str(tmp_path), **settings["training"], **row)
        assert [t.knowledge for t in args.terms] in ([], ["logits"], ["logits", "pooled"]), name
    model = demo_cross_modal.student(settings, teacher()[0].config, 0, smoke=False)
    assert task_of(model) == SEQ_CLS and model.config.num_labels == 2
    assert model.config.feature_projection_input_dim == 80 * settings["feature_stride"]


def test_audio_cells_of_every_kind_read_alike(tmp_path):
    """Stereo is averaged, 8-bit WAV is unsigned, WAV bytes / paths / decoder objects give the same clip."""
    mono = (np.sin(np.arange(1600) * 0.05) * 0.5).astype(np.float32)
    wavfile.write(tmp_path / "s.wav", 16000, (np.stack([mono, mono], 1) * 32767).astype(np.int16))
    np.testing.assert_allclose(read_audio("s.wav", 16000, str(tmp_path)), mono, atol=1e-4)
    wavfile.write(tmp_path / "u8.wav", 16000, np.full(100, 128, dtype=np.uint8))
    assert np.abs(read_audio(str(tmp_path / "u8.wav"), 16000)).max() == 0  # 8-bit silence is 128
    cell = {"path": None, "bytes": (tmp_path / "s.wav").read_bytes()}
    np.testing.assert_allclose(read_audio(cell, 16000), mono, atol=1e-4)

    class Decoder:  # the shape of torchcodec's AudioDecoder, which datasets.Audio columns decode to
        def get_all_samples(self):
            return type(
                "Samples", (), {"data": torch.from_numpy(np.stack([mono, mono])), "sample_rate": 8000}
            )()

    assert len(read_audio(Decoder(), 16000)) == 3200  # resampled from 8 kHz
    for bad in (None, np.zeros(0, dtype=np.float32)):
        with pytest.raises(ValueError, match="audio"):
            read_audio(bad, 16000)


def test_image_paths_are_relative_to_the_data_file(tmp_path):
    from PIL import Image

    _, processor = STUDENTS["vit"]()
    (tmp_path / "pics").mkdir()
    Image.fromarray(np.full((20, 20), 200, dtype=np.uint8)).save(tmp_path / "pics" / "0.png")  # grayscale
    rows = Dataset.from_dict({"image": ["pics/0.png"], "text": ["w1 w2"], "label": [1]})
    data = encode_pairs(rows, processor, teacher()[1], student_column="image", base_dir=str(tmp_path))
    assert np.asarray(data[0]["pixel_values"]).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="student_column='picture'.*no column 'picture'"):
        encode_pairs(rows, processor, teacher()[1], student_column="picture")


def test_recipe_students_load_safely_and_take_the_teacher_class_names(tmp_path):
    from llmkd.cli.pipeline import distill

    path = recipe_files(tmp_path)
    report = distill(path)
    assert report["fresh_student"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"}  # the teacher's names, not LABEL_0 / LABEL_1
    card = (tmp_path / "out" / "README.md").read_text()
    assert (
        "audio-classification" in card
        and "AutoModelForAudioClassification" in card
        and "AutoFeatureExtractor" in card
    )
    torch.save({}, tmp_path / "student" / "pytorch_model.bin")  # pickled weights only: refused, never loaded
    recipe = yaml.safe_load(Path(path).read_text()) | {"output_dir": str(tmp_path / "out2")}
    Path(path).write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="pickled weights"):
        distill(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"label_column": "lable"}, "no label column 'lable'"),
        ({"max_seconds": 1.0, "terms": [{"knowledge": "aligned", "loss": "mse"}]}, "cuts the audio but not"),
        ({"max_seconds": True}, "max_seconds must be a number"),
    ],
)
def test_more_bad_cross_modal_recipes(tmp_path, change, message):
    from llmkd.cli.pipeline import distill

    path = recipe_files(tmp_path)
    Path(path).write_text(yaml.safe_dump(yaml.safe_load(Path(path).read_text()) | change))
    with pytest.raises(ValueError, match=message):
        distill(path)
    assert not (tmp_path / "out").exists()
