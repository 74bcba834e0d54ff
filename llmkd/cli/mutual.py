"""`trainer: mutual` in a recipe: deep mutual learning of `num_peers` peers, each built like the recipe's student.

The recipe's `teacher:` only lends the peers its layers, tokenizer and labels (`student_layers`, `student_config`);
it never teaches. Peer k is built with seed + k (a fresh `student_config` peer draws its own weights); peers copied
from one model (`student_layers`, `student: PATH`) are made to differ by `peer_heads: reinit`. The run writes
`output_dir/peer-{k}` (each peer, a plain checkpoint) and peer 0 in `output_dir` itself (llmkd.schemes.mutual).

`llmkd.cli.pipeline` dispatches here and hands over its build steps (`Steps`): this module never imports the
pipeline, so the two do not import each other.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import NamedTuple

from llmkd.modeling import SEQ_CLS
from llmkd.schemes.mutual import MutualTrainer
from llmkd.students.from_teacher import describe


class Steps(NamedTuple):
    """The pipeline's build steps (llmkd.cli.pipeline), as the mutual run uses them."""

    build_models: Callable
    build_student: Callable
    build_data: Callable
    collator_of: Callable
    metrics_for: Callable
    train_and_report: Callable


def check_run(run) -> None:
    """Student options a set of peers cannot take (before any model is loaded)."""
    # Each changes how the student is trained or who teaches it; peers are plain students taught by each other.
    options = ("lora", "qat", "teachers", "mean_teacher", "born_again")
    unsupported = [name for name in options if getattr(run, name, None) is not None]
    unsupported += ["qlora"] if run.qlora else []
    if unsupported:
        raise ValueError(
            f"{unsupported} with trainer: mutual are not supported: the peers teach each other and each is saved "
            "as a plain checkpoint; remove them"
        )


def build_peers(run, args, steps: Steps):
    """(task, teacher config, tokenizer, peers): peer 0 as the pipeline builds the student, peer k with seed + k."""
    task, teacher, teacher_tok, first, tokenizer = steps.build_models(run, args)
    peers = [first]
    for k in range(1, args.num_peers):
        peer_args = copy.copy(args)
        peer_args.seed = args.seed + k
        peers.append(steps.build_student(run, peer_args, task, teacher, teacher_tok)[0])
    return task, teacher.config, tokenizer, peers


def distill_mutual(run, args, steps: Steps) -> dict:
    """Builds the peers and the data, trains them together, saves every peer, evaluates, reports."""
    check_run(run)
    task, teacher_config, tokenizer, peers = build_peers(run, args, steps)
    train, evaluation = steps.build_data(run, task, tokenizer, teacher_config if task == SEQ_CLS else None)
    trainer = MutualTrainer(
        model=peers,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=steps.collator_of(run, task, tokenizer),
        processing_class=tokenizer,
        compute_metrics=steps.metrics_for(run, task, teacher_config),
    )
    report = {
        "teacher": run.teacher,  # lent the peers its layers / config; not a teacher of this run
        "trainer": type(trainer).__name__,
        "task": task,
        "student": describe(peers[0]),
        "peers": [describe(p) for p in peers],
        "outputs": {"peer 0 (main metrics)": ".", **{f"peer {k}": f"peer-{k}" for k in range(len(peers))}},
    }
    return steps.train_and_report(trainer, args, report, run)
