"""Search at Multi30k scale: grid bank -> block tuning -> scores -> search -> verify.

A grid bank of every attention block and FFN of MODEL at keep 0.25 / 0.5 / 0.75, tuned for
``--tune-epochs``; scores (replace one block, KL and loss) on the val subset, with latency;
``-k`` configurations at a FLOPs budget (default 0.6 of the origin), each composed and measured
before finetuning (val loss and val BLEU), against ``--random`` random configurations at the
same budget. Prints one JSON object and a readable line; writes the JSON to ``--output``.
Steps whose output exists in ``--work`` are reused. Usage:
    python benchmarks/search.py MODEL --data-dir DIR --work runs/search-bench \
        --output benchmarks/results/multi30k/search.json
The smallest run (a tiny model on the synthetic corpus, to check that the script works):
    python benchmarks/search.py MODEL --corpus synthetic --tune-epochs 1 -k 4 --random 4 \
        --verify-sentences 64 --work /tmp/search-bench
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ctprune.fileio import write_json
from ctprune.spec import MAX_TOKENS, SCORE_BATCHES, SearchSpec, add_option
from ctprune.stages.prune import PruneArgs, prune
from ctprune.stages.score import ScoreArgs, score_bank
from ctprune.stages.search import SearchArgs, parse_budget, search
from ctprune.stages.search_verify import verify
from ctprune.stages.tune_blocks import TuneArgs, tune_blocks


def timed(step: str, times: dict[str, float], fn: Any, *args: Any, **kw: Any) -> Any:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    times[step] = round(time.perf_counter() - t0, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="origin model folder (the seed preset trained on Multi30k)")
    ap.add_argument("--corpus", default="multi30k", choices=("multi30k", "synthetic"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--work", required=True, help="folder for the banks and configurations (reused)")
    add_option(ap, SearchSpec, "grid")
    ap.add_argument("--tune-epochs", type=int, default=3)
    ap.add_argument("--tune-lr", type=float, default=1e-4)
    ap.add_argument("--flops", default="0.6")
    add_option(ap, SearchSpec, "k", "-k")
    add_option(ap, SearchSpec, "min_distance")
    add_option(ap, SearchSpec, "objective")
    ap.add_argument("--random", type=int, default=16)
    ap.add_argument("--batches", type=int, default=SCORE_BATCHES)
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    ap.add_argument("--latency-repeats", type=int, default=3)  # below LATENCY_REPEATS; kept, so reruns compare
    ap.add_argument("--verify-sentences", type=int, default=None, help="val sentences for BLEU (default all)")
    ap.add_argument("--output", default=None, help="JSON file for the results")
    a = ap.parse_args()
    model, work = Path(a.model), Path(a.work)
    data = {"corpus": a.corpus, "data_dir": a.data_dir}
    times: dict[str, float] = {}
    if not (work / "bank").exists():
        timed("prune_s", times, prune, PruneArgs(model=model, output=work / "bank", grid=a.grid,
                                                 kinds=("attention", "ffn"), **data))
    if not (work / "tuned" / "block_loss.png").exists():  # written last by a finished tuning
        timed("tune_blocks_s", times, tune_blocks, TuneArgs(model=model, bank=work / "bank", output=work / "tuned",
                                                            epochs=a.tune_epochs, lr=a.tune_lr,
                                                            resume=(work / "tuned").exists(), **data))
    scores = timed("score_call_s", times, score_bank, ScoreArgs(model=model, bank=work / "tuned", batches=a.batches,
                                                                max_tokens=a.max_tokens, latency=True,
                                                                latency_repeats=a.latency_repeats, **data))
    args = SearchArgs(model=model, bank=work / "tuned", output=work / "conf.json",
                      budgets=(parse_budget("flops", a.flops),), k=a.k, min_distance=a.min_distance,
                      objective=a.objective,
                      corpus=a.corpus, data_dir=a.data_dir, batches=a.batches, max_tokens=a.max_tokens)
    problem, report = timed("search_call_s", times, search, args)
    v = timed("verify_s", times, verify, problem, report, n_random=a.random, sentences=a.verify_sentences)
    result = {
        "model": str(model), "corpus": a.corpus, "grid": a.grid, "tune_epochs": a.tune_epochs,
        "variants": len(scores["variants"]), "slots": report["slots"], "budget_flops": a.flops,
        "objective": a.objective,
        # Scoring the bank's current scores took total_wall_time_s (over every call that made
        # some); this call scored `scored` variants and reused the rest.
        "scoring_s": scores["total_wall_time_s"], "scored": scores["scored"],
        "scoring_this_call_s": scores["wall_time_s"],
        "latency_measure_s": scores.get("latency", {}).get("wall_time_s"),
        "solver_s": report["solver"]["total_s"], "found": report["solver"]["found"],
        "spearman_found": v["spearman_found"], "spearman_all": v["spearman_all"],
        "spearman_found_by": v["spearman_found_by"],
        "origin_val_bleu": v["origin"]["val_bleu"], "best_found_val_bleu": v["best_found_bleu"],
        "random_best_val_bleu": v["random_best_bleu"], "random_median_val_bleu": v["random_median_bleu"],
        "best_found_val_loss": v["best_found_loss"], "random_best_val_loss": v["random_best_loss"],
        "random_median_val_loss": v["random_median_loss"], "random": v["random"],
        "bleu_sentences": v["bleu_sentences"], "steps_s": times,
    }
    print(json.dumps(result))
    print(f"search: {result['variants']} variants scored in {result['scoring_s']:.1f}s "
          f"({result['scored']} scored by this call, in {result['scoring_this_call_s']:.1f}s); "
          f"{result['found']} configurations at FLOPs <= {a.flops} ({a.objective}) in "
          f"{result['solver_s']:.2f}s of solver; "
          f"Spearman(estimate, val loss) {result['spearman_found']} (found), {result['spearman_all']} "
          f"(found+random); within the found by each objective's estimate "
          + ", ".join(f"{o} {rho}" for o, rho in result["spearman_found_by"].items())
          + f"; val BLEU before finetuning: best found {result['best_found_val_bleu']}, "
          f"random best {result['random_best_val_bleu']} / median {result['random_median_val_bleu']} "
          f"(origin {result['origin_val_bleu']})")
    if a.output:
        write_json(Path(a.output), result)


if __name__ == "__main__":
    main()
