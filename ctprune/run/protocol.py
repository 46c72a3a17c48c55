"""The composability protocol's arithmetic: time to target, censoring, costs, saving, the curve.

Pure functions of finetuning histories (rows of ``history.csv``) and bank costs, so that every
number of a report can be recomputed and tested by hand:

- *Time to target*: the first evaluation (epoch 0 = before finetuning; fractional epochs where
  val BLEU is measured within epochs, ``eval_every``) whose val BLEU reaches the target, within the
  cap of E epochs. A run that never reaches it costs its E epochs and is *censored*.
- *Time to equal quality*: when both sides of a configuration are censored, the time the composed
  side took to reach the baseline's best val BLEU within the cap (stated as such, not as a saving).
- *Cost* is counted in wall seconds and in analytic training FLOPs. The composed side pays the
  shared bank (pruning + block tuning) once; each baseline pays the pruning of its own modules.
- *Saving* = sum of baseline costs / (bank cost + sum of composed costs). A censored baseline
  makes it a lower bound; a censored composed run makes it an upper bound.
- *Curve*: the saving for the first k configurations, k = 1..N, with a bank made of only the
  variants those k configurations use (the teacher pass is paid in full for any bank; a subset's
  tuning seconds are the measured seconds scaled by its share of the tuning FLOPs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ctprune.errors import CtpruneError


@dataclass(frozen=True)
class Cost:
    seconds: float
    flops: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.seconds + other.seconds, self.flops + other.flops)


ZERO = Cost(0.0, 0.0)


@dataclass(frozen=True)
class TimeToTarget:
    epochs: float | None  # None: censored, the target was not reached within the cap; whole epochs as int
    cost: Cost  # finetuning cost up to the target evaluation, or of the whole capped run

    @property
    def censored(self) -> bool:
        return self.epochs is None


def epoch_of(row: dict[str, Any]) -> float:
    """A history row's epoch: an int at whole epochs, else the fraction of epochs trained (1.25)."""
    e = float(row["epoch"])
    return int(e) if e.is_integer() else e


def _at(row: dict[str, Any]) -> TimeToTarget:
    return TimeToTarget(epoch_of(row), Cost(float(row["wall_time_s"]), float(row["train_flops"])))


def _within(history: Sequence[dict[str, Any]], cap: int) -> list[dict[str, Any]]:
    """The rows within the cap, refused when the history ends before it (an unfinished run)."""
    rows = [r for r in history if epoch_of(r) <= cap]
    if not rows or epoch_of(rows[-1]) < cap:
        last = epoch_of(rows[-1]) if rows else None
        raise CtpruneError(f"a history ends at epoch {last} without reaching the target, before the cap of "
                           f"{cap} epochs: the run is unfinished")
    return rows


def time_to_target(history: Sequence[dict[str, Any]], target: float | None, cap: int) -> TimeToTarget:
    """First evaluation at epoch <= ``cap`` with val BLEU >= ``target``; censored at the cap
    otherwise. With no target (None), every run trains the cap: its cost is the cost of the cap's
    epochs."""
    for r in (r for r in history if epoch_of(r) <= cap):
        if target is None and epoch_of(r) == cap or target is not None and float(r["val_bleu"]) >= target:
            return _at(r)
    return TimeToTarget(None, _at(_within(history, cap)[-1]).cost)


@dataclass(frozen=True)
class EqualQuality:
    """Time to equal quality: the baseline's best val BLEU within the cap, and when the composed
    side first reached it (censored: it never did within the cap)."""

    target: float
    composed: TimeToTarget

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "epochs": self.composed.epochs, "cost_seconds": self.composed.cost.seconds,
                "cost_flops": self.composed.cost.flops}


def time_to_equal_quality(baseline: Sequence[dict[str, Any]], composed: Sequence[dict[str, Any]],
                          cap: int) -> EqualQuality:
    """When both sides miss the target: the first evaluation within ``cap`` at which the composed
    side's val BLEU reaches the baseline's best val BLEU within ``cap``."""
    target = max(float(r["val_bleu"]) for r in _within(baseline, cap))
    return EqualQuality(target, time_to_target(composed, target, cap))


@dataclass(frozen=True)
class BankCost:
    """What a bank cost: pruning (seconds; FLOPs negligible), and block tuning (measured seconds,
    FLOPs of the teacher passes, FLOPs per variant)."""

    prune_seconds: float
    tuning_seconds: float
    teacher_flops: float
    variant_flops: dict[str, float]
    scoring_seconds: float = 0.0  # variant scores for `search`, paid by any subset
    n_pruned: int | None = None  # variants in the pruned bank that prune_seconds paid for (default: all tuned)

    def pruning(self, keys: Sequence[str]) -> Cost:
        """Pruning ``keys`` alone: their share of the measured pruning time."""
        n = self.n_pruned if self.n_pruned is not None else len(self.variant_flops)
        return Cost(self.prune_seconds * len(set(keys)) / max(1, n), 0.0)

    def for_variants(self, keys: Sequence[str]) -> Cost:
        """A bank of only ``keys``: pruning them, and tuning them under the full teacher pass."""
        missing = sorted(set(keys) - set(self.variant_flops))
        if missing:
            raise CtpruneError(f"the bank's tuning record has no variant {missing[0]}")
        total = self.teacher_flops + sum(self.variant_flops.values())
        flops = self.teacher_flops + sum(self.variant_flops[k] for k in set(keys))
        seconds = self.tuning_seconds * flops / max(total, 1.0) + self.scoring_seconds
        return self.pruning(keys) + Cost(seconds, flops)


@dataclass(frozen=True)
class Configuration:
    variants: tuple[str, ...]  # the bank keys this configuration uses
    baseline: TimeToTarget
    composed: TimeToTarget


@dataclass(frozen=True)
class Saving:
    baseline: Cost
    bank: Cost
    composed: Cost  # finetuning only; the composed side's total is bank + composed
    censored_baselines: int
    censored_composed: int

    @property
    def seconds(self) -> float:
        return self.baseline.seconds / max(1e-9, self.bank.seconds + self.composed.seconds)

    @property
    def flops(self) -> float:
        return self.baseline.flops / max(1.0, self.bank.flops + self.composed.flops)

    @property
    def bound(self) -> str:
        """'' (exact), 'lower bound', 'upper bound' or 'undetermined' (censored on both sides)."""
        if self.censored_baselines and self.censored_composed:
            return "undetermined"
        return "lower bound" if self.censored_baselines else "upper bound" if self.censored_composed else ""

    def to_dict(self) -> dict[str, Any]:
        return {"ratio_seconds": round(self.seconds, 3), "ratio_flops": round(self.flops, 3),
                "bound": self.bound, "baseline_seconds": round(self.baseline.seconds, 2),
                "baseline_flops": self.baseline.flops, "bank_seconds": round(self.bank.seconds, 2),
                "bank_flops": self.bank.flops, "composed_seconds": round(self.composed.seconds, 2),
                "composed_flops": self.composed.flops, "censored_baselines": self.censored_baselines,
                "censored_composed": self.censored_composed}


def saving(confs: Sequence[Configuration], bank: BankCost, bank_variants: Sequence[str] | None = None) -> Saving:
    """The saving for ``confs``, with a bank of exactly the variants they use, or of
    ``bank_variants`` when given (a search needs every variant of its grid, tuned and scored)."""
    if not confs:
        raise CtpruneError("no configurations to compare")
    baseline = composed = ZERO
    for c in confs:
        baseline = baseline + bank.pruning(c.variants) + c.baseline.cost
        composed = composed + c.composed.cost
    used = sorted(set(bank_variants) if bank_variants is not None else {k for c in confs for k in c.variants})
    return Saving(baseline, bank.for_variants(used), composed, sum(c.baseline.censored for c in confs),
                  sum(c.composed.censored for c in confs))


def saving_curve(confs: Sequence[Configuration], bank: BankCost,
                 bank_variants: Sequence[str] | None = None) -> list[Saving]:
    """The saving for the first k configurations, k = 1..N."""
    return [saving(confs[:k], bank, bank_variants) for k in range(1, len(confs) + 1)]


def flops_at(history: Sequence[dict[str, Any]], epoch: float) -> float:
    """The training FLOPs of a history at its evaluation of ``epoch`` (refused when it has none)."""
    for r in history:
        if epoch_of(r) == epoch:
            return float(r["train_flops"])
    raise CtpruneError(f"a history has no evaluation at epoch {epoch:g}: the run is unfinished")


def scratch_flops(bank: BankCost, finetuning_flops: float) -> float:
    """The training FLOPs of the `scratch` competitor at one budget: what that budget's composed side
    costs a user who wants only this budget, i.e. the whole tuned bank (the teacher passes and every
    variant's tuning, whatever the budget's configurations use; scoring is charged in seconds only,
    as in the saving) plus ``finetuning_flops``, one configuration's finetuning to the equal budget."""
    return bank.for_variants(list(bank.variant_flops)).flops + finetuning_flops
