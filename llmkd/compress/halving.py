"""Successive halving within a time budget (Jamieson & Talwalkar 2016, "Non-stochastic Best Arm Identification and
Hyperparameter Optimization"; the inner loop of Hyperband, Li et al. 2018): every surviving candidate is trained a
little, the best 1/eta go on with eta times as many steps, until one is left.

Round r trains n_r candidates to min_steps * eta**r steps in all (n_0 = all, n_{r+1} = max(1, floor(n_r / eta)));
the search ends when one survivor is left, so n = 8, eta = 2 gives 8 + 4 + 2 = 14 calls and n = 9, eta = 3 gives
9 + 3. `train_fn` resumes a candidate from the state its previous call returned, so round r costs only the
min_steps * (eta**r - eta**(r-1)) new steps per survivor.

Budget: the seconds of every call are measured; before a round starts, its cost is predicted from the calls so
far (seconds = overhead + rate * new steps, fitted) and the search stops instead when the budget would be exceeded,
saying so in `stopped`. A round, once started, is finished (its candidates must be compared at equal steps), and
round 0 always runs (without it there is nothing to rank): choose min_steps with `min_steps_for_budget`.

Resume: after every call the whole state (rounds, survivors, scores, the calls with their seconds, each
candidate's train state, elapsed seconds) is written atomically to `state_path`; a search killed at any point
restarts at the first call that had not finished, and with a deterministic train_fn ends exactly as an
uninterrupted one. Seconds spent in a call that was killed are lost from `elapsed_seconds`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from time import monotonic  # a module-level name: tests replace it with a fake clock

import numpy as np

from llmkd.atomic import write_json

logger = logging.getLogger(__name__)
VERSION = 1


def halving_plan(n: int, *, eta: int = 2, min_steps: int) -> list[dict]:
    """[{"round": r, "candidates": n_r, "steps": min_steps * eta**r}] for n candidates; [] for n = 1 (nothing to
    rank). Raises ValueError for n < 1, eta < 2 or min_steps < 1."""
    _check_numbers(n, eta, min_steps)
    plan, alive = [], n
    while alive > 1:
        plan.append({"round": len(plan), "candidates": alive, "steps": min_steps * eta ** len(plan)})
        alive = max(1, alive // eta)
    return plan


def plan_steps(plan: list[dict]) -> int:
    """Training steps of a whole plan with a train_fn that resumes: sum over rounds of n_r * (s_r - s_{r-1})."""
    previous, total = 0, 0
    for stage in plan:
        total += stage["candidates"] * (stage["steps"] - previous)
        previous = stage["steps"]
    return total


def min_steps_for_budget(
    n: int, *, eta: int = 2, budget_seconds: float, seconds_per_step: float, seconds_per_call: float = 0.0
) -> int:
    """The largest min_steps whose whole plan (`plan_steps` steps, one call per candidate and round) fits in
    `budget_seconds` at the given rates; at least 1. Raises ValueError for a budget or a rate <= 0."""
    if budget_seconds <= 0 or seconds_per_step <= 0 or seconds_per_call < 0:
        raise ValueError(
            f"budget_seconds={budget_seconds}, seconds_per_step={seconds_per_step}, "
            f"seconds_per_call={seconds_per_call}: need a budget and a rate > 0 and an overhead >= 0"
        )
    unit = halving_plan(n, eta=eta, min_steps=1)
    calls = sum(stage["candidates"] for stage in unit)
    steps = plan_steps(unit)  # proportional to min_steps
    if steps == 0:
        return 1
    return max(1, math.floor((budget_seconds - calls * seconds_per_call) / (steps * seconds_per_step)))


def successive_halving(
    candidates: Sequence,
    train_fn: Callable,
    *,
    budget_seconds: float,
    eta: int = 2,
    min_steps: int,
    state_path: str | os.PathLike | None = None,
    on_progress: Callable[[dict], None] | None = None,
) -> dict:
    """Ranks `candidates` by successive halving; higher score is better.

    Args:
        candidates: JSON-able descriptions (e.g. shape dicts); their order breaks ties (the earlier one wins).
        train_fn: `train_fn(candidate, steps, resume_state) -> (score, state)`: train `candidate` until it has
            `steps` steps in all, continuing from `resume_state` (what its previous call returned; None at
            first), and return its validation score (a float; NaN ranks last) and a JSON-able state (e.g. a
            checkpoint folder and a step count; nothing pickled).
        budget_seconds: time for all the calls together (> 0), see the module docstring.
        eta: the fraction kept each round is 1/eta (>= 2). min_steps: steps of round 0 (>= 1).
        state_path: JSON file of the search state, written after every call; an existing one is resumed (it must
            hold the same candidates, eta and min_steps). None: no resume.
        on_progress: called before every call with {"stage", "round", "rounds", "candidate", "candidates",
            "eta_seconds" (None before the first measured call), "elapsed_seconds", "line"}; the same line
            ("stage search, round r/R, candidate c/C, ETA mm:ss") is logged at INFO.

    Returns the final state, a JSON-able dict: "winner" (the candidate), "winner_index", "ranking" (candidate
    indices, best first: by the last round reached, then score, then index), "rounds" [{"round", "steps",
    "candidates" (indices), "scores" {index: score}, "kept"}], "calls" [{"round", "candidate", "steps",
    "new_steps", "score", "seconds"}], "states" {index: train state}, "elapsed_seconds", "budget_seconds",
    "plan", "complete" (all planned rounds ran) and "stopped" (None, or why the search stopped early).
    Raises ValueError for no candidates, candidates that are not JSON-able, eta < 2, min_steps < 1, a budget <= 0,
    a state file from another search, or a train_fn result that is not (number, JSON-able state).
    """
    candidates = _checked_candidates(candidates)
    _check_numbers(len(candidates), eta, min_steps)
    if not budget_seconds > 0:
        raise ValueError(f"budget_seconds={budget_seconds}: give the search a time budget > 0 seconds")
    plan = halving_plan(len(candidates), eta=eta, min_steps=min_steps)
    state = _load(state_path, candidates, eta, min_steps) or _fresh(candidates, eta, min_steps, plan)
    if (
        state["stopped"]
        and state["stopped"].startswith("budget")
        and budget_seconds > state["budget_seconds"]
    ):
        state["stopped"] = None  # resumed with a larger budget: go on
    state["budget_seconds"] = float(budget_seconds)
    while _next_call(state) is not None or _open_round(state, plan):
        r, index = _next_call(state)
        _progress(state, plan, r, index, on_progress)
        _call(state, candidates, train_fn, r, index)
        _save(state, state_path)
        if (
            len(state["calls"]) == 1
            and len(plan)
            and state["calls"][0]["seconds"] * plan[0]["candidates"] > budget_seconds
        ):
            logger.warning(
                "stage search: round 1 alone is predicted to take %.0f s, over the %.0f s budget: it runs in full "
                "(nothing can be ranked without it); lower min_steps (min_steps_for_budget) or raise the budget",
                state["calls"][0]["seconds"] * plan[0]["candidates"],
                budget_seconds,
            )
    return _finish(state, candidates, plan, state_path)


def _check_numbers(n: int, eta: int, min_steps: int) -> None:
    if n < 1:
        raise ValueError("no candidates to search: pass at least one candidate")
    if isinstance(eta, bool) or not isinstance(eta, int) or eta < 2:
        raise ValueError(
            f"eta={eta!r}: keep 1/eta of the candidates each round with an integer eta >= 2 (2 or 3)"
        )
    if isinstance(min_steps, bool) or not isinstance(min_steps, int) or min_steps < 1:
        raise ValueError(f"min_steps={min_steps!r}: round 0 needs an integer number of steps >= 1")


def _checked_candidates(candidates) -> list:
    candidates = list(candidates)
    try:
        return json.loads(json.dumps(candidates))  # the form they take in the state file
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"candidates must be JSON-able (dicts, strings, numbers) to be saved for resume: {err}"
        ) from err


def _fresh(candidates: list, eta: int, min_steps: int, plan: list[dict]) -> dict:
    state = {"version": VERSION, "candidates": candidates, "eta": eta, "min_steps": min_steps, "plan": plan}
    state |= {"rounds": [], "calls": [], "states": {}, "elapsed_seconds": 0.0, "stopped": None}
    if plan:
        state["rounds"].append(_round(0, plan[0]["steps"], list(range(len(candidates)))))
    return state


def _round(r: int, steps: int, members: list[int]) -> dict:
    return {"round": r, "steps": steps, "candidates": members, "scores": {}, "kept": None}


def _load(path, candidates: list, eta: int, min_steps: int) -> dict | None:
    if path is None or not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        state = json.load(handle)
    same = {"version": VERSION, "candidates": candidates, "eta": eta, "min_steps": min_steps}
    differ = [key for key, value in same.items() if state.get(key) != value]
    if differ:
        raise ValueError(
            f"{path} holds a search with other {', '.join(differ)}: pass the same candidates, eta and min_steps "
            "to resume it, or delete the file (or choose another state_path) to start a new search"
        )
    logger.info("stage search: resuming %s after %d calls", path, len(state["calls"]))
    return state


def _next_call(state: dict) -> tuple[int, int] | None:
    """(round, candidate index) of the first call of the open round without a score; None when it is done."""
    if not state["rounds"]:
        return None
    last = state["rounds"][-1]
    todo = [i for i in last["candidates"] if str(i) not in last["scores"]]
    return (last["round"], todo[0]) if todo else None


def _ranked(scores: dict, members: list[int]) -> list[int]:
    """Best first: higher score, then the earlier candidate; a NaN (stored as None) score last."""
    return sorted(members, key=lambda i: (scores[str(i)] is None, -(scores[str(i)] or 0.0), i))


def _open_round(state: dict, plan: list[dict]) -> bool:
    """Closes the finished round; opens the next one if the plan has one and the budget allows it."""
    if not state["rounds"] or state["stopped"]:
        return False
    last = state["rounds"][-1]
    r = last["round"]
    if last["kept"] is None:
        last["kept"] = _ranked(last["scores"], last["candidates"])[
            : max(1, len(last["candidates"]) // state["eta"])
        ]
    if r + 1 >= len(plan):
        return False
    steps = plan[r + 1]["steps"]
    cost = _predict(state["calls"], steps - last["steps"]) * len(last["kept"])
    if state["elapsed_seconds"] + cost > state["budget_seconds"]:
        state["stopped"] = (
            f"budget: round {r + 2}/{len(plan)} ({len(last['kept'])} candidates to {steps} steps) is predicted to "
            f"take {cost:.0f} s and {state['elapsed_seconds']:.0f} s of the {state['budget_seconds']:.0f} s budget "
            f"are spent; the winner is the best of round {r + 1}"
        )
        logger.warning("stage search stopped early: %s", state["stopped"])
        return False
    state["rounds"].append(_round(r + 1, steps, list(last["kept"])))
    return True


def _predict(calls: list[dict], new_steps: int) -> float:
    """Seconds of one call training `new_steps` steps: overhead + rate * steps fitted on the calls so far
    (proportional while they all had the same step count)."""
    if not calls:
        return 0.0
    x = np.array([c["new_steps"] for c in calls], dtype=float)
    y = np.array([c["seconds"] for c in calls], dtype=float)
    if len(set(x.tolist())) > 1:
        rate, overhead = np.polyfit(x, y, 1)
        if rate > 0 and overhead >= 0:
            return float(overhead + rate * new_steps)
    return float(np.median(y / np.maximum(x, 1)) * new_steps)


def _call(state: dict, candidates: list, train_fn: Callable, r: int, index: int) -> None:
    steps = state["rounds"][r]["steps"]
    done = state["rounds"][r - 1]["steps"] if r else 0
    start = monotonic()
    result = train_fn(candidates[index], steps, state["states"].get(str(index)))
    seconds = monotonic() - start
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ValueError(f"train_fn returned {type(result).__name__}: it must return (score, state)")
    score, train_state = result
    try:
        score = float(score)
        json.dumps(train_state)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"train_fn returned score={score!r} and a state of type {type(train_state).__name__}: the score must "
            "be a number and the state JSON-able (a checkpoint path, step counts), to be saved for resume"
        ) from err
    if math.isnan(score):
        logger.warning("stage search: candidate %d scored NaN at %d steps; it ranks last", index, steps)
    stored = None if math.isnan(score) else score
    state["rounds"][r]["scores"][str(index)] = stored
    state["states"][str(index)] = train_state
    state["calls"].append(
        {"round": r, "candidate": index, "steps": steps, "new_steps": steps - done, "score": stored}
        | {"seconds": seconds}
    )
    state["elapsed_seconds"] += seconds


def _remaining_seconds(state: dict, plan: list[dict]) -> float | None:
    """Predicted seconds of every call not yet made, the survivors of later rounds as planned."""
    if not state["calls"]:
        return None
    last = state["rounds"][-1]
    r = last["round"]
    previous = state["rounds"][r - 1]["steps"] if r else 0
    todo = len(last["candidates"]) - len(last["scores"])
    total = todo * _predict(state["calls"], last["steps"] - previous)
    for stage in plan[r + 1 :]:
        total += stage["candidates"] * _predict(
            state["calls"], stage["steps"] - plan[stage["round"] - 1]["steps"]
        )
    return total


def _progress(state: dict, plan: list[dict], r: int, index: int, on_progress) -> None:
    members = state["rounds"][r]["candidates"]
    eta = _remaining_seconds(state, plan)
    clock = "--:--" if eta is None else f"{int(eta) // 60:02d}:{int(eta) % 60:02d}"
    c, n = members.index(index) + 1, len(members)
    line = f"stage search, round {r + 1}/{len(plan)}, candidate {c}/{n}, ETA {clock}"
    logger.info(line)
    if on_progress is not None:
        on_progress(
            {"stage": "search", "round": r + 1, "rounds": len(plan), "candidate": c, "candidates": n}
            | {"eta_seconds": eta, "elapsed_seconds": state["elapsed_seconds"], "line": line}
        )


def _save(state: dict, path) -> None:
    if path is not None:
        write_json(path, state)


def _finish(state: dict, candidates: list, plan: list[dict], path) -> dict:
    finished = [stage for stage in state["rounds"] if stage["kept"] is not None]
    reached = {i: (0, None) for i in range(len(candidates))}  # index -> (rounds reached, last score)
    for stage in finished:
        for i in stage["candidates"]:
            reached[i] = (stage["round"] + 1, stage["scores"][str(i)])
    ranking = sorted(
        reached, key=lambda i: (-reached[i][0], reached[i][1] is None, -(reached[i][1] or 0.0), i)
    )
    state["ranking"] = ranking
    state["winner_index"] = ranking[0]
    state["winner"] = candidates[ranking[0]]
    state["complete"] = len(finished) == len(plan)
    _save(state, path)
    logger.info(
        "stage search done: winner %d of %d after %d calls, %.0f s of %.0f s%s",
        ranking[0], len(candidates), len(state["calls"]), state["elapsed_seconds"], state["budget_seconds"],
        f" (stopped early: {state['stopped']})" if state["stopped"] else "",
    )  # fmt: skip
    return state
