"""Interleaved speed timing (llmkd.evaluation.speed): structure, the paired ratio, order rotation, and that a
period of machine load cancels out of the interleaved speed-up but not out of models timed alone (fake clock:
no timed assertion can flake); one real-time check with a wide margin."""

from __future__ import annotations

import functools
import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import BertForSequenceClassification, bert_config, seeded
from scipy import stats

from llmkd.evaluation import speed
from llmkd.evaluation.speed import measure_speeds, median_interval, round_orders, time_interleaved


class Clock:
    """Fake perf_counter: a model's call advances it by its cost, times `factor` while the load window is on."""

    def __init__(self, load=(0.0, 0.0, 1.0)):
        self.now, self.load = 0.0, load

    def __call__(self) -> float:
        return self.now

    def model(self, cost: float):
        def run(*_args, **_kwargs):
            start, end, factor = self.load
            self.now += cost * (factor if start <= self.now < end else 1.0)

        return run


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(speed, "perf_counter", fake)
    return fake


def test_paired_ratio_of_known_costs_and_json(clock):
    models = {"a": clock.model(1.0), "b": clock.model(2.0), "c": clock.model(8.0)}
    result = time_interleaved(models, [None, None, None], reference="b", rounds=7, warmup=2)
    json.dumps(result)  # JSON-able as it is
    assert result["rounds"] == 7 and result["inputs"] == 3 and result["threads"] == torch.get_num_threads()
    assert len(result["orders"]) == 7
    a, b, c = (result["models"][n] for n in "abc")
    assert a["round_seconds"] == [3.0] * 7 and a["ms"] == a["ms_q1"] == a["ms_q3"] == 1000.0  # per input
    assert a["speedups"] == [2.0] * 7 and a["speedup"] == a["speedup_low"] == a["speedup_high"] == 2.0
    assert b["speedup"] == 1.0 and c["speedup"] == 0.25
    # 5 rounds are too few for a 95% interval of the median (the min..max covers only 94%)
    few = time_interleaved(models, [None], reference="a", rounds=5)["models"]["b"]
    assert few["speedup"] == 0.5 and few["speedup_low"] is None and few["speedup_high"] is None
    assert "speedup" not in time_interleaved(models, [None], rounds=2)["models"]["a"]  # no reference


def test_load_period_cancels_out_of_interleaved_but_not_alone(monkeypatch):
    """Load at 10x for the first 75 s (fake). Timed alone (a's 9 rounds, then b's: the old method) a's block is
    slowed and the 'speed-up' of a over b reads 0.2 instead of 2; interleaved, the load hits a and b alike in the
    same rounds and the per-round median stays 2."""
    load = (0.0, 75.0, 10.0)
    costs = {"a": 1.0, "b": 2.0}
    alone = {}
    for name, cost in costs.items():  # negative control: each model timed alone, one after the other
        clock = Clock(load)
        clock.now = 1000.0 * (name == "b")  # b's block starts after a's, when the load has passed
        monkeypatch.setattr(speed, "perf_counter", clock)
        alone[name] = time_interleaved({name: clock.model(cost)}, [None], rounds=9, warmup=0)["models"][name]
    alone_speedup = alone["b"]["ms"] / alone["a"]["ms"]
    assert alone_speedup == pytest.approx(0.2)
    clock = Clock(load)
    monkeypatch.setattr(speed, "perf_counter", clock)
    models = {name: clock.model(cost) for name, cost in costs.items()}
    result = time_interleaved(models, [None], reference="b", rounds=9, warmup=0)["models"]
    assert max(result["a"]["round_seconds"]) == 10.0  # the load did hit the interleaved rounds too
    paired = result["a"]
    assert paired["speedup"] == pytest.approx(2.0) and paired["speedup_low"] <= 2.0 <= paired["speedup_high"]
    assert abs(math.log(paired["speedup"] / 2)) < 0.01 * abs(math.log(alone_speedup / 2))


def test_order_rotates_through_every_permutation():
    names = ["a", "b", "c"]
    orders = round_orders(names, 60, seed=0)
    assert {tuple(o) for o in orders} == set(itertools.permutations(names))  # no fixed predecessor
    for cycle in range(0, 60, 3):  # every model runs first once per cycle of 3 rounds
        assert sorted(o[0] for o in orders[cycle : cycle + 3]) == names
    assert round_orders(names, 60, seed=0) == orders != round_orders(names, 60, seed=1)


def test_calls_follow_the_orders_and_alternate_per_input():
    calls = []
    models = {n: functools.partial(lambda name, x: calls.append((name, x)), n) for n in "ab"}
    result = time_interleaved(models, ["x0", "x1", "x2"], rounds=4, warmup=1)
    timed = calls[6:]  # the warm-up round's 6 calls first
    for r, order in enumerate(result["orders"]):
        block = timed[6 * r : 6 * r + 6]
        assert [n for n, x in block[:2]] == order and {x for _, x in block[:2]} == {"x0"}
        assert [n for n, _ in block[2:4]] == order[::-1]  # the next input: the other model first
    assert len(calls) == 2 * 3 * 5


def test_median_interval_is_the_order_statistic_interval():
    values = np.arange(1.0, 11.0)[::-1]  # unsorted on purpose
    # independent reference: the widest k with P(Binomial(10, 1/2) < k) <= 2.5% gives [x_(k), x_(n+1-k)]
    k = max(j for j in range(1, 6) if stats.binom.cdf(j - 1, 10, 0.5) <= 0.025)
    assert median_interval(values, 0.95, "s") == {"s": 5.5, "s_low": float(k), "s_high": float(11 - k)}
    assert median_interval([1.0, 2.0, 3.0], 0.95)["median_low"] is None


def test_real_work_eight_times_as_much_measured_slower():
    """Real clock, direction only: 8 matmul layers against 1, timed interleaved on a possibly loaded machine."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 256)
    models = {"one": torch.nn.Sequential(layer), "eight": torch.nn.Sequential(*[layer] * 8)}
    result = time_interleaved(models, [torch.randn(64, 256)] * 3, reference="eight", rounds=7, threads=1)
    one = result["models"]["one"]
    assert result["threads"] == 1 and one["speedup"] > 1.5  # direction only: speed bars live in benchmarks
    assert one["speedup_low"] <= one["speedup"] <= one["speedup_high"]


def test_measure_speeds_on_classifiers():
    small = seeded(BertForSequenceClassification, bert_config(layers=1, hidden=16, num_labels=2), 0).eval()
    big = seeded(BertForSequenceClassification, bert_config(layers=4, num_labels=2), 1).eval()
    out = measure_speeds(
        {"teacher": big, "student": small}, reference="teacher", seq_len=8, batch_size=4, rounds=6, warmup=1
    )
    json.dumps(out)
    assert out["settings"]["method"] == "interleaved" and out["settings"]["rounds"] == 6
    teacher, student = out["models"]["teacher"], out["models"]["student"]
    assert (
        teacher["speedup"] == teacher["speedup_low"] == teacher["latency_speedup"] == 1.0
    )  # paired with itself
    for key in ("latency_ms", "throughput"):
        assert 0 < student[f"{key}_q1"] <= student[key] <= student[f"{key}_q3"]
    assert student["speedup_low"] <= student["speedup"] <= student["speedup_high"]


def test_bad_arguments_are_refused():
    run = lambda x: None  # noqa: E731
    with pytest.raises(ValueError, match="at least one model"):
        time_interleaved({}, [None])
    with pytest.raises(ValueError, match="reference 'c' is not one of"):
        time_interleaved({"a": run}, [None], reference="c")
    with pytest.raises(ValueError, match="rounds >= 1"):
        time_interleaved({"a": run}, [None], rounds=0)
    with pytest.raises(ValueError, match="warmup >= 0"):
        time_interleaved({"a": run}, [None], warmup=-1)
    with pytest.raises(ValueError, match="at least one input"):
        time_interleaved({"a": run}, [])
    with pytest.raises(ValueError, match="not callable"):
        time_interleaved({"a": 3}, [None])
    with pytest.raises(ValueError, match="confidence"):
        time_interleaved({"a": run}, [None], confidence=95)
    with pytest.raises(ValueError, match="threads"):
        time_interleaved({"a": run}, [None], threads=0)
    with pytest.raises(ValueError, match="vocab_size"):
        measure_speeds({"a": run})
    with pytest.raises(ValueError, match="seq_len"):
        measure_speeds({"a": run}, seq_len=0)
