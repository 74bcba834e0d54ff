"""QAT distillation vs PTQ, both starting from the same full-precision distilled student (demo recipe).

Usage: OMP_NUM_THREADS=2 .venv/bin/python scripts/qat_vs_ptq.py OUT_DIR STEPS [BITS:GROUP ...]
FP student: runs/demo/student-distil-seed42 (recipes/demo/distil.yaml, seed 42: 2 layers [0, 3] of the
fine-tuned MiniLM teacher runs/demo/teacher, 2 epochs in full precision). For each BITS:GROUP (GROUP 0 = one
scale per row): PTQ of it (round-to-nearest, no training) vs QAT: the same student quantised and distilled
for STEPS more steps with the demo recipe's terms (KL T=2 + hidden cosine + 0.5 CE), lr 1e-4. Control: the FP
student distilled for the same STEPS without quantisation, then PTQ'd (is it the extra training or QAT?).
"""

import json
import sys
import time

import torch
from transformers import AutoModelForSequenceClassification, set_seed

from llmkd import DistillationTrainer
from llmkd.atomic import write_json
from llmkd.cli.pipeline import build_data, build_models, metrics_for
from llmkd.cli.recipe import load_config
from llmkd.data.collate import DistillationCollator
from llmkd.students import quantize as Q

out, steps = sys.argv[1], int(sys.argv[2])
configs = [tuple(int(x) for x in c.split(":")) for c in sys.argv[3:]] or [(4, 32)]
torch.set_num_threads(2)
FP = "runs/demo/student-distil-seed42"
flags = [
    "--max_steps",
    str(steps),
    "--learning_rate",
    "1e-4",
    "--warmup_steps",
    "10",
    "--disable_tqdm",
    "true",
]
run_cfg, args = load_config("recipes/demo/distil.yaml", ["--output_dir", f"{out}/tmp", *flags])
set_seed(args.seed)
task, teacher, teacher_tok, _, tok = build_models(run_cfg, args)
train, evaluation = build_data(run_cfg, task, tok, teacher.config)


def trainer_for(student):
    set_seed(args.seed)
    return DistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=DistillationCollator(tok),
        processing_class=tok,
        teacher_processing_class=tok,
        compute_metrics=metrics_for(run_cfg, task, teacher.config),
    )


def accuracy(model):
    """Validation accuracy from the student alone (no teacher forward: a quarter of the cost)."""
    model.eval()
    collate, correct = DistillationCollator(tok), 0
    keys = {"input_ids", "attention_mask", "token_type_ids"}
    with torch.no_grad():
        for start in range(0, len(evaluation), 128):
            rows = evaluation.select(range(start, min(start + 128, len(evaluation))))
            batch = collate([dict(r) for r in rows])
            logits = model(**{k: v for k, v in batch.items() if k in keys}).logits
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
    return round(100 * correct / len(evaluation), 2)


def distil(student):
    start = time.time()
    trainer_for(student).train()
    return student, round(time.time() - start, 1)


def fp_student():
    return AutoModelForSequenceClassification.from_pretrained(FP)


results = {"steps": steps, "fp32 student": accuracy(fp_student())}
longer, results["fp continue train_s"] = distil(fp_student())
results["fp32 student + steps (control)"] = accuracy(longer)
for bits, group in configs:
    group = group or None
    tag = f"int{bits} g{group or 'row'}"
    results[f"PTQ {tag}"] = accuracy(Q.ptq(fp_student(), bits, group))
    results[f"fp + steps, then PTQ {tag} (control)"] = accuracy(Q.ptq(longer, bits, group))
    qat, results[f"QAT {tag} train_s"] = distil(Q.quantize_student(fp_student(), bits, group))
    results[f"QAT {tag}"] = accuracy(qat)
    meta = Q.export_quantized(qat, f"{out}/qat-{bits}-{group}")
    results[f"QAT {tag} exported, reloaded"] = accuracy(Q.load_quantized(f"{out}/qat-{bits}-{group}"))
    results[f"{tag} export bytes"] = meta["weight_bytes"]
    print(json.dumps(results, indent=1), flush=True)
write_json(f"{out}/results.json", results)
