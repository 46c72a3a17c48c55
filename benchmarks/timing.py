"""Interleaved timing, shared by the serving benchmarks: one untimed warm-up round, then ``runs``
rounds, each calling every cell once in a shuffled order (so a drift of the machine hits every
cell alike); milliseconds per call, in inference mode."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any, TypeVar

import torch

K = TypeVar("K", bound=Hashable)


def interleaved_ms(calls: Mapping[K, Callable[[], Any]], runs: int, seed: int = 0) -> dict[K, list[float]]:
    """Each cell's ``runs`` timings in ms (the warm-up round left out)."""
    rng = random.Random(seed)
    order = list(calls)
    times: dict[K, list[float]] = {k: [] for k in calls}
    with torch.inference_mode():
        for r in range(runs + 1):
            rng.shuffle(order)
            for k in order:
                t0 = time.perf_counter()
                calls[k]()
                if r:
                    times[k].append(1e3 * (time.perf_counter() - t0))
    return times


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10, method="inclusive")[-1]
