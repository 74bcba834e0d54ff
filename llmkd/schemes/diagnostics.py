"""Training diagnostics: is distillation doing anything? Logged through `Trainer.log` beside the terms.

Keys of the training logs. They are measured on the optimizer steps that log (every micro-batch of the step,
on every process) and tallied like the terms (llmkd.schemes.tally: sums and counts, summed over processes and
divided once), so gradient accumulation and several processes log what one process with the whole batch would;
the terms themselves cover every step since the last log:

- ``teacher_entropy``, ``student_entropy``: H(softmax(z / T)) in nats at the logit term's temperature T, per
  target — per example for classifiers; for causal LMs per next-token position the logit term uses (the shifted
  positions; padding and -100 labels excluded). A uniform distribution over V classes has log V.
- ``agreement``: the fraction of those targets where the student's argmax is the teacher's.
- ``topk_mass``: with a top-k teacher-logit cache, the probability the k cached entries hold (at the cache's
  temperature), per target. The cache keeps no full distribution, so ``teacher_entropy`` is not logged there.
- ``<term>/layer<t>-><s>``: a feature term's value for each mapped layer pair, teacher layer t into student
  layer s (hidden, attention, relation, attention_relation terms with two or more pairs;
  llmkd.knowledge.base.LayerKnowledge.layer_values). Evaluation logs them too (``eval_<term>/layer<t>-><s>``).

The first logit term of each student and named teacher is measured: mutual learning logs ``peer<k>/agreement``
(its teacher: the mean of the other peers' distributions), an ensemble's per-member terms ``agreement@<name>``.
Runs without a logit term over the student's own ids log none of the first four: cross-tokenizer (ULD: the two
sides' positions are not aligned), early exits (their terms compare exits, not a teacher), regression scores.

Cost: nothing on the steps that do not log. On a logging step: no extra forward pass; under no_grad, from the
logits the terms already have, a bounded chunk of positions at a time (at most ``logit_chunk_size`` rows and
2^24 floats per temporary), about one more pass of the logit loss over the vocabulary. The fused logit path never
forms the logits: there they are recomputed chunk by chunk from the last hidden states and both lm_heads (two
extra vocabulary matmuls). Why only logging steps: with a 32k vocabulary and tiny models (the vocabulary
dominating), measuring every step cost about +30% per step on CPU. ``diagnostics: false`` (DistillationConfig) turns
all of this off. With ``logging_strategy: epoch`` the last step of an epoch is not known ahead: every step is
measured.

The no-signal guard (`Diagnostics.check`) reads the first GUARD_WINDOWS logs and warns once, naming the cause it
can tell and its fix, when no distillation term gives a signal: identical outputs, flat distributions at
temperature T, or no unmasked positions.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from llmkd.knowledge.counts import targets
from llmkd.modeling import SEQ_CLS, output_head

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

KEYS = ("teacher_entropy", "student_entropy", "agreement", "topk_mass")
GUARD_WINDOWS = 3  # the guard reads this many first logs ("from the first steps"), then stays silent
ZERO = 1e-4  # |term| at or below this (after T²) gives no gradient signal worth the name
FLAT = 1e-4  # nats: log V − H below this for both sides is a uniform distribution at float32 precision
MAX_FLOATS = 2**24  # per (rows, V) temporary: 64 MB of float32

CAUSES = {
    "identical": (
        "identical outputs: the student's outputs equal the teacher's (top-1 agreement 1, terms ~0)",
        "start the student from fewer or re-initialised layers (llmkd.students.student_from_teacher) or another "
        "checkpoint; a copy of the teacher has nothing to learn from it",
    ),
    "flat": (
        "flat distributions at temperature T={T:g}: teacher and student soft targets are within {flat:g} nats of "
        "uniform over {V} classes, so the logit terms are float32 rounding noise",
        "lower the temperature (1-4 is usual: the config's `temperature` or the term's `temperature:`)",
    ),
    "masked": (
        "no unmasked positions: every target is padding or labelled -100",
        "check the labels (-100 marks ignored positions), the attention mask, max_length truncation and any "
        "completion-only masking",
    ),
    "zero": (
        "the distillation terms are ~0 (|value| <= {zero:g})",
        "check the term weights, the layer map and that the student and the teacher differ",
    ),
}


def entropy(logits: Tensor, temperature: float) -> Tensor:
    """(..., V) logits -> (...,) H(softmax(logits / T)) in nats, float32; -inf logits count as p = 0."""
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(log_p.exp() * log_p.masked_fill(torch.isneginf(log_p), 0.0)).sum(-1)


def _chunks(mask: Tensor, rows: int):
    """Index tuples of the true entries of `mask`, `rows` at a time (advanced indexing picks (rows, ...))."""
    index = mask.nonzero(as_tuple=True)
    for start in range(0, len(index[0]), rows):
        yield tuple(i[start : start + rows] for i in index)


def _rows(chunk_size: int, width: int) -> int:
    return max(1, min(chunk_size, MAX_FLOATS // max(width, 1)))


def soft_target_stats(
    student, teacher, mask: Tensor, temperature: float, chunk_size: int, width: int
) -> dict:
    """{key: (sum, count)} of both entropies and agreement over the true entries of `mask`.

    `student` / `teacher` map an index tuple of `mask`'s shape to (n, V) logits (a slice, or logits recomputed
    from hidden states); `width` is V. Runs under no_grad, chunk by chunk.
    """
    sums = torch.zeros(3, device=mask.device)
    for where in _chunks(mask, _rows(chunk_size, width)):
        s, t = student(where), teacher(where)
        agree = (s.argmax(-1) == t.argmax(-1)).sum()
        sums += torch.stack([entropy(t, temperature).sum(), entropy(s, temperature).sum(), agree.float()])
    count = mask.sum()
    return {
        "teacher_entropy": (sums[0], count),
        "student_entropy": (sums[1], count),
        "agreement": (sums[2], count),
    }


def topk_stats(
    student, ids: Tensor, logprobs: Tensor, mask: Tensor, temperature: float, chunk_size: int, width: int
) -> dict:
    """{key: (sum, count)} of the student's entropy, agreement with the cache's top-1 and the cached top-k mass.

    `ids` / `logprobs`: a cache's (..., k) top-k ids (most likely first) and log-probabilities (at the cache's
    temperature), aligned with `mask`; `student` as in soft_target_stats, `width` its V.
    """
    sums = torch.zeros(3, device=mask.device)
    for where in _chunks(mask, _rows(chunk_size, width)):
        s = student(where)
        agree = (s.argmax(-1) == ids[where][..., 0]).sum().float()
        mass = logprobs[where].float().logsumexp(-1).exp().sum()
        sums += torch.stack([entropy(s, temperature).sum(), agree, mass])
    count = mask.sum()
    return {"student_entropy": (sums[0], count), "agreement": (sums[1], count), "topk_mass": (sums[2], count)}


class Probe:
    """One measured logit term: where its keys go (``peer<k>/`` prefix, ``@<teacher>`` suffix)."""

    def __init__(self, term):
        self.term = term
        self.prefix = term.name.removesuffix(term.term.name)  # "peer1/" for a mutual peer's copy, else ""
        self.suffix = f"@{term.term.teacher}" if term.term.teacher else ""
        self.temperature = term.temperature_value
        self.width: int | None = None  # V, once seen

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}{self.suffix}"

    def covers(self, term) -> bool:
        """Whether `term` reads this probe's distributions (same student, teacher and temperature)."""
        return (
            getattr(term, "kind", "") == "logits"
            and term.name.removesuffix(term.term.name) == self.prefix
            and term.term.teacher == self.term.term.teacher
            and term.temperature_value == self.temperature
        )


class Diagnostics:
    """The trainer's diagnostics: `observe` after each training term, `check` at each log (see the module doc)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.enabled = bool(getattr(trainer.args, "diagnostics", True))
        self.probes: dict[str, Probe] = {}
        measurable = not trainer.pair.regression and not trainer.source.input_prefix
        for term in trainer.terms if self.enabled and measurable else ():
            if getattr(term, "kind", "") == "logits":
                probe = Probe(term)
                if all((p.prefix, p.suffix) != (probe.prefix, probe.suffix) for p in self.probes.values()):
                    self.probes[term.name] = probe
        self.done = not self.enabled  # the guard has fired or read its GUARD_WINDOWS logs
        self.warning: str | None = None  # the guard's message, once it fired

    # ---- per micro-batch ----------------------------------------------------------------------------
    def observe(self, term, student_out, teacher_out, batch: dict) -> None:
        """Tallies the diagnostics of one training term's batch ("train" split), when it is a measured one."""
        probe = self.probes.get(term.name)
        if probe is None or teacher_out is None or not self._logs_this_step():
            return
        with torch.no_grad():
            stats = self._stats(probe, term, student_out, teacher_out, batch)
        for name, (total, count) in (stats or {}).items():
            self.trainer.tally.add("train", probe.key(name), total, count)

    def _stats(self, probe, term, student_out, teacher_out, batch) -> dict | None:
        if getattr(term, "peer", None) is not None:  # a mutual peer's teacher: the other peers' mean
            teacher_out = _other_peers(term, teacher_out)
        logits, T, chunk = student_out.logits, probe.temperature, term.chunk_size
        if term.task == SEQ_CLS:
            probe.width = logits.shape[-1]
            everyone = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
            return soft_target_stats(
                _pick(logits), _pick(teacher_out.logits), everyone, T, chunk, probe.width
            )
        mask = targets(batch, term.task)
        if term.cached:
            top, probe.width = teacher_out.topk, logits.shape[-1]  # unsliced, as in the term: shift here
            return topk_stats(
                _pick(logits[:, :-1]), top.ids[:, :-1], top.logprobs[:, :-1], mask, T, chunk, probe.width
            )
        rows = slice(term.vocab_rows)
        if term.fused and logits.shape[1] == 1 < batch["input_ids"].shape[1]:
            student, teacher = (
                _head_logits(m, out, rows) for m, out in zip(term._heads, (student_out, teacher_out))
            )
            probe.width = output_head(term._heads[0]).weight[rows].shape[0]
            return soft_target_stats(student, teacher, mask, T, chunk, probe.width)
        s, t = logits[:, :-1, rows], teacher_out.logits[:, :-1, rows]
        probe.width = s.shape[-1]
        return soft_target_stats(_pick(s), _pick(t), mask, T, chunk, probe.width)

    def _logs_this_step(self) -> bool:
        """Whether the optimizer step now running ends in a log (transformers' DefaultFlowCallback's rule)."""
        state, args = self.trainer.state, self.trainer.args
        step = state.global_step + 1
        if step == 1 and args.logging_first_step:
            return True
        strategy = str(getattr(args.logging_strategy, "value", args.logging_strategy))
        if strategy == "steps":
            return bool(state.logging_steps) and step % state.logging_steps == 0
        return strategy == "epoch"  # the last step of an epoch is not known here: every step

    # ---- the no-signal guard ------------------------------------------------------------------------
    def check(self, logs: dict) -> str | None:
        """Called with each training log (terms and diagnostics already reduced): warns once, within the first
        GUARD_WINDOWS logs, when no distillation term gives a signal (or a logit term is flat: its value is then
        rounding noise times T², worse than none). Returns the warning when it fires."""
        if self.done:
            return None
        # Logs before this one, restored on resume: "early" counts from the run's start, not the process's.
        self.done = sum("loss" in h for h in self.trainer.state.log_history) + 1 >= GUARD_WINDOWS
        causes = self.no_signal_causes(logs)
        if not causes:
            return None
        self.done = True
        lines = [f"{', '.join(names)}: {cause} — fix: {fix}" for names, cause, fix in causes]
        self.warning = f"distillation gives no signal at step {self.trainer.state.global_step}: " + "; ".join(
            lines
        )
        if self.trainer.is_world_process_zero():
            logger.warning(self.warning)
        return self.warning

    def _distillation_terms(self) -> list:
        return [t for t in self.trainer.terms if t.needs]  # the task loss (loss_ce) reads no teacher

    def no_signal_causes(self, logs: dict) -> list[tuple[list[str], str, str]]:
        """[(term names, cause, fix)] when every distillation term of this log is without signal, or a logit
        term's distributions are flat; [] otherwise."""
        found = {t.name: self._term_cause(t, logs) for t in self._distillation_terms()}
        flat = any(c is not None and c[0] == "flat" for c in found.values())
        if not found or (None in found.values() and not flat):
            return []
        causes: dict[tuple[str, str], list[str]] = {}
        for name, cause in found.items():
            if cause is not None:
                text, fix = CAUSES[cause[0]]
                causes.setdefault((text.format(**cause[1], flat=FLAT, zero=ZERO), fix), []).append(name)
        return [(names, text, fix) for (text, fix), names in causes.items()]

    def _term_cause(self, term, logs: dict) -> tuple | None:
        """(cause, facts) for a term without signal in `logs`, None for one with a signal."""
        value = logs.get(term.name)
        if value is None:
            return ("masked", {})
        probe = next((p for p in self.probes.values() if p.covers(term)), None)
        if probe is not None and self._flat(probe, logs):
            return ("flat", {"T": probe.temperature, "V": probe.width})
        if abs(value) > ZERO:
            return None
        agreement = [logs[k] for p in self.probes.values() if (k := p.key("agreement")) in logs]
        return ("identical", {}) if all(a == 1.0 for a in agreement) else ("zero", {})

    @staticmethod
    def _flat(probe: Probe, logs: dict) -> bool:
        if not probe.width or probe.key("student_entropy") not in logs:
            return False
        top = math.log(probe.width)
        student_flat = top - logs[probe.key("student_entropy")] < FLAT
        if probe.key("teacher_entropy") in logs:
            return student_flat and top - logs[probe.key("teacher_entropy")] < FLAT
        k = getattr(probe.term.source, "k", None)  # a top-k cache: a flat teacher's k entries hold k / V
        mass = logs.get(probe.key("topk_mass"))
        return student_flat and k is not None and mass is not None and mass - k / probe.width < FLAT


def _pick(tensor: Tensor):
    """Rows of `tensor` at an index tuple over its leading dims (a copy of those rows only)."""
    return lambda where: tensor[where]


def _head_logits(model, out, rows: slice):
    """Rows of lm_head(last hidden state) at an index tuple over (B, T-1): the fused path's logits, per chunk."""
    head = output_head(model)
    hidden = out.hidden_states[-1][:, :-1]
    bias = None if head.bias is None else head.bias[rows]
    return lambda where: F.linear(hidden[where], head.weight[rows], bias)


def _other_peers(term, teacher_out):
    from llmkd.schemes.cohort import mean_prediction, peer_name  # here: cohort is a scheme module

    others = [out for name, out in teacher_out.members.items() if name != peer_name(term.peer)]
    return mean_prediction(others, term.temperature_value)
