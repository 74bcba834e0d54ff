"""The search stage of `llmkd compress`: successive halving (plan arithmetic, the known best, ties, the budget on a
fake clock, resume after a kill at every call, progress lines) and the shapes that meet a speed-up (tiny BERTs
whose forward passes advance a fake clock by a known cost: nothing timed can flake)."""

from __future__ import annotations

import itertools
import json
import logging

import pytest
from conftest import BertForSequenceClassification, bert_config, seeded

from llmkd.compress import halving, search
from llmkd.compress.halving import halving_plan, min_steps_for_budget, plan_steps, successive_halving
from llmkd.compress.search import random_student, shape_name, shapes_meeting_speedup
from llmkd.evaluation import speed
from llmkd.students.pruning import candidate_shapes

QUALITY = [0.3, 0.9, 0.5, 0.7, 0.2, 0.8, 0.6, 0.4]  # the best is candidate 1
CANDIDATES = [{"id": i, "q": q} for i, q in enumerate(QUALITY)]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(halving, "monotonic", fake)
    return fake


def trainer(clock, log, *, per_step=1.0, per_call=0.0, fail_at=None):
    """A deterministic train_fn: score q * steps / (steps + 10); costs per_call + per_step * new steps."""

    def train(candidate, steps, state):
        done = 0 if state is None else state["steps"]
        log.append((candidate["id"], steps, done))
        if len(log) == fail_at:
            raise RuntimeError("killed")
        clock.now += per_call + per_step * (steps - done)
        return candidate["q"] * steps / (steps + 10), {"steps": steps}

    return train


@pytest.mark.parametrize(
    "n, eta, counts",
    [(8, 2, [8, 4, 2]), (9, 3, [9, 3]), (10, 3, [10, 3]), (5, 2, [5, 2]), (27, 3, [27, 9, 3]), (1, 2, [])],
)
def test_plan_and_calls_per_round(clock, n, eta, counts):
    plan = halving_plan(n, eta=eta, min_steps=10)
    assert [p["candidates"] for p in plan] == counts
    assert [p["steps"] for p in plan] == [10 * eta**r for r in range(len(counts))]
    log = []
    result = successive_halving(
        [{"id": i, "q": (i * 7 % n) / n} for i in range(n)], trainer(clock, log), budget_seconds=1e9, eta=eta,
        min_steps=10,
    )  # fmt: skip
    per_round = [sum(1 for c in result["calls"] if c["round"] == r) for r in range(len(counts))]
    assert per_round == counts and len(log) == sum(counts) and result["complete"]
    assert clock.now == plan_steps(plan)  # resumed: each call trains only its new steps
    assert result["winner_index"] == max(range(n), key=lambda i: (i * 7 % n) / n)


def test_plan_steps_and_min_steps_for_budget():
    assert plan_steps(halving_plan(8, eta=2, min_steps=10)) == 8 * 10 + 4 * 10 + 2 * 20
    m = min_steps_for_budget(8, eta=2, budget_seconds=1000, seconds_per_step=0.5, seconds_per_call=2.0)
    cost = lambda k: 14 * 2.0 + 0.5 * plan_steps(halving_plan(8, eta=2, min_steps=k))  # noqa: E731
    assert cost(m) <= 1000 < cost(m + 1)


def test_picks_the_known_best_and_writes_its_state(clock, tmp_path):
    path = tmp_path / "search.json"
    result = successive_halving(
        CANDIDATES, trainer(clock, []), budget_seconds=1e9, min_steps=10, state_path=path
    )
    assert result["winner"] == CANDIDATES[QUALITY.index(max(QUALITY))]
    assert result["ranking"][:2] == [1, 5]  # the final round held the best two
    assert [r["kept"] for r in result["rounds"]] == [[1, 5, 3, 6], [1, 5], [1]]
    assert json.loads(path.read_text())["winner_index"] == 1 and result["stopped"] is None
    assert result["states"]["1"] == {"steps": 40}  # the winner's state, to train it on


def test_ties_go_to_the_earlier_candidate_and_nan_ranks_last(clock):
    flat = [{"id": i, "q": 0.5} for i in range(4)]
    assert successive_halving(flat, trainer(clock, []), budget_seconds=1e9, min_steps=1)["winner_index"] == 0
    with_nan = [{"id": 0, "q": float("nan")}, {"id": 1, "q": 0.1}, {"id": 2, "q": 0.2}]
    result = successive_halving(with_nan, trainer(clock, []), budget_seconds=1e9, min_steps=1)
    assert result["winner_index"] == 2 and result["ranking"][-1] == 0 and result["calls"][0]["score"] is None


def test_budget_stops_before_a_round_that_would_exceed_it(clock, tmp_path):
    full = successive_halving(CANDIDATES, trainer(clock, []), budget_seconds=160, min_steps=10)
    assert full["complete"] and full["elapsed_seconds"] == 80 + 40 + 40 == 160  # the plan fits exactly
    clock.now, log, path = 0.0, [], tmp_path / "s.json"
    short = successive_halving(
        CANDIDATES, trainer(clock, log), budget_seconds=159, min_steps=10, state_path=path
    )
    assert not short["complete"] and short["elapsed_seconds"] == 120 <= 159 and len(log) == 12
    assert short["stopped"].startswith("budget") and "round 3/3" in short["stopped"]
    assert short["winner_index"] == 1  # the best of round 2
    longer = successive_halving(
        CANDIDATES, trainer(clock, log), budget_seconds=200, min_steps=10, state_path=path
    )
    assert longer["complete"] and len(log) == 14 and longer["calls"] == full["calls"]


def test_overhead_per_call_enters_the_prediction(clock):
    # round 0: 8 calls of 5 + 10 s = 120 s; round 1 is predicted at 4 * 15 = 60 s -> 180 s > 170
    result = successive_halving(
        CANDIDATES, trainer(clock, [], per_call=5.0), budget_seconds=170, min_steps=10
    )
    assert result["elapsed_seconds"] == 120 and "round 2/3" in result["stopped"]


@pytest.mark.parametrize("kill_at", [1, 2, 8, 9, 13, 14])
def test_resume_after_a_kill_repeats_no_finished_call(clock, tmp_path, kill_at):
    reference_log = []
    reference = successive_halving(
        CANDIDATES, trainer(clock, reference_log), budget_seconds=1e9, min_steps=10
    )
    clock.now, path, first = 0.0, tmp_path / "search.json", []
    with pytest.raises(RuntimeError, match="killed"):
        successive_halving(
            CANDIDATES,
            trainer(clock, first, fail_at=kill_at),
            budget_seconds=1e9,
            min_steps=10,
            state_path=path,
        )
    assert len(json.loads(path.read_text())["calls"]) == kill_at - 1 if kill_at > 1 else not path.exists()
    second = []
    resumed = successive_halving(
        CANDIDATES, trainer(clock, second), budget_seconds=1e9, min_steps=10, state_path=path
    )
    assert first[: kill_at - 1] + second == reference_log  # same calls, same resume states, none twice
    assert resumed["calls"] == reference["calls"] and resumed["winner"] == reference["winner"]
    again = []
    successive_halving(CANDIDATES, trainer(clock, again), budget_seconds=1e9, min_steps=10, state_path=path)
    assert again == []  # a finished search is only read back
    with pytest.raises(ValueError, match="other candidates"):
        successive_halving(
            CANDIDATES[:4], trainer(clock, []), budget_seconds=1, min_steps=10, state_path=path
        )


def test_progress_lines_and_hook(clock, caplog):
    seen = []
    with caplog.at_level(logging.INFO, logger="llmkd.compress.halving"):
        successive_halving(
            CANDIDATES, trainer(clock, []), budget_seconds=1e9, min_steps=10, on_progress=seen.append
        )
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage search, round")]
    assert lines == [s["line"] for s in seen] and len(lines) == 14
    assert lines[0] == "stage search, round 1/3, candidate 1/8, ETA --:--"
    # after one 10 s call: 7 more of round 1, 4 * 10 s in round 2 and 2 * 20 s in round 3 = 150 s
    assert lines[1] == "stage search, round 1/3, candidate 2/8, ETA 02:30" and seen[1]["eta_seconds"] == 150
    assert lines[-1] == "stage search, round 3/3, candidate 2/2, ETA 00:20"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"candidates": []}, "no candidates"),
        ({"eta": 1}, "eta=1"),
        ({"eta": 2.5}, "eta=2.5"),
        ({"budget_seconds": 0}, "budget_seconds=0"),
        ({"min_steps": 0}, "min_steps=0"),
        ({"candidates": [object()]}, "JSON-able"),
        ({"train_fn": lambda c, s, r: (0.5, object())}, "JSON-able"),
        ({"train_fn": lambda c, s, r: 0.5}, r"\(score, state\)"),
    ],
)
def test_bad_search_inputs_are_refused(clock, kwargs, message):
    args = {"candidates": CANDIDATES, "train_fn": trainer(clock, []), "budget_seconds": 10, "min_steps": 1}
    with pytest.raises(ValueError, match=message):
        successive_halving(**(args | kwargs))


# ---- shapes that meet a speed-up ---------------------------------------------------------------------------------

COST = {"c0": 1e-3, "a": 1e-6, "b": 2e-6, "c": 1e-5}  # seconds per batch: c0 + L (a d² + b d f + c d)


def cost(shape: dict) -> float:
    n, d, f = shape["layers"], shape["hidden_size"], shape["intermediate_size"]
    return COST["c0"] + n * (COST["a"] * d * d + COST["b"] * d * f + COST["c"] * d)


@pytest.fixture
def timed(monkeypatch):
    """(teacher, build): every forward pass advances speed's fake perf_counter by the model's cost (times the next
    factor of a per-shape cycle, 1 unless given)."""
    clock = Clock()
    monkeypatch.setattr(speed, "perf_counter", clock)
    teacher = seeded(BertForSequenceClassification, bert_config(), 0)  # 4 layers, d 32, 4 heads, f 64
    jitter = {}

    def attach(model, seconds, factors):
        def advance(*_):
            clock.now += seconds * next(factors)

        model.register_forward_hook(advance)
        return model

    own = {"layers": 4, "hidden_size": 32, "intermediate_size": 64}
    attach(teacher, cost(own), itertools.repeat(1.0))
    built = []

    def build(teacher, shape):
        built.append(shape_name(shape))
        factors = itertools.cycle(jitter.get(shape_name(shape), [1.0]))
        return attach(random_student(teacher, shape), cost(shape), factors)

    return teacher, build, jitter, built, cost(own)


def _shape(n, h, f):
    return {"layers": n, "heads_per_layer": h, "intermediate_size": f}


def test_keeps_the_fast_shapes_and_drops_the_teacher_sized_one(timed):
    teacher, build, _, _, full = timed
    shapes = [_shape(4, 4, 64), _shape(1, 4, 64), _shape(2, 2, 32), _shape(1, 2, 16), _shape(2, 4, 64)]
    table = shapes_meeting_speedup(
        teacher, shapes, 2.5, seq_len=8, batch_size=2, rounds=6, latency_inputs=1, build=build
    )
    json.dumps(table)
    rows = {r["name"]: r for r in table["candidates"]}
    for row in rows.values():  # independent reference: the known costs
        expected = full / cost(row)
        assert row["measured"] and row["speedup"] == pytest.approx(expected) == row["speedup_low"]
        assert row["kept"] == (expected >= 2.5)
    assert (
        rows["L4-H4-D32-I64"]["speedup"] == pytest.approx(1.0)
        and "too slow" in rows["L4-H4-D32-I64"]["reason"]
    )
    assert not rows["L2-H4-D32-I64"]["kept"] and rows["L1-H2-D16-I16"]["kept"]  # both sides occur
    assert table["kept"] == ["L1-H4-D32-I64", "L2-H2-D16-I32", "L1-H2-D16-I16"]  # most computation first
    assert table["fit"] is None and rows["L1-H4-D32-I64"]["parameters"] == sum(
        p.numel() for p in random_student(teacher, _shape(1, 4, 64)).parameters()
    )


def test_screening_measures_the_largest_near_the_target_and_the_largest_clearly_faster(timed):
    teacher, build, _, built, full = timed
    shapes = candidate_shapes(teacher)  # 4 depths x 3 head counts x 4 FFN widths
    table = shapes_meeting_speedup(
        teacher,
        shapes,
        2.5,
        seq_len=8,
        batch_size=2,
        rounds=6,
        latency_inputs=1,
        max_candidates=4,
        build=build,
    )
    rows = table["candidates"]
    assert len(rows) == 48 and len(table["fit"]["probes"]) == 5
    truth = [full / cost(r) for r in rows]
    for row, expected in zip(rows, truth):  # the costs follow the model's form: the fit is exact
        assert row["predicted_speedup"] == pytest.approx(expected, rel=1e-6)
    by_size = sorted(range(48), key=lambda i: -cost(rows[i]))
    near = [i for i in by_size if 2.25 <= truth[i] < 2.75]  # within the 10% margin of the target
    fast = [i for i in by_size if truth[i] >= 2.75]
    assert len(near) >= 2 and len(fast) >= 2  # both halves of the selection are exercised
    largest = near[:2] + fast[:2]
    assert {r["name"] for r in rows if r["measured"]} == {rows[i]["name"] for i in largest}
    assert built[-4:] == [rows[i]["name"] for i in sorted(largest)]  # only those were built for timing
    for row, expected in zip(rows, truth):
        assert row["kept"] == (row["measured"] and expected >= 2.5)
        if not row["measured"]:
            assert row["reason"].startswith("not measured") and "speedup" not in row


def test_lower_bound_criterion_drops_a_shape_that_is_only_fast_on_median(timed):
    teacher, build, jitter, _, full = timed
    steady, noisy = _shape(1, 4, 64), _shape(1, 2, 16)
    jitter["L1-H2-D16-I16"] = [
        1.0,
        1.0,
        full / cost({**noisy, "hidden_size": 16}) / 1.5,
    ]  # every 3rd call slow
    common = dict(seq_len=8, batch_size=2, rounds=9, latency_inputs=1, build=build)
    low = shapes_meeting_speedup(teacher, [steady, noisy], 2.5, **common)
    median = shapes_meeting_speedup(teacher, [steady, noisy], 2.5, criterion="median", **common)
    noisy_low = low["candidates"][1]
    assert noisy_low["speedup_low"] == pytest.approx(1.5) and noisy_low["speedup"] >= 2.5
    assert low["kept"] == ["L1-H4-D32-I64"] and "lower bound ×1.50" in noisy_low["reason"]
    assert median["kept"] == ["L1-H4-D32-I64", "L1-H2-D16-I16"]  # negative control: median keeps it


def test_a_stored_table_is_reused_only_for_the_same_settings(timed, tmp_path):
    teacher, build, _, built, _ = timed
    path, shapes = tmp_path / "speed.json", [_shape(1, 4, 64)]
    common = dict(seq_len=8, batch_size=2, rounds=6, latency_inputs=1, build=build, state_path=path)
    first = shapes_meeting_speedup(teacher, shapes, 2.5, **common)
    assert shapes_meeting_speedup(teacher, shapes, 2.5, **common) == first and built == ["L1-H4-D32-I64"]
    shapes_meeting_speedup(teacher, shapes, 2.0, **common)
    assert len(built) == 2  # another target: timed again


@pytest.mark.parametrize(
    "shapes, kwargs, message",
    [
        (None, {"speedup": 1.0}, "speedup=1.0"),
        ([], {}, "no candidate shapes"),
        (None, {"criterion": "mean"}, "criterion='mean'"),
        (None, {"rounds": 3}, "rounds >= 6"),
        (None, {"max_candidates": 0}, "max_candidates=0"),
        ([_shape(5, 4, 64)], {}, "layers=5"),
        ([{"layers": 1, "heads_per_layer": 2}], {}, "lacks"),
        ([_shape(1, 2, 64) | {"hidden_size": 32}], {}, "hidden_size=16"),
    ],
)
def test_bad_speed_inputs_are_refused(shapes, kwargs, message):
    teacher = seeded(BertForSequenceClassification, bert_config(), 0)
    with pytest.raises(ValueError, match=message):
        shapes_meeting_speedup(teacher, shapes, **({"speedup": 2.5} | kwargs))
    assert search.CRITERIA == ("low", "median")
