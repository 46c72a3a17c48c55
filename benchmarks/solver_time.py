"""The search's solver time on a scored bank: ``-k`` diverse configurations under a FLOPs budget,
solved ``--repeats`` times with HiGHS's presolve off (ctprune's default) and on, interleaved, so
that both see the same machine. The problem is built once (``ctprune search``'s own preparation);
only ``solve`` is timed. Usage (the bank of benchmarks/search.py):
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
    seconds: dict[str, list[float]] = {"presolve off": [], "presolve on": []}
    objectives: dict[str, list[float]] = {}
    for _ in range(a.repeats):
        for name in seconds:
            t0 = time.perf_counter()
            sols = solve(score, slot, costs, p.limits, k=a.k, min_distance=a.min_distance,
                         presolve=name == "presolve on")
            seconds[name].append(time.perf_counter() - t0)
            objectives[name] = [round(s.objective, 6) for s in sols]
    result = {"model": str(a.model), "bank": str(a.bank), "flops": a.flops, "k": a.k, "min_distance": a.min_distance,
              "slots": len(p.choices.slots), "choices": len(score), "repeats": a.repeats,
              "same_solutions": objectives["presolve off"] == objectives["presolve on"],
              **{name: {"median_s": round(statistics.median(t), 3), "min_s": round(min(t), 3),
                        "max_s": round(max(t), 3)} for name, t in seconds.items()}}
    print(json.dumps(result))
    print(f"solver: {a.k} configurations over {result['slots']} slots, median of {a.repeats}: "
          + ", ".join(f"{name} {r['median_s']:.2f}s ({r['min_s']:.2f}-{r['max_s']:.2f})"
                      for name, r in result.items() if name.startswith("presolve"))
          + f"; same solutions {result['same_solutions']}")
    if a.output:
        write_json(a.output, result)


if __name__ == "__main__":
    main()
