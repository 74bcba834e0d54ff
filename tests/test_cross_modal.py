"""Cross-modal distillation (llmkd.schemes.cross_modal, llmkd.data.paired, llmkd.knowledge.pooled).

A text teacher (tiny BERT) and students that read other inputs of the same examples: audio samples (wav2vec 2.0),
log-mel features (w2v-BERT), images (ViT) and another tokenisation of the text. Properties over every student
kind: a padded batch gives each example the values it gets alone; the soft-target and pooled terms equal float64
references computed from separate forwards; 2 processes give the 1-process update.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_launcher
from cross_modal_worker import (
    STUDENTS,
    TERMS,
    build_trainer,
    paired,
    raw_pairs,
    teacher,
    train_and_dump,
    w2v_bert_student,
    wav2vec2_student,
)
from safetensors.torch import load_file

from llmkd.data.collate import pad_signals
from llmkd.data.paired import encode_pairs
from llmkd.knowledge.pooled import align_positions, mean_pool
from llmkd.modeling import SEQ_CLS, is_causal, output_rows, position_mask, task_of
from llmkd.schemes import CrossModalConfig, CrossModalTrainer

WORKER = os.path.join(os.path.dirname(__file__), "cross_modal_worker.py")
KINDS = sorted(STUDENTS)


def trainer_for(kind: str, tmp_path, n: int = 6, **settings):
    args = CrossModalConfig(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        terms=settings.pop("terms", TERMS),
        hard_label_weight=settings.pop("hard_label_weight", 0.5),
        **settings,
    )
    return build_trainer(kind, args, n)


def per_example(trainer, rows: list[dict]) -> dict[str, torch.Tensor]:
    """Student logits, teacher logits and each term's per-example values for one collated batch (eval mode)."""
    batch = trainer.data_collator(rows)
    trainer.model.eval()
    with torch.no_grad():
        student_out, adapted = trainer._student_forward(trainer.model, batch, True)
        teacher_out = trainer._teacher_forward(batch, True)
        out = {"student": student_out.logits, "teacher": teacher_out.logits}
        for term in trainer.terms:
            tv = term.values(student_out, teacher_out, batch, adapted.get(str(term.index)))
            out[term.name] = tv.values if tv.values.dim() else tv.values.expand(len(rows))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_a_padded_batch_gives_each_example_its_values_alone(kind, tmp_path):
    trainer, data = trainer_for(kind, tmp_path)
    rows = [data[i] for i in range(len(data))]
    lengths = {
        len(np.asarray(r.get("input_values", r.get("input_features", r.get("input_ids", [0]))))) for r in rows
    }
    if kind != "vit":
        assert len(lengths) > 1  # the precondition: rows of different lengths, so the batch is padded
    together = per_example(trainer, rows)
    for i, row in enumerate(rows):
        alone = per_example(trainer, [row])
        for key, value in alone.items():
            torch.testing.assert_close(
                together[key][i], value[0], atol=2e-5, rtol=1e-4, msg=f"{kind} {key} row {i}"
            )


def test_negative_control_group_norm_counts_the_padding(tmp_path):
    """wav2vec 2.0 with group norm over time (its default) sees the padding: the property test would catch it."""
    student, extractor = wav2vec2_student()
    student.config.feat_extract_norm = "group"
    group = type(student)(student.config).eval()
    data = encode_pairs(raw_pairs(4), extractor, teacher()[1], student_column="audio", teacher_column="text")
    rows = [data[i] for i in range(4)]
    batch = pad_signals(rows)
    with torch.no_grad():
        together = group(**batch).logits
        alone = torch.cat([group(**pad_signals([r])).logits for r in rows])
    assert (together - alone).abs().max() > 1e-4


def test_soft_targets_and_pooled_terms_equal_float64_references(tmp_path):
    trainer, data = trainer_for("w2v_bert", tmp_path, terms=TERMS, temperature=3.0)
    rows = [data[i] for i in range(4)]
    values = per_example(trainer, rows)
    student, teacher_model = trainer.model, trainer.teacher
    projector = trainer.auxiliary_modules["1"]
    for i, row in enumerate(rows):  # every example alone, through plain transformers calls
        features = torch.as_tensor(np.asarray(row["input_features"]))[None]
        ids = torch.tensor([row["teacher_input_ids"]])
        with torch.no_grad():
            s = student(input_features=features, output_hidden_states=True)
            t = teacher_model(input_ids=ids, output_hidden_states=True)
        p_t = F.softmax(t.logits.double() / 3.0, -1)
        kl = (p_t * (p_t.log() - F.log_softmax(s.logits.double() / 3.0, -1))).sum() * 9.0
        torch.testing.assert_close(values["distill/logits_forward_kl"][i].double(), kl, atol=1e-5, rtol=1e-4)
        w, b = projector.weight.double(), projector.bias.double()
        pooled_s = s.hidden_states[-1][0].double().mean(0) @ w.T + b
        pooled_t = t.hidden_states[-1][0].double().mean(0)
        cosine = 1 - (pooled_s @ pooled_t) / (pooled_s.norm() * pooled_t.norm())
        torch.testing.assert_close(values["distill/pooled_cosine"][i].double(), cosine, atol=1e-5, rtol=1e-4)


def test_aligned_term_stretches_the_teacher_tokens_over_the_frames(tmp_path):
    """Against numpy.interp per feature, example by example (float64), and against the trainer's term."""
    teacher_states = torch.randn(2, 6, 3, dtype=torch.float64)
    t_lengths, s_lengths = torch.tensor([6, 3]), torch.tensor([10, 4])
    stretched = align_positions(teacher_states, t_lengths, s_lengths, 10)
    for b in range(2):
        n_s, n_t = int(s_lengths[b]), int(t_lengths[b])
        places = np.clip((np.arange(n_s) + 0.5) / n_s * n_t - 0.5, 0, n_t - 1)
        for h in range(3):
            reference = np.interp(places, np.arange(n_t), teacher_states[b, :n_t, h].numpy())
            np.testing.assert_allclose(stretched[b, :n_s, h].numpy(), reference, rtol=1e-5, atol=1e-6)
    trainer, data = trainer_for("w2v_bert", tmp_path)
    row = data[0]
    values = per_example(trainer, [row])["distill/aligned_mse"]
    with torch.no_grad():
        s = trainer.model(
            input_features=torch.as_tensor(np.asarray(row["input_features"]))[None], output_hidden_states=True
        )
        t = trainer.teacher(input_ids=torch.tensor([row["teacher_input_ids"]]), output_hidden_states=True)
    projector = trainer.auxiliary_modules["2"]
    with torch.no_grad():
        frames = s.hidden_states[-1][0].double() @ projector.weight.double().T + projector.bias.double()
    n_s, n_t = frames.shape[0], t.hidden_states[-1].shape[1]
    places = np.clip((np.arange(n_s) + 0.5) / n_s * n_t - 0.5, 0, n_t - 1)
    target = np.stack(
        [
            np.interp(places, np.arange(n_t), t.hidden_states[-1][0, :, h].double().numpy())
            for h in range(frames.shape[1])
        ],
        1,
    )
    reference = ((frames.numpy() - target) ** 2).mean(1).mean()
    np.testing.assert_allclose(values[0].item(), reference, rtol=1e-4)


def test_frame_mask_of_a_convolutional_front_end(tmp_path):
    """wav2vec 2.0 pools over its frames: the mask of the samples maps to the frames its convolutions keep."""
    student, _ = wav2vec2_student()
    mask = torch.zeros(2, 4000, dtype=torch.long)
    mask[0], mask[1, :2500] = 1, 1
    states = torch.zeros(2, 49, 3)
    frames = position_mask(student, mask, states)
    lengths = student._get_feat_extract_output_lengths(torch.tensor([4000, 2500]))
    assert frames.sum(1).tolist() == lengths.tolist() and lengths[0] > lengths[1]
    with pytest.raises(ValueError, match="no rule"):
        position_mask(teacher()[0], mask, states)


def test_mean_pool_ignores_padded_positions():
    states = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(mean_pool(states, mask)[0], states[0, :3].mean(0))
    shuffled = states.clone()
    shuffled[0, 3:] = 1e6  # a negative control: values in the padding change nothing
    torch.testing.assert_close(mean_pool(shuffled, mask), mean_pool(states, mask))


def test_two_processes_give_the_one_process_update(tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    train_and_dump(str(single), per_device_batch=4, accumulation=2, kind="w2v_bert")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER]
    done = run_launcher(
        [*cmd, str(double), "w2v_bert"], clean=[double], env=os.environ | {"OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (double / "world_size.txt").read_text() == "2"
    for name in ("student.safetensors", "aux.safetensors"):
        one, two = load_file(single / name), load_file(double / name)
        assert one.keys() == two.keys()
        for key in one:
            torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4, msg=f"{name} {key}")
    before, after = w2v_bert_student()[0].state_dict(), load_file(single / "student.safetensors")
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved  # a negative control: the two steps changed the student


def test_tasks_and_rows_of_audio_and_image_classifiers():
    for kind in ("w2v_bert", "wav2vec2", "vit"):
        model = STUDENTS[kind]()[0]
        assert task_of(model) == SEQ_CLS and not is_causal(model) and output_rows(model) == 2


def test_bad_pairs_are_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="compare positions.*logits or pooled"):
        CrossModalConfig(output_dir=str(tmp_path), terms=[{"knowledge": "hidden", "loss": "mse"}])
    student, processor, model, tokenizer, data = paired("w2v_bert", n=4)
    args = CrossModalConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="teacher_input_ids.*encode_pairs"):
        CrossModalTrainer(
            model=student, teacher=model, args=args, train_dataset=data.remove_columns("teacher_input_ids")
        )
    three = type(model)(
        model.config.__class__(
            **(model.config.to_dict() | {"num_labels": 3, "id2label": None, "label2id": None})
        )
    )
    with pytest.raises(ValueError, match="num_labels"):
        CrossModalTrainer(model=student, teacher=three, args=args, train_dataset=data)
    with pytest.raises(ValueError, match="needs a teacher model"):
        CrossModalTrainer(model=student, teacher=None, args=args, train_dataset=data)


@pytest.mark.parametrize(
    "term",
    [
        {"knowledge": "relation", "loss": "sp"},
        {"knowledge": "graph", "loss": "irg", "layer_map": [[1, 2], [2, 4]]},
    ],
    ids=["relation", "graph"],
)
def test_batch_relations_across_modalities_pool_each_side_alone(term, tmp_path):
    """A relation term on a padded batch equals its loss on vectors pooled from each example alone: the student
    over its frames (mean), the teacher over its own tokens ([CLS] of a text encoder)."""
    from llmkd.losses import LOSSES

    trainer, data = trainer_for("w2v_bert", tmp_path, terms=[term], hard_label_weight=0.0)
    rows = [data[i] for i in range(4)]
    value = per_example(trainer, rows)[trainer.terms[0].name][0]
    layers = [(2, 4)] if term["knowledge"] == "relation" else [(1, 2), (2, 4)]
    student, teacher_model = trainer.model, trainer.teacher
    pooled_s, pooled_t = [], []
    with torch.no_grad():
        for row in rows:
            s = student(
                input_features=torch.as_tensor(np.asarray(row["input_features"]))[None],
                output_hidden_states=True,
            )
            t = teacher_model(input_ids=torch.tensor([row["teacher_input_ids"]]), output_hidden_states=True)
            pooled_s.append([s.hidden_states[a][0].mean(0) for a, _ in layers])
            pooled_t.append([t.hidden_states[b][0, 0] for _, b in layers])
    stack = lambda side, k: torch.stack([p[k] for p in side])  # noqa: E731
    if term["knowledge"] == "relation":
        reference = LOSSES["relation"]["sp"](stack(pooled_s, 0), stack(pooled_t, 0))
    else:
        projector = trainer.auxiliary_modules["0"]
        with torch.no_grad():
            vertex = projector(stack(pooled_s, 1))
        students = torch.stack([stack(pooled_s, k) for k in range(2)])
        teachers = torch.stack([stack(pooled_t, k) for k in range(2)])
        reference = LOSSES["graph"]["irg"](students, teachers, vertex)
    torch.testing.assert_close(value, reference, atol=1e-5, rtol=1e-4)


def test_relation_terms_refuse_a_batch_of_one_example(tmp_path):
    with pytest.raises(ValueError, match="batch of one example.*dataloader_drop_last"):
        trainer_for(
            "w2v_bert",
            tmp_path,
            n=7,
            terms=[{"knowledge": "relation", "loss": "sp"}],
            per_device_train_batch_size=3,
        )
    trainer, _ = trainer_for(  # the control: the last batch of one is dropped
        "w2v_bert",
        tmp_path,
        n=7,
        terms=[{"knowledge": "relation", "loss": "sp"}],
        per_device_train_batch_size=3,
        dataloader_drop_last=True,
    )
    assert trainer.terms[0].name == "distill/relation_sp"


def test_group_norm_students_are_warned_about(tmp_path, caplog):
    student, extractor = wav2vec2_student()
    student.config.feat_extract_norm = "group"
    model, tokenizer = teacher()
    data = encode_pairs(raw_pairs(4), extractor, tokenizer)
    args = CrossModalConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with caplog.at_level("WARNING"):
        CrossModalTrainer(model=type(student)(student.config), teacher=model, args=args, train_dataset=data)
    assert "feat_extract_norm='layer'" in caplog.text
