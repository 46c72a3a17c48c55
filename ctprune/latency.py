"""Latency of greedy decoding with a fixed number of steps (the same work for every model): the one
measurement behind the run's latency job, scoring's per-variant latency and the benchmarks."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ctprune.data.batching import pad
from ctprune.progress import progress

if TYPE_CHECKING:
    from ctprune.arch import Architecture


def greedy_seconds(arch: Architecture, model: nn.Module, src: Tensor, steps: int) -> float:
    """Seconds ``model`` (of architecture ``arch``) takes to decode the padded batch ``src``
    greedily for exactly ``steps`` steps."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        arch.generate(model, src, steps=steps)
    return time.perf_counter() - t0


BATCH = 64  # sentences per batch of batched decoding


def latencies(arch: Architecture, models: list[nn.Module], ids: list[list[int]], steps: list[int], repeats: int = 5,
              batch_size: int = BATCH, pad_id: int = 0) -> list[list[float]]:
    """Seconds of batched greedy decoding of the sentences ``ids`` (``steps[i]`` steps for sentence
    i, batches of similar lengths) by each of ``models``, all of architecture ``arch``: ``repeats``
    rounds in which every model runs once (interleaved, so drifts hit all alike), after one untimed
    warm-up round (allocator and kernel caches)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    chunks = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    device = next(models[0].parameters()).device
    srcs = [(pad([ids[i] for i in c], pad_id).to(device), max(steps[i] for i in c)) for c in chunks]
    times: list[list[float]] = [[] for _ in models]
    for r in progress(range(repeats + 1), desc="latency", unit="round", leave=False):
        for m, model in enumerate(models):
            seconds = sum(greedy_seconds(arch, model, src, n) for src, n in srcs)
            if r:
                times[m].append(seconds)
    return times


def batched_and_single(arch: Architecture, models: list[nn.Module], ids: list[list[int]], steps: list[int],
                       repeats: int, single: int, pad_id: int = 0) -> tuple[list[list[float]], list[list[float]]]:
    """``latencies`` of every sentence in batches, and of the first ``single`` one sentence at a time."""
    return (latencies(arch, models, ids, steps, repeats, pad_id=pad_id),
            latencies(arch, models, ids[:single], steps[:single], repeats, batch_size=1, pad_id=pad_id))
