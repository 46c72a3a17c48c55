"""The search's solver: a multiple-choice knapsack as a mixed-integer program (HiGHS via SciPy).

Plain arrays in, plain results out, so that it can be checked against brute-force enumeration.
Every choice ``j`` belongs to one slot ``slot[j]``; exactly one choice per slot is taken (each
slot's "untouched" is one of its choices, with score 0 and cost 0). The summed ``score`` of the
taken choices is minimised subject to ``costs @ x <= limits`` (one row per budget: parameters,
FLOPs, latency, each as the change from the origin). K diverse solutions: after each one, the
next must differ from it in at least ``min_distance`` slots.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

# scipy.optimize.milp status codes (see its documentation).
_STATUS = {0: "optimal", 1: "time limit", 2: "infeasible", 3: "unbounded", 4: "other"}
# HiGHS's primal heuristics that ``heuristics=False`` switches off. milp passes options it does not
# know to HiGHS verbatim (with a RuntimeWarning that says so).
_HEURISTIC_OPTIONS = ("mip_heuristic_run_feasibility_jump", "mip_heuristic_run_rins", "mip_heuristic_run_rens")
PRESOLVE, HEURISTICS = True, False  # solve's defaults (benchmarks/solver_time.py); recorded in search.json


@dataclass(frozen=True)
class Solution:
    choices: tuple[int, ...]  # per slot, the index (into the flat choice arrays) taken
    objective: float  # summed score of the taken choices
    costs: tuple[float, ...]  # per budget row, the summed cost of the taken choices
    status: str  # "optimal", or "time limit" for the best point found within the limit
    seconds: float


@contextmanager
def _quiet_stdout() -> Iterator[None]:
    """HiGHS 1.12 prints a stray debug line to the C-level stdout whatever ``disp`` says
    (ERGO-Code/HiGHS#2783); keep it out of ctprune's output."""
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def feasible(choices: list[int] | tuple[int, ...], slot: np.ndarray, costs: np.ndarray,
             limits: np.ndarray, n_slots: int) -> bool:
    """True when ``choices`` take exactly one choice of every slot and meet every limit; checked
    here, not trusted from the solver (scipy's milp has reported optimal for infeasible points)."""
    if sorted(int(slot[j]) for j in choices) != list(range(n_slots)):
        return False
    totals = costs[:, list(choices)].sum(axis=1) if len(costs) else np.zeros(0)
    return bool(np.all(totals <= limits))


def solve(score: np.ndarray, slot: np.ndarray, costs: np.ndarray, limits: np.ndarray, k: int = 1,
          min_distance: int = 1, time_limit: float = 10.0, presolve: bool = PRESOLVE,
          heuristics: bool = HEURISTICS) -> list[Solution]:
    """Up to ``k`` solutions, best first, pairwise differing in at least ``min_distance`` slots.

    score (n,) per choice; slot (n,) ints in [0, S); costs (R, n); limits (R,). Fewer than ``k``
    come back when no further feasible point exists (or the time limit finds none). HiGHS's
    feasibility-jump, RINS and RENS heuristics are off by default: on these small one-hot problems
    the branch and bound finds the optimum at once and spends its time proving it, so they only
    cost time (benchmarks/solver_time.py: the same solutions in about half the time)."""
    n = len(score)
    n_slots = int(slot.max()) + 1 if n else 0
    if k < 1 or not 1 <= min_distance <= max(n_slots, 1):
        raise ValueError(f"need k >= 1 and 1 <= min_distance <= {n_slots}, got {k}, {min_distance}")
    one_per_slot = np.zeros((n_slots, n))
    one_per_slot[slot, np.arange(n)] = 1
    rows = [LinearConstraint(one_per_slot, 1, 1)]
    # Budgets are scaled to about 1 so that HiGHS's absolute tolerances mean the same for FLOPs
    # (~1e9) as for latency (~1e1); feasibility is re-checked below in the original units.
    for r in range(len(costs)):
        scale = max(float(np.abs(costs[r]).max()), abs(float(limits[r])), 1e-12)
        rows.append(LinearConstraint(costs[r] / scale, -np.inf, limits[r] / scale))
    options = {"time_limit": time_limit, "disp": False, "presolve": presolve,
               **{name: heuristics for name in _HEURISTIC_OPTIONS}}
    found: list[Solution] = []
    attempts = 0
    while len(found) < k and attempts < k + 20:
        attempts += 1
        t0 = time.perf_counter()
        with _quiet_stdout(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Unrecognized options", RuntimeWarning)
            res = milp(score, integrality=np.ones(n), bounds=Bounds(0, 1), constraints=rows,
                       options=dict(options))  # milp pops keys from the dict it gets
        seconds = time.perf_counter() - t0
        if res.x is None:
            break
        taken = tuple(int(j) for j in np.flatnonzero(res.x > 0.5))
        # Exclude this point from later rounds, whether it is kept (diversity) or not (a point the
        # solver called feasible but is not: at least one slot must change).
        ok = feasible(taken, slot, costs, limits, n_slots)
        distance = min_distance if ok else 1
        cut = np.zeros(n)
        cut[list(taken)] = 1
        rows.append(LinearConstraint(cut, -np.inf, n_slots - distance))
        if ok:
            found.append(Solution(
                choices=tuple(sorted(taken, key=lambda j: int(slot[j]))),
                objective=float(score[list(taken)].sum()),
                costs=tuple(float(c) for c in costs[:, list(taken)].sum(axis=1)),
                status=_STATUS.get(res.status, str(res.status)), seconds=seconds))
    return found


def smallest_reachable(slot: np.ndarray, cost: np.ndarray) -> float:
    """The least total of one cost row over all choices of one per slot (per slot, its cheapest)."""
    n_slots = int(slot.max()) + 1 if len(slot) else 0
    return float(sum(cost[slot == s].min() for s in range(n_slots)))
