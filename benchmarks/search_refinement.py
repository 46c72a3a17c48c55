"""Does the search beat the uniform cut before finetuning, and does measured refinement help?

On a scored grid bank (a `ctprune run` with [search] leaves one under RUN/banks/tuned-*), per
FLOPs budget: the uniform cut (every block at one keep ratio, or the nearest pair), the solver's
pick (the lowest summed score), and the best of `--refine N` measured candidates around the
solver's solutions and the uniform cut (ctprune/stages/search_refine.py). Each is composed from
the bank, untrained further, and measured on the whole val split (teacher-forced loss, greedy
BLEU) and on the test split (greedy BLEU, which the refinement never saw: its measurements use
the scoring subset, part of val). Prints one JSON object and a readable line per budget; writes
the JSON to ``--output``. Usage:
    python benchmarks/search_refinement.py RUN/origin --bank RUN/banks/tuned-XXXX \
        --data-dir ../shared/data/multi30k --flops 0.75 0.5 0.35 --refine 60 \
        --output benchmarks/results/multi30k-frontier/search-refinement.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from ctprune.data.batching import TokenizedSplit
from ctprune.data.corpus import default_splits, load_split, test_splits
from ctprune.fileio import write_json
from ctprune.pruning.bank import compose
from ctprune.spec import MAX_TOKENS, SearchSpec, add_option
from ctprune.stages.search import SearchArgs, budget_sweep, search
from ctprune.stages.search_verify import val_loss
from ctprune.task import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="origin model folder")
    ap.add_argument("--bank", required=True, help="a grid bank scored by `ctprune score`")
    ap.add_argument("--corpus", default="multi30k")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--flops", nargs="+", default=["0.75", "0.5", "0.35"], help="FLOPs budgets")
    add_option(ap, SearchSpec, "k", "-k")
    add_option(ap, SearchSpec, "refine")
    ap.add_argument("--output", type=Path, default=None)
    a = ap.parse_args()
    if a.refine < 1:
        ap.error("--refine must be at least 1 (refinement is what this benchmark measures)")

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        base = SearchArgs(model=Path(a.model), bank=Path(a.bank), output=Path(work) / "plain.json",
                          budgets=budget_sweep({"flops": a.flops}), k=a.k, corpus=a.corpus, data_dir=a.data_dir)
        p, plain = search(base)
        t1 = time.perf_counter()
        _, refined = search(SearchArgs(**{**base.__dict__, "output": Path(work) / "refined.json", "refine": a.refine}))
        refine_s = time.perf_counter() - t1
    val = load_split(a.corpus, default_splits(a.corpus)[1], a.data_dir)
    test_name = test_splits(a.corpus, a.data_dir)[0]
    test = load_split(a.corpus, test_name, a.data_dir)
    batches = TokenizedSplit(val, p.tok, p.arch.max_len(p.origin)).batches(MAX_TOKENS)

    def measure(conf: dict[str, float] | None) -> dict[str, float]:
        model = (p.origin if conf is None else compose(p.origin, Path(a.bank), conf, p.index)).eval()
        return {"val_loss": round(val_loss(p.arch, model, batches), 4),
                "val_bleu": round(evaluate(model, p.tok, val), 2),
                f"{test_name}_bleu": round(evaluate(model, p.tok, test), 2)}

    budgets: list[dict[str, Any]] = []
    for point, sweep in enumerate(plain["sweep"]):
        first = {name: next(r for r in report["configurations"] if r["budget"] == point)
                 for name, report in (("solver", plain), ("refined", refined))}
        rows = {"uniform": sweep["uniform"], **first}
        budgets.append({"flops": a.flops[point], **{
            name: None if r is None else {"flops_fraction": r["flops_fraction"], "estimate": r["estimate"],
                                          **({"source": r["source"], "measured_kl": r["measured"]}
                                             if "measured" in r else {}),
                                          **measure(r["configuration"]), "configuration": r["configuration"]}
            for name, r in rows.items()}})
    result = {"model": str(a.model), "bank": str(a.bank), "k": a.k, "refine": a.refine,
              "refine_s": round(refine_s, 1), "test_split": test_name, "origin": measure(None),
              "candidates_measured": refined["refine"]["candidates_measured"], "budgets": budgets,
              "wall_time_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(result))
    for b in budgets:
        print(f"flops <= {b['flops']}: " + "; ".join(
            f"{name} " + ("out of reach" if r is None else
                          f"{r['flops_fraction']:.3f} FLOPs, val loss {r['val_loss']:.3f}, val BLEU "
                          f"{r['val_bleu']:.2f}, {test_name} BLEU {r[f'{test_name}_bleu']:.2f}")
            for name, r in b.items() if name != "flops"))
    if a.output:
        write_json(a.output, result)


if __name__ == "__main__":
    main()
