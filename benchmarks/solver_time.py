"""The search's solver time on a scored bank: ``-k`` diverse configurations under a FLOPs budget,
solved ``--repeats`` times with ctprune's HiGHS settings (presolve on, the feasibility-jump, RINS
and RENS heuristics off), with presolve off, with the heuristics back on (HiGHS's defaults), and
with both changed, interleaved, so that all see the same machine. The problem is built once
(``ctprune search``'s own preparation); only ``solve`` is timed; ``same_solutions``: every setting
found the k solutions with the same objectives (where scores tie, the choices may differ).
Usage (the bank of benchmarks/search.py):
    python benchmarks/solver_time.py runs/multi30k/origin --bank runs/search-m30k/tuned \
        --data-dir DIR --output benchmarks/results/multi30k/solver-time.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from ctprune.fileio import write_json
from ctprune.pruning.solver import solve
from ctprune.spec import SearchSpec, add_option
from ctprune.stages.search import SearchArgs, parse_budget, prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--bank", type=Path, required=True, help="a scored bank (ctprune score)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--flops", default="0.6")
    add_option(ap, SearchSpec, "k", "-k")
    add_option(ap, SearchSpec, "min_distance")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--output", type=Path, default=None, help="write the results here as JSON")
    a = ap.parse_args()
    p = prepare(SearchArgs(model=a.model, bank=a.bank, output=Path("unused.json"),
                           budgets=(parse_budget("flops", a.flops),), data_dir=a.data_dir))
    score, slot, costs = p.arrays()
    settings = {"ctprune": {}, "presolve off": {"presolve": False}, "HiGHS defaults": {"heuristics": True},
                "presolve off, heuristics on": {"presolve": False, "heuristics": True}}
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    # Equally good solutions may differ between settings where scores tie: compare the objectives.
    objectives: dict[str, list[float]] = {}
    for _ in range(a.repeats):
        for name, kwargs in settings.items():
            t0 = time.perf_counter()
            sols = solve(score, slot, costs, p.limits[0], k=a.k, min_distance=a.min_distance, **kwargs)
            seconds[name].append(time.perf_counter() - t0)
            objectives[name] = [round(s.objective, 9) for s in sols]
    result = {"model": str(a.model), "bank": str(a.bank), "flops": a.flops, "k": a.k, "min_distance": a.min_distance,
              "slots": len(p.choices.slots), "choices": len(score), "repeats": a.repeats,
              "same_solutions": all(o == objectives["ctprune"] for o in objectives.values()),
              "objectives": objectives["ctprune"],
              "seconds": {name: {"median": round(statistics.median(t), 3), "min": round(min(t), 3),
                                 "max": round(max(t), 3)} for name, t in seconds.items()}}
    print(json.dumps(result))
    print(f"solver: {a.k} configurations over {result['slots']} slots, median of {a.repeats}: "
          + ", ".join(f"{name} {r['median']:.2f}s ({r['min']:.2f}-{r['max']:.2f})"
                      for name, r in result["seconds"].items())
          + f"; same solutions {result['same_solutions']}")
    if a.output:
        write_json(a.output, result)


if __name__ == "__main__":
    main()
