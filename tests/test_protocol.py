"""The saving arithmetic on hand-made histories: censoring, the shared bank, the curve over k."""

from __future__ import annotations

import pytest

from ctprune.errors import CtpruneError
from ctprune.run.protocol import (
    BankCost,
    Configuration,
    Cost,
    flops_at,
    saving,
    saving_curve,
    scratch_flops,
    time_to_equal_quality,
    time_to_target,
)


def hist(*bleus: float, epoch_s: float = 10.0, epoch_flops: float = 100.0) -> list[dict[str, str]]:
    return [{"epoch": str(e), "val_bleu": str(b), "wall_time_s": str(e * epoch_s),
             "train_flops": str(e * epoch_flops)} for e, b in enumerate(bleus)]


def test_time_to_target_first_epoch_reaching_it() -> None:
    t = time_to_target(hist(20, 28, 31, 33), target=30, cap=3)
    assert (t.epochs, t.cost, t.censored) == (2, Cost(20.0, 200.0), False)
    assert time_to_target(hist(31, 32), target=30, cap=3).cost == Cost(0.0, 0.0)  # at epoch 0: free


def test_a_run_that_never_reaches_the_target_is_censored_at_the_cap() -> None:
    t = time_to_target(hist(20, 25, 27, 29, 35), target=30, cap=3)  # epoch 4 is past the cap
    assert t.censored and t.cost == Cost(30.0, 300.0)


def test_with_no_target_every_run_costs_the_cap() -> None:
    t = time_to_target(hist(20, 95, 96, 97), target=None, cap=2)
    assert (t.epochs, t.cost, t.censored) == (2, Cost(20.0, 200.0), False)


def test_an_unfinished_history_is_refused() -> None:
    with pytest.raises(CtpruneError, match="unfinished"):
        time_to_target(hist(20, 25), target=30, cap=3)


BANK = BankCost(prune_seconds=4.0, tuning_seconds=60.0, teacher_flops=200.0,
                variant_flops={"a": 100.0, "b": 100.0, "c": 200.0, "d": 0.0})


def test_bank_subsets_pay_the_teacher_in_full_and_their_own_variants() -> None:
    assert BANK.for_variants(["a", "b", "c", "d"]) == Cost(4.0 + 60.0, 600.0)
    sub = BANK.for_variants(["a", "c"])
    assert sub.flops == 500.0 and sub.seconds == pytest.approx(2.0 + 60.0 * 500 / 600)


def test_pruning_time_is_shared_over_every_variant_it_pruned() -> None:
    bank = BankCost(prune_seconds=8.0, tuning_seconds=0.0, teacher_flops=0.0, variant_flops={"a": 1.0, "b": 1.0},
                    n_pruned=8)  # the pruned bank also holds variants of earlier plans
    assert bank.pruning(["a", "b"]).seconds == 2.0 and BANK.pruning(["a"]).seconds == 1.0


def test_saving_counts_the_shared_bank_once_and_censored_baselines_as_the_cap() -> None:
    confs = [Configuration(("a", "b"), time_to_target(hist(10, 20, 25, 29), 30, 3),  # censored: 3 epochs
                           time_to_target(hist(31), 30, 3)),
             Configuration(("a", "c"), time_to_target(hist(10, 31), 30, 3),
                           time_to_target(hist(28, 31), 30, 3, )),
             Configuration(("b", "c"), time_to_target(hist(10, 20, 30), 30, 3),
                           time_to_target(hist(30), 30, 3))]
    s = saving(confs, BANK)
    # baseline: pruning 2 of 4 variants each (2 s) + 30 s, 10 s, 20 s of finetuning
    assert s.baseline == Cost(3 * 2.0 + 30 + 10 + 20, 300 + 100 + 200)
    assert s.bank == Cost(3.0 + 60.0 * 600 / 600, 600.0)  # a, b, c: d is not used
    assert s.composed == Cost(10.0, 100.0)
    assert s.seconds == pytest.approx(66 / 73) and s.flops == pytest.approx(600 / 700)
    assert (s.censored_baselines, s.censored_composed, s.bound) == (1, 0, "lower bound")
    curve = saving_curve(confs, BANK)
    assert [c.bank.flops for c in curve] == [400.0, 600.0, 600.0]
    assert curve[0].seconds == pytest.approx((2 + 30) / (2 + 60 * 400 / 600))
    assert curve[-1] == s


def rows(*points: tuple[float, float], epoch_s: float = 10.0, epoch_flops: float = 100.0) -> list[dict[str, str]]:
    """History rows at (epoch, val BLEU) points; time and FLOPs proportional to the epochs trained."""
    return [{"epoch": f"{e:g}", "val_bleu": str(b), "wall_time_s": str(e * epoch_s),
             "train_flops": str(e * epoch_flops)} for e, b in points]


def test_time_to_target_within_an_epoch_is_not_rounded_up_to_the_epoch() -> None:
    h = rows((0, 20), (0.25, 26), (0.5, 29), (0.75, 30.5), (1, 30.2), (1.25, 31), (1.5, 31), (1.75, 32), (2, 33))
    t = time_to_target(h, target=30, cap=2)
    assert (t.epochs, t.cost, t.censored) == (0.75, Cost(7.5, 75.0), False)
    assert time_to_target(h, target=31.5, cap=2).epochs == 1.75
    assert isinstance(time_to_target(h, target=33, cap=2).epochs, int)  # a whole epoch stays an int (2, not 2.0)
    censored = time_to_target(h, target=40, cap=2)
    assert censored.censored and censored.cost == Cost(20.0, 200.0)
    assert time_to_target(h, target=None, cap=1).cost == Cost(10.0, 100.0)


def test_a_sub_epoch_history_that_stops_before_the_cap_is_unfinished() -> None:
    with pytest.raises(CtpruneError, match="ends at epoch 1.5 .* cap of 2 epochs"):
        time_to_target(rows((0, 20), (0.5, 25), (1, 26), (1.5, 27)), target=30, cap=2)


def test_time_to_equal_quality_when_both_sides_miss_the_target() -> None:
    baseline = rows((0, 10), (0.5, 22), (1, 24.5), (1.5, 24), (2, 23), (2.5, 29))  # 2.5 is past the cap
    composed = rows((0, 20), (0.5, 23), (1, 24), (1.5, 24.6), (2, 25))
    assert time_to_target(baseline, 30, 2).censored and time_to_target(composed, 30, 2).censored
    q = time_to_equal_quality(baseline, composed, cap=2)
    assert q.target == 24.5  # the baseline's best within the cap, not 29 at epoch 2.5
    assert (q.composed.epochs, q.composed.cost) == (1.5, Cost(15.0, 150.0))
    assert q.to_dict() == {"target": 24.5, "epochs": 1.5, "cost_seconds": 15.0, "cost_flops": 150.0}
    never = time_to_equal_quality(composed, baseline, cap=2)  # the other way round: 25 is never reached
    assert never.target == 25 and never.composed.censored and never.to_dict()["epochs"] is None


def test_scratch_pays_the_whole_bank_and_one_finetuning_to_the_equal_budget() -> None:
    bank = BankCost(prune_seconds=5.0, tuning_seconds=50.0, teacher_flops=400.0,
                    variant_flops={"a@0.5": 30.0, "b@0.5": 70.0}, scoring_seconds=9.0)
    history = [{"epoch": "0", "train_flops": "0"}, {"epoch": "0.5", "train_flops": "60"},
               {"epoch": "1", "train_flops": "120"}, {"epoch": "2", "train_flops": "240"}]
    assert flops_at(history, 1) == 120.0 and flops_at(history, 0.5) == 60.0
    # every variant's tuning and the teacher, whatever the budget's configurations use; scoring costs no FLOPs
    assert scratch_flops(bank, flops_at(history, 1)) == 400.0 + 30.0 + 70.0 + 120.0
    with pytest.raises(CtpruneError, match="no evaluation at epoch 3"):
        flops_at(history, 3)
