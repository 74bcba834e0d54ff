"""`make demo-cross-modal`: a text teacher teaches a speech student, offline (issue 13).

    python recipes/demo_cross_modal.py [--seeds 3] [--out runs/demo_cross_modal] [--demo-dir runs/demo] [--smoke]

1. `make demo`'s fine-tuned MiniLM sentiment teacher and its Rotten Tomatoes split (made here when missing).
2. Sentences of at most `max_words` words are spoken by espeak-ng (llmkd.data.assets.speech): training sentences by
   6 voices, validation sentences by 2 other voices, each sentence with its own seeded voice, pitch and speed.
   The audio is cached by content hash under OUT/speech; the paired inputs (log-mel features for the student, the
   transcript's tokens for the teacher: llmkd.data.paired) under OUT/features.
3. For each seed, three students built from recipes/cross_modal/demo.yaml's config, trained with
   `CrossModalTrainer` on the same clips and steps: gold labels of the audio (supervised); the teacher's soft
   targets only (cross-modal KD: no audio label is read); soft targets + pooled-feature alignment.
4. The teacher on the validation transcripts (the ceiling), every student on the held-out-voice audio, paired
   bootstrap intervals of each student row against the supervised one, the student's speed, report.md / .json and
   cross_modal.png under OUT. Each run leaves its predictions in OUT/<row>-seed<N>/predictions.json; a rerun skips
   finished runs of the same inputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from datasets import Dataset, load_from_disk
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    SeamlessM4TFeatureExtractor,
    Wav2Vec2BertConfig,
    Wav2Vec2BertForSequenceClassification,
    set_seed,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo as glue_demo  # noqa: E402  (recipes/demo.py: the teacher and its data)

from llmkd.atomic import write_json  # noqa: E402
from llmkd.cli.pipeline import finetune  # noqa: E402
from llmkd.data.assets.minilm import minilm_path  # noqa: E402
from llmkd.data.assets.speech import HELD_OUT_VOICES, TRAIN_VOICES, synthesise  # noqa: E402
from llmkd.data.paired import encode_pairs  # noqa: E402
from llmkd.evaluation.metrics import accuracy  # noqa: E402
from llmkd.schemes import CrossModalConfig, CrossModalTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent / "cross_modal"))
from demo_report import write_report  # noqa: E402  (recipes/cross_modal/demo_report.py)

SETTINGS = Path(__file__).resolve().parent / "cross_modal" / "demo.yaml"
TAG = "[demo-cross-modal]"
SMOKE = {
    "sentences": 24,
    "epochs": 1,
    "size": {"hidden_size": 16, "num_hidden_layers": 1, "intermediate_size": 32},
}


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default="runs/demo_cross_modal", help="where audio, models and the report go"
    )
    parser.add_argument("--demo-dir", default="runs/demo", help="`make demo`'s folder: teacher and data")
    parser.add_argument(
        "--data-dir", default=None, help="a prepared Rotten Tomatoes folder (default: the demo's)"
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per student row (42, 43, ...)")
    parser.add_argument("--settings", default=str(SETTINGS), help="the demo's YAML (model, training, rows)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and one epoch: what the tests run")
    return parser.parse_args(argv)


def teacher_and_data(args) -> tuple[Path, Path]:
    """(teacher folder, data folder) of `make demo`, made with its recipes when missing."""
    demo_dir = Path(args.demo_dir)
    data_dir, common = glue_demo.demo_data(args.data_dir, demo_dir, args.smoke)
    teacher = demo_dir / "teacher"
    glue_demo.run_once(finetune, "teacher.yaml", teacher, [*common, "--model", minilm_path()])
    return teacher, data_dir


def sentences(path: Path, max_words: int, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if len(r["sentence"].split()) <= max_words]
    return rows[:: max(1, len(rows) // limit)][:limit] if limit else rows  # smoke: spread over both classes


def spoken_split(rows: list[dict], out: Path, held_out: bool, extractor, tokenizer, max_length: int):
    """The split's clips (cached by content hash) encoded for both sides (cached by the same key)."""
    texts = [r["sentence"] for r in rows]
    seed, voices = (1, HELD_OUT_VOICES) if held_out else (0, TRAIN_VOICES)
    start = time.perf_counter()
    speech = synthesise(texts, str(out / "speech"), seed=seed, voices=voices)
    key = hashlib.sha256(f"{speech['key']}|{extractor.to_json_string()}|{max_length}".encode()).hexdigest()[
        :16
    ]
    folder = out / "features" / key
    if not folder.is_dir():
        raw = Dataset.from_dict(
            {"sentence": texts, "audio": speech["audio"], "label": [r["label"] for r in rows]}
        )
        encoded = encode_pairs(raw, extractor, tokenizer, student_column="audio", teacher_column="sentence")
        encoded.save_to_disk(str(folder.with_suffix(".tmp")))
        folder.with_suffix(".tmp").rename(folder)
    seconds = float(sum(len(a) for a in speech["audio"]) / 16_000)
    print(
        f"{TAG} {len(texts)} clips, {seconds / 60:.1f} min of speech, ready in {time.perf_counter() - start:.0f} s"
    )
    # The runs' inputs name the features by their bytes: a change in how pairs are encoded retrains the students.
    key = hashlib.sha256(
        "".join(glue_demo.content(f) for f in sorted(folder.glob("*.arrow"))).encode()
    ).hexdigest()
    data = load_from_disk(str(folder))
    signals = [c for c in data.column_names if c == "input_features"]
    return data.with_format("numpy", columns=signals, output_all_columns=True), speech, seconds, key


def student(settings: dict, teacher_config, seed: int, smoke: bool):
    fields = settings["student_config"] | (SMOKE["size"] if smoke else {})
    config = Wav2Vec2BertConfig(
        **fields,
        feature_projection_input_dim=80 * settings["feature_stride"],
        num_labels=teacher_config.num_labels,
        id2label=teacher_config.id2label,
        label2id=teacher_config.label2id,
    )
    torch.manual_seed(seed)
    return Wav2Vec2BertForSequenceClassification(config)


def train_row(name: str, seed: int, ctx: dict) -> dict:
    """One student row and seed: trained, saved, scored on validation; skipped when done with the same inputs."""
    settings, out = ctx["settings"], ctx["out"]
    folder = out / f"{name.replace(' ', '-').replace('+', 'plus').lower()}-seed{seed}"
    inputs = {
        "row": settings["rows"][name],
        "training": settings["training"],
        "config": settings["student_config"],
    }
    inputs |= {"features": ctx["features_key"], "seed": seed, "smoke": ctx["smoke"]}
    record = folder / "predictions.json"
    if record.is_file() and json.loads(record.read_text()).get("inputs") == inputs:
        print(f"{TAG} {folder.name}: done before, reused")
        return json.loads(record.read_text())
    set_seed(seed)
    model = student(settings, ctx["teacher"].config, seed, ctx["smoke"])
    training = dict(settings["training"]) | ({"num_train_epochs": SMOKE["epochs"]} if ctx["smoke"] else {})
    args = CrossModalConfig(
        output_dir=str(folder),
        seed=seed,
        save_strategy="no",
        report_to="none",
        logging_steps=50,
        disable_tqdm=True,
        use_cpu=True,
        **training,
        **settings["rows"][name],
    )
    trainer = CrossModalTrainer(
        model=model,
        teacher=ctx["teacher"],
        args=args,
        train_dataset=ctx["train"],
        eval_dataset=ctx["validation"],
        processing_class=ctx["extractor"],
        teacher_processing_class=ctx["tokenizer"],
        compute_metrics=accuracy,
    )
    start = time.perf_counter()
    trainer.train()
    minutes = (time.perf_counter() - start) / 60
    trainer.save_model()
    predicted = trainer.predict(ctx["validation"]).predictions.argmax(-1)
    result = {"inputs": inputs, "predictions": predicted.tolist(), "train_minutes": minutes}
    result["accuracy"] = float((predicted == np.asarray(ctx["validation"]["label"])).mean())
    write_json(str(record), result)
    print(f"{TAG} {folder.name}: accuracy {100 * result['accuracy']:.1f} in {minutes:.1f} min")
    return result


@torch.inference_mode()
def teacher_predictions(teacher, tokenizer, texts: list[str]) -> list[int]:
    out = []
    for i in range(0, len(texts), 64):
        batch = tokenizer(
            texts[i : i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt"
        )
        out += teacher(**batch).logits.argmax(-1).tolist()
    return out


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out)
    settings = yaml.safe_load(Path(args.settings).read_text(encoding="utf-8"))
    started = time.perf_counter()
    teacher_dir, data_dir = teacher_and_data(args)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    extractor = SeamlessM4TFeatureExtractor(stride=settings["feature_stride"])
    limit = SMOKE["sentences"] if args.smoke else None
    rows = {
        s: sentences(data_dir / f"{s}.jsonl", settings["max_words"], limit) for s in ("train", "validation")
    }
    train, _, train_seconds, train_key = spoken_split(rows["train"], out, False, extractor, tokenizer, 128)
    validation, speech, _, validation_key = spoken_split(
        rows["validation"], out, True, extractor, tokenizer, 128
    )
    ctx = {
        "settings": settings,
        "out": out,
        "teacher": teacher,
        "tokenizer": tokenizer,
        "extractor": extractor,
    }
    ctx |= {"train": train, "validation": validation, "smoke": args.smoke}
    ctx |= {
        "features_key": [train_key, validation_key],
        "audio": speech["audio"],
        "texts": rows["validation"],
    }
    results = {
        name: [train_row(name, seed, ctx) for seed in range(42, 42 + args.seeds)] for name in settings["rows"]
    }
    ceiling = teacher_predictions(teacher, tokenizer, [r["sentence"] for r in rows["validation"]])
    facts = {
        "train_clips": len(train),
        "validation_clips": len(validation),
        "train_minutes_of_speech": train_seconds / 60,
    }
    facts |= {"validation_voices": list(HELD_OUT_VOICES), "train_voices": list(TRAIN_VOICES)}
    facts["minutes"] = (time.perf_counter() - started) / 60
    table = write_report(out, results, ceiling, validation, ctx, facts)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
