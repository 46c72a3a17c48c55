"""Stage `score`: bank -> the same bank, with every variant's score stored in its index.

A variant's score is the damage it does alone ("replace one block", as in Puzzle): swap it into
the otherwise intact origin and measure, teacher-forced on a fixed validation subset, the mean
KL divergence of the next-token distribution from the origin's, and the cross-entropy loss.
The origin runs once per batch, traced (``Architecture.traced_logits``), and each variant reruns
only what follows it (``logits_after``: for ctprune's own Transformer, a variant in layer i reruns
layers i.., a decoder variant never the encoder; other architectures rerun the whole model).

Scores carry the fingerprints of the origin, the subset (its token ids) and each variant's
weights; they are reused while all three match and recomputed, per variant, when one changes.
With ``latency``, each variant's latency contribution is measured in context too.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctprune.arch import Architecture, arch_of
from ctprune.data.batching import Batch, TokenizedSplit
from ctprune.data.corpus import default_splits, load_split
from ctprune.data.tokenizer import Tokenizer
from ctprune.device import resolve_device
from ctprune.latency import greedy_seconds
from ctprune.model.checkpoint import load_model_folder
from ctprune.pruning.bank import Bank
from ctprune.pruning.configs import model_fingerprint
from ctprune.pruning.surgery import swapped
from ctprune.spec import MAX_TOKENS, SCORE_BATCHES
from ctprune.stages.args import ScoreArgs
from ctprune.task import kl_per_token

SCORES_FORMAT = "ctprune-scores/1"


@dataclass(frozen=True)
class Subset:
    """The fixed validation subset: teacher-forced batches and the fingerprint of their ids."""

    batches: list[Batch]
    fingerprint: str
    meta: dict[str, Any]


def validation_subset(tok: Tokenizer, max_len: int, corpus: str, data_dir: str | None = None,
                      batches: int = SCORE_BATCHES, max_tokens: int = MAX_TOKENS) -> Subset:
    """The first ``batches`` token-budget batches of the validation split in a fixed shuffled
    order (so short and long sentences both appear). ``batches`` and ``max_tokens`` are checked
    by the stage's Args (``ScoreArgs``, ``SearchArgs``)."""
    split = default_splits(corpus)[1]
    chosen = TokenizedSplit(load_split(corpus, split, data_dir), tok, max_len).batches(
        max_tokens, shuffle_seed=0)[:batches]
    h = hashlib.sha256()
    for b in chosen:
        for t in (b.src, b.tgt_out):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
    n_src = sum(b.n_src_tokens for b in chosen)
    n_tgt = sum(b.n_tgt_tokens for b in chosen)
    sentences = sum(len(b.src) for b in chosen)
    meta = {"fingerprint": h.hexdigest()[:16], "corpus": corpus, "split": split,
            "batches": len(chosen), "max_tokens": max_tokens, "sentences": sentences,
            "target_tokens": n_tgt,
            # Mean sentence lengths: the lengths at which FLOPs budgets are counted.
            "src_len": max(1, round(n_src / sentences)), "tgt_len": max(1, round(n_tgt / sentences))}
    return Subset(chosen, meta["fingerprint"], meta)


def variant_digest(bank: Path, entry: dict[str, Any]) -> str:
    """Hash of a variant's weights file: scores measured on other weights are stale."""
    return hashlib.sha256((Path(bank) / entry["file"]).read_bytes()).hexdigest()[:16]


def _kl_and_loss(logits: Tensor, origin_logp: Tensor, tgt_out: Tensor, pad_id: int) -> tuple[float, float]:
    """Summed (over real target tokens) KL(origin || variant) and cross-entropy."""
    real = tgt_out != pad_id  # (B, T)
    logp = logits.float().log_softmax(-1)[real]  # (N, V)
    ref = origin_logp[real]
    kl = kl_per_token(ref, logp).sum()
    return float(kl), float(F.nll_loss(logp, tgt_out[real], reduction="sum"))


def measure_latency(arch: Architecture, origin: nn.Module, variants: dict[str, tuple[str, nn.Module]],
                    subset: Subset, repeats: int) -> dict[str, Any]:
    """Milliseconds of batched greedy decoding (the subset's first batch, a fixed number of
    steps) of the origin and, per variant, the origin with that variant swapped in. Origin and
    variant runs alternate, so slow drifts of the machine cancel in the difference. ``repeats``
    (at least 1) is checked by ``ScoreArgs``."""
    src, steps = subset.batches[0].src, subset.batches[0].tgt_in.shape[1]
    greedy_seconds(arch, origin, src, steps)  # warm-up
    out: dict[str, Any] = {"unit": "ms per greedy decoding of the latency batch",
                           "batch": list(src.shape), "steps": steps, "repeats": repeats, "variants": {}}
    origin_all: list[float] = []
    for key, (name, module) in variants.items():
        diffs = []
        for _ in range(repeats):
            o = greedy_seconds(arch, origin, src, steps)
            with swapped(arch, origin, name, module):
                v = greedy_seconds(arch, origin, src, steps)
            origin_all.append(o)
            diffs.append(1000 * (v - o))
        out["variants"][key] = {"delta_ms": round(statistics.median(diffs), 4),
                                "spread_ms": round(max(diffs) - min(diffs), 4)}
    if not origin_all:
        origin_all = [greedy_seconds(arch, origin, src, steps) for _ in range(repeats)]
    out["origin_ms"] = round(1000 * statistics.median(origin_all), 4)
    out["origin_spread_ms"] = round(1000 * (max(origin_all) - min(origin_all)), 4)
    return out


def score_bank(args: ScoreArgs) -> dict[str, Any]:
    """Score every variant of ``args.bank`` whose score is missing or stale (all with ``force``),
    store the scores in the bank's index and return them (``scored``: how many were computed)."""
    model_dir, corpus, data_dir = args.model, args.corpus, args.data_dir
    store = Bank.open(args.bank)
    model_fp = model_fingerprint(model_dir)
    store.check_model(model_fp)
    dev = resolve_device(args.device)
    origin, tok, _ = load_model_folder(model_dir, dev)
    arch = arch_of(origin)
    subset = validation_subset(tok, arch.max_len(origin), corpus, data_dir, args.batches, args.max_tokens)
    digests = {k: variant_digest(store.path, e) for k, e in store.variants.items()}
    old = store.index.get("scores") or {}
    same_ground = (not args.force and old.get("model_fingerprint") == model_fp
                   and old.get("subset", {}).get("fingerprint") == subset.fingerprint)
    kept = {k: s for k, s in (old.get("variants", {}) if same_ground else {}).items()
            if digests.get(k) == s.get("digest")}
    todo = [k for k in store.variants if k not in kept]
    modules = {k: store.variants[k]["module"] for k in todo}
    variants = {k: store.load_variant(k, origin).to(dev).eval() for k in todo}
    t0 = time.perf_counter()
    sums = {k: [0.0, 0.0] for k in todo}
    origin_loss = 0.0
    for b in [b.to(dev) for b in subset.batches]:
        with torch.no_grad():
            logits, trace = arch.traced_logits(origin, b.src, b.tgt_in)  # the origin once per batch
            logp = logits.float().log_softmax(-1)  # (B, T, V)
            del logits  # not B x T x V twice while the variants run
            real = b.tgt_out != b.pad_id
            origin_loss += float(F.nll_loss(logp[real], b.tgt_out[real], reduction="sum"))
            for k in todo:
                with swapped(arch, origin, modules[k], variants[k]):
                    after = arch.logits_after(origin, modules[k], b.src, b.tgt_in, trace)
                kl, loss = _kl_and_loss(after, logp, b.tgt_out, b.pad_id)
                sums[k][0] += kl
                sums[k][1] += loss
    n = subset.meta["target_tokens"]
    fresh = {k: {"kl": round(sums[k][0] / n, 6), "loss": round(sums[k][1] / n, 6), "digest": digests[k]}
             for k in todo}
    seconds = time.perf_counter() - t0
    scores: dict[str, Any] = {
        "format": SCORES_FORMAT, "model_fingerprint": model_fp, "subset": subset.meta,
        "origin": {"loss": round(origin_loss / n, 6)}, "device": dev,
        "variants": {k: kept.get(k) or fresh[k] for k in store.variants},
        "scored": len(todo), "reused": len(kept), "wall_time_s": round(seconds, 3),
        # every second ever spent scoring this bank (a rerun that reuses every score adds nothing)
        "total_wall_time_s": round(old.get("total_wall_time_s", old.get("wall_time_s", 0.0))
                                   + (seconds if todo else 0.0), 3),
    }
    old_latency = old.get("latency") if same_ground else None
    if args.latency and not (old_latency and old_latency.get("digests") == digests):
        t1 = time.perf_counter()
        every = {k: (e["module"], store.load_variant(k, origin).to(dev).eval())
                 for k, e in store.variants.items()}
        scores["latency"] = {**measure_latency(arch, origin, every, subset, args.latency_repeats),
                             "digests": digests, "wall_time_s": round(time.perf_counter() - t1, 3)}
    elif old_latency and old_latency.get("digests") == digests:
        scores["latency"] = old_latency
    store.set_scores(scores)
    store.write()
    return scores
