"""`ctprune search --refine N`: measured, not estimated, damage for the configurations it returns.

The solver sums one score per module, as if each pruned module hurt the model alone; heavy cuts
interact, and at half the FLOPs the sum misranks them (a uniform cut may beat the solver's pick).
Refinement treats the solver's solutions and the uniform cut as starting points of a local search
over the same choices and budgets. Each candidate is composed from the bank and measured by one
forward pass over the scoring subset, in the objective the scores use (KL to the origin's
next-token distribution, or the cross-entropy). From the best measured candidate not yet
expanded, its neighbours (one slot's choice changed, or two at once: one cut deeper to pay for
another cut shallower), feasible under the budget and ranked by their estimated change, are
measured ``width`` at a time, until ``evals`` measurements (the starting points' included; a
candidate measured for another budget point is reused for free) are spent or no candidate is left
to expand. The k returned are the best measured, ``min_distance`` slots apart.

The subset is part of the validation split, so the val BLEU of a refined pick is slightly
optimistic; test BLEU is not touched by it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ctprune.pruning.bank import compose
from ctprune.pruning.solver import feasible
from ctprune.stages.search import Problem
from ctprune.task import TRANSLATION, kl_per_token


@dataclass(frozen=True)
class Measured:
    taken: tuple[int, ...]  # one flat choice index per slot, in slot order
    value: float  # the objective measured on the scoring subset, per target token
    source: str  # "solver", "uniform" or "local search"


class Measurer:
    """The measured objective of configurations of ``p``, each composed and run once (cached)."""

    def __init__(self, p: Problem) -> None:
        self.p = p
        self.batches = p.batches
        self.real = [b.tgt_out != b.pad_id for b in self.batches]
        self.tokens = sum(int(r.sum()) for r in self.real)
        self.origin_logp = [self._logp(p.origin, b) for b in self.batches] if p.choices.objective == "kl" else []
        self.cache: dict[tuple[int, ...], float] = {}

    @staticmethod
    @torch.no_grad()
    def _logp(model: torch.nn.Module, b: Any) -> torch.Tensor:
        return TRANSLATION.log_probs(model.eval(), b)

    def __call__(self, taken: tuple[int, ...]) -> float:
        if taken not in self.cache:
            model = compose(self.p.origin, self.p.args.bank, self.p.configuration(taken), self.p.index)
            total = 0.0
            for i, (b, real) in enumerate(zip(self.batches, self.real)):
                logp = self._logp(model, b)
                if self.origin_logp:
                    total += float(kl_per_token(self.origin_logp[i], logp).sum())
                else:
                    total += float(F.nll_loss(logp, b.tgt_out[real], reduction="sum"))
            self.cache[taken] = total / max(self.tokens, 1)
        return self.cache[taken]


def neighbours(p: Problem, point: int, taken: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Configurations one or two slot changes from ``taken`` that meet budget point ``point``,
    by their estimated damage (lowest first)."""
    score, slot, costs = p.arrays()
    limits, n = p.limits[point], len(p.choices.slots)
    moves = [(s, j) for s in range(n) for j in np.flatnonzero(slot == s) if j != taken[s]]
    found: dict[tuple[int, ...], float] = {}
    for pair in itertools.chain(((m,) for m in moves), itertools.combinations(moves, 2)):
        if len(pair) == 2 and pair[0][0] == pair[1][0]:
            continue
        new = list(taken)
        for s, j in pair:
            new[s] = int(j)
        if feasible(new, slot, costs, limits, n):
            found[tuple(new)] = float(score[new].sum())
    return sorted(found, key=found.__getitem__)


def distance(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    return sum(x != y for x, y in zip(a, b))


def refine(p: Problem, point: int, starts: list[tuple[tuple[int, ...], str]], k: int, min_distance: int,
           evals: int, width: int = 6, measure: Measurer | None = None) -> list[Measured]:
    """The ``k`` best measured configurations of budget point ``point`` (``min_distance`` slots
    apart), found by the local search described above from ``starts`` ((taken, source) pairs)."""
    measure = measure or Measurer(p)
    before = len(measure.cache)  # candidates measured for another budget point are reused, not counted
    source: dict[tuple[int, ...], str] = {}
    for taken, src in starts:
        source.setdefault(tuple(taken), src)
        measure(tuple(taken))
    expanded: set[tuple[int, ...]] = set()
    while (spent := len(measure.cache) - before) < evals:
        open_ = [t for t in source if t not in expanded]
        if not open_:
            break
        best = min(open_, key=measure)
        expanded.add(best)
        fresh = [t for t in neighbours(p, point, best) if t not in source][:min(width, evals - spent)]
        for t in fresh:
            source[t] = "local search"
            measure(t)
    ranked = sorted(source, key=measure)
    chosen: list[tuple[int, ...]] = []
    for t in ranked:
        if len(chosen) == k:
            break
        if all(distance(t, c) >= min_distance for c in chosen):
            chosen.append(t)
    return [Measured(t, measure(t), source[t]) for t in chosen]
