"""Training throughput of the seed preset on Multi30k-shaped batches vs this machine's matmul peak.

Prints one JSON object and one readable line per precision. Usage:
    python benchmarks/train_throughput.py [--steps 20] [--max-tokens 4096 8192]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from ctprune.data.batching import Batch, pad
from ctprune.model.flops import forward_flops
from ctprune.model.transformer import ModelConfig, Seq2SeqTransformer
from ctprune.spec import MAX_TOKENS
from ctprune.training.loop import Recipe, make_optimizer, train_step


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def multi30k_like_batches(max_tokens: int, n: int, vocab: int, seed: int = 0) -> list[tuple[Batch, int]]:
    """Batches with Multi30k's token lengths (sentencepiece 8k: source ~16, target ~15 tokens,
    sd ~5), length-bucketed like the trainer's; returns (batch, forward FLOPs)."""
    rng = random.Random(seed)
    cfg = ModelConfig.preset("seed", vocab)
    out = []
    for _ in range(n):
        s_len = max(4, int(rng.gauss(16, 5)))
        t_len = max(4, s_len + rng.randint(-3, 2))
        b = max(1, max_tokens // (s_len + t_len + 1))
        src = pad([[rng.randrange(4, vocab) for _ in range(s_len)] for _ in range(b)])
        tgt = pad([[2] + [rng.randrange(4, vocab) for _ in range(t_len)] for _ in range(b)])
        out.append((Batch(src, tgt[:, :-1], tgt[:, 1:], torch.arange(b)), b * forward_flops(cfg, s_len, t_len)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, nargs="+", default=[MAX_TOKENS])
    ap.add_argument("--vocab", type=int, default=8000)
    a = ap.parse_args()
    torch.manual_seed(0)
    # The best of three: this machine's speed fluctuates, and the peak is the best it can do.
    peaks = {"fp32": max(matmul_peak(torch.float32) for _ in range(3)),
             "bf16": max(matmul_peak(torch.bfloat16) for _ in range(3))}
    results = []
    for max_tokens in a.max_tokens:
        for precision in ("fp32", "bf16"):
            # The trainer's own step: default recipe (label smoothing, gradient clipping, fused Adam).
            recipe = Recipe(bf16=precision == "bf16")
            model = Seq2SeqTransformer(ModelConfig.preset("seed", a.vocab)).train()
            opt = make_optimizer(model.parameters(), recipe)
            batches = multi30k_like_batches(max_tokens, a.steps + 3, a.vocab)
            # Warm-up steps see every batch shape class before timing starts.
            flops = tokens = 0
            t0 = 0.0
            for i, (batch, fwd) in enumerate(batches):
                if i == 3:
                    t0 = time.perf_counter()
                train_step(model, opt, batch, recipe, recipe.lr)
                if i >= 3:
                    flops += 3 * fwd  # forward + backward (2x forward)
                    tokens += int((batch.tgt_out != 0).sum() + (batch.src != 0).sum())
            dt = time.perf_counter() - t0
            r = {"precision": precision, "max_tokens": max_tokens, "steps": a.steps,
                 "tokens_per_s": round(tokens / dt), "achieved_gflops": round(flops / dt / 1e9, 1),
                 "peak_gflops": round(peaks[precision] / 1e9, 1),
                 "fraction_of_peak": round(flops / dt / peaks[precision], 3),
                 "threads": torch.get_num_threads()}
            results.append(r)
            print(json.dumps(r))
            print(f"{precision} @ {max_tokens} tokens/batch: {r['tokens_per_s']} tokens/s, "
                  f"{r['achieved_gflops']} GFLOP/s = {100 * r['fraction_of_peak']:.0f}% of the "
                  f"{r['peak_gflops']} GFLOP/s {precision} matmul peak", flush=True)
    best = max(results, key=lambda r: r["achieved_gflops"])
    print(json.dumps({"fastest": best["precision"], "fraction_of_peak": best["fraction_of_peak"],
                      "max_fraction_of_own_peak": max(r["fraction_of_peak"] for r in results)}))


if __name__ == "__main__":
    main()
