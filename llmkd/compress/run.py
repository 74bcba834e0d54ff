"""`llmkd compress`: from a teacher and labelled data to the best student that meets a CPU speed-up.

Stages (each resumable, see llmkd.compress.stages), their shares of the budget in brackets:
1. checks: the data and the teacher (llmkd.compress.prepare); errors stop the command before any training.
2. teacher: only when the teacher has no head for the data's classes: fine-tuned (llmkd.compress.recipes).
   [at most TEACHER_SHARE of what is left]
3. shapes: candidate shapes timed against the teacher, the kept ones pruned from it (llmkd.compress.students).
4. search: successive halving of the candidates with short distillation runs, scored on the search slice
   (llmkd.compress.halving). [SEARCH_SHARE of what is left]
5. final: the winner distilled (feature stage, then soft targets), then 6. control: the same student and total
   steps on the labels alone (llmkd.compress.recipes); both sized to fit what is left of the budget but
   REPORT_SECONDS.
7. report: teacher, student and control scored on the validation rows with 95% intervals and timed
   interleaved (llmkd.compress.report); the result is the better of student and control on the search slice.
"""

from __future__ import annotations

import math
import os

import numpy as np

from llmkd.compress import recipes
from llmkd.compress.stages import Stages, read_json

TEACHER_SHARE = 0.4
SEARCH_SHARE = 0.3
REPORT_SECONDS = 120.0
CALL_SECONDS = 20.0  # a run's fixed cost before its first measured call: loading, tokenising, evaluating
MIN_SEARCH_STEPS = recipes.SEARCH_WARMUP
CONTROL_COST = 0.6  # a labels-only step over a distillation step (no teacher forward), before it is measured


def compress(config) -> dict:
    """Runs every stage (resuming finished ones) and returns the report dict (also OUT/report.json)."""
    from transformers import AutoConfig, AutoTokenizer

    from llmkd.students.loading import resolve_path

    out = os.path.abspath(config.output_dir)
    stages = Stages(out, config.key(), 60 * config.budget_minutes)
    teacher_path = resolve_path(config.teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    data = stages.run(
        "checks",
        lambda: _checks(config, out, tokenizer, AutoConfig.from_pretrained(teacher_path), teacher_path),
    )
    if data["needs_fine_tuning"]:
        tuned = stages.run("teacher", lambda: _fine_tune(config, stages, data, teacher_path, out))
        teacher_path = tuned["folder"]
        tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    teacher = _load(teacher_path)
    shapes = stages.run("shapes", lambda: _shapes(config, teacher, tokenizer, data, out))
    search = stages.run("search", lambda: _search(config, stages, data, teacher_path, shapes, out))
    winner = shapes["candidates"][search["winner_index"]]
    steps = stages.run("plan", lambda: _plan(config, stages, data, search))
    final = stages.run("final", lambda: _final(config, stages, data, teacher_path, winner, steps, out))
    control = stages.run("control", lambda: _control(config, stages, data, teacher_path, winner, steps, out))
    from llmkd.compress.report import write_report

    return stages.run(
        "report",
        lambda: write_report(
            config, out, data, teacher_path, shapes, search, final, control, stages.elapsed()
        ),
    )


def _checks(config, out, tokenizer, teacher_config, teacher: str) -> dict:
    from llmkd.compress.prepare import prepare

    return prepare(config, out, tokenizer, teacher_config, teacher)


def _load(folder: str):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(folder).eval()


def _fine_tune(config, stages: Stages, data: dict, base: str, out: str) -> dict:
    """The teacher fine-tuned on the training rows (best epoch on the search slice), then checked again."""
    from llmkd.compress.teacher_checks import check_teacher

    folder = os.path.join(out, "teacher")
    rate = _step_seconds(base, data, config.batch_size, teacher=None)
    most = max(1, int(TEACHER_SHARE * stages.left() / rate))
    recipe = recipes.teacher_recipe(config, data, base, folder, most)
    stages.say(
        "teacher", f"fine-tuning {base} for {recipe['num_train_epochs']} epoch(s) (about {rate:.2f} s/step)"
    )
    report = stages.train("finetune", recipe, "teacher")
    check = check_teacher(
        folder, None, data["files"]["validation"], data["text_columns"], "label",
        classes=data["classes"], max_length=data["max_length"], seed=config.seed,
    )  # fmt: skip
    check.raise_errors()
    return {
        "folder": folder,
        "report": report.get("eval", {}),
        "check": check.to_dict(),
        "markdown": check.markdown(),
    }


def _shapes(config, teacher, tokenizer, data, out) -> dict:
    from llmkd.compress.students import shapes_stage

    return shapes_stage(config, teacher, tokenizer, data, out)


def _step_seconds(student: str, data: dict, batch_size: int, teacher=None, repeats: int = 3) -> float:
    """Measured seconds of one training step of `student` (forward + backward + the teacher's forward)."""
    import time

    import torch

    student_model = _load(student).train()
    ids = torch.randint(0, student_model.config.vocab_size, (batch_size, data["max_length"]))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        if teacher is not None:
            with torch.no_grad():
                teacher(**batch)
        student_model(**batch).logits.sum().backward()
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def _search(config, stages: Stages, data: dict, teacher: str, shapes: dict, out: str) -> dict:
    """Successive halving over the kept shapes; one candidate needs no search."""
    from llmkd.compress.halving import successive_halving

    # Fastest first: halving breaks ties by order, and at equal scores the faster student is the better one.
    candidates = [c["name"] for c in sorted(shapes["candidates"], key=lambda c: -c["speedup"])]
    folders = {c["name"]: c["folder"] for c in shapes["candidates"]}
    if len(candidates) == 1:
        return {"winner_index": 0, "winner": candidates[0], "calls": [], "rounds": [], "ranking": [0]}
    # (winner_index below is the winner's place in shapes["candidates"], the order the report lists)
    # Sized once and kept: a resumed search must see the same plan (halving refuses another min_steps).
    plan = stages.run(
        "search-plan",
        lambda: _search_plan(config, stages, data, teacher, folders[candidates[0]], len(candidates)),
    )
    min_steps, warmup, budget = plan["min_steps"], plan["warmup"], plan["budget_seconds"]
    stages.say("search", f"{len(candidates)} candidates, round 1 at {min_steps} steps, {budget / 60:.1f} min")

    def train_fn(name: str, steps: int, state):
        folder = os.path.join(out, "search", name, f"steps-{steps}")
        recipe = recipes.search_recipe(config, data, teacher, folders[name], folder, steps, warmup)
        from llmkd.publish.card import cards_without_measurement

        with cards_without_measurement():
            report = stages.train(
                "distill", recipe, f"search-{name}-{steps}", resume_from=(state or {}).get("checkpoint")
            )
        state = {"checkpoint": os.path.join(folder, f"checkpoint-{steps}")}
        return report["eval"]["eval_accuracy"], state | {"train_seconds": report["train"]["train_runtime"]}

    result = successive_halving(
        candidates, train_fn, budget_seconds=budget, eta=config.eta, min_steps=min_steps,
        state_path=os.path.join(out, "search", "halving.json"),
        on_progress=lambda p: stages.say("search", p["line"]),
    )  # fmt: skip
    reports = [
        os.path.join(out, "search", candidates[c["candidate"]], f"steps-{c['steps']}", "llmkd_report.json")
        for c in result["calls"]
    ]
    result["train_seconds"] = [read_json(path)["train"]["train_runtime"] for path in reports]
    result["winner_index"] = [c["name"] for c in shapes["candidates"]].index(result["winner"])
    return result


def _search_plan(config, stages: Stages, data: dict, teacher: str, student: str, n: int) -> dict:
    """Round 0's steps: the most the search's share of the budget allows at the measured step rate, at least
    MIN_SEARCH_STEPS, and small enough that the last round trains no longer than half the final run may."""
    from llmkd.compress.halving import halving_plan, min_steps_for_budget

    budget = SEARCH_SHARE * max(stages.left(), 1.0)
    rate = _step_seconds(student, data, config.batch_size, teacher=_load(teacher))
    evaluation = CALL_SECONDS + rate * data["rows"]["search"] / recipes.EVAL_BATCH
    fits = min_steps_for_budget(
        n, eta=config.eta, budget_seconds=budget, seconds_per_step=rate, seconds_per_call=evaluation
    )
    per_epoch = recipes.steps_per_epoch(data["rows"]["train"], config.batch_size)
    growth = halving_plan(n, eta=config.eta, min_steps=1)[-1]["steps"]  # last round's steps / round 0's
    most = max(1, math.floor(config.max_epochs * per_epoch / 2 / growth))
    min_steps = int(max(1, min(max(fits, MIN_SEARCH_STEPS), per_epoch, most)))
    plan = {"min_steps": min_steps, "warmup": min(recipes.SEARCH_WARMUP, min_steps), "budget_seconds": budget}
    return plan | {"seconds_per_step": rate, "fits_budget": int(fits), "per_epoch": per_epoch, "most": most}


def _plan(config, stages: Stages, data: dict, search: dict) -> dict:
    """Steps of the final and control runs: what the rest of the budget allows at the search's measured rate,
    at most max_epochs epochs, at least one round-0 search run's worth."""
    calls = search.get("calls", [])
    if calls:  # the trainer's own clock splits each call into training and the rest (loading, evaluating)
        trained = [search["train_seconds"][i] for i in range(len(calls))]
        rate = sum(trained) / max(1, sum(c["new_steps"] for c in calls))
        overhead = float(np.median([c["seconds"] - t for c, t in zip(calls, trained)]))
    else:  # one candidate: no search ran
        rate, overhead = 0.5, CALL_SECONDS
    spare = stages.left() - REPORT_SECONDS - 3 * overhead
    per_epoch = recipes.steps_per_epoch(data["rows"]["train"], config.batch_size)
    most = math.floor(config.max_epochs * per_epoch)
    fit = math.floor(spare / (rate * (1 + CONTROL_COST))) if spare > 0 else 0
    least = max(MIN_SEARCH_STEPS, min(per_epoch, 2 * MIN_SEARCH_STEPS))
    total = int(min(most, max(fit, least)))
    features, prediction = recipes.final_steps(total)
    reason = "max_epochs" if total == most else "budget" if total == fit else "minimum"
    plan = {"total": total, "features": features, "prediction": prediction, "seconds_per_step": rate}
    return plan | {"overhead_seconds": overhead, "limited_by": reason, "steps_per_epoch": per_epoch}


def _final(config, stages, data, teacher, winner, steps, out) -> dict:
    folder = os.path.join(out, "student")
    student = winner["folder"]
    features = None
    if steps["features"]:
        stage_dir = os.path.join(out, "final", "features")
        recipe = recipes.feature_recipe(config, data, teacher, student, stage_dir, steps["features"])
        stages.say("final", f"feature stage: {steps['features']} steps of {winner['name']}")
        features = stages.train("distill", recipe, "final-features")
        student = stage_dir
    recipe = recipes.prediction_recipe(config, data, teacher, student, folder, steps["prediction"])
    stages.say("final", f"soft-target stage: {steps['prediction']} steps")
    report = stages.train("distill", recipe, "final")
    return {
        "folder": folder,
        "features": _eval(features),
        "eval": _eval(report),
        "train": report.get("train"),
    }


def _control(config, stages, data, teacher, winner, steps, out) -> dict:
    folder = os.path.join(out, "control-labels-only")
    recipe = recipes.control_recipe(config, data, teacher, winner["folder"], folder, steps["total"])
    stages.say("control", f"labels only: {steps['total']} steps of {winner['name']}")
    report = stages.train("distill", recipe, "control")
    return {"folder": folder, "eval": _eval(report), "train": report.get("train")}


def _eval(report: dict | None) -> dict | None:
    return None if report is None else report.get("eval")
