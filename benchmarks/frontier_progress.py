"""Where a budget-sweep run stands, before it has finished or after: its finished finetunings and
competitors read from the run folder's job records, and the saving over the searched
configurations whose two sides are both done (a partial result, labelled as such, until the run
has written its report).

    python benchmarks/frontier_progress.py runs/multi30k-frontier --output benchmarks/results/multi30k-frontier/progress

prints one line per finished finetuning and a summary line, and writes OUTPUT.json and OUTPUT.md.
The run itself is not touched (its job records are only read). The saving uses the protocol's
own arithmetic (``ctprune.run.protocol.saving``) with the whole tuned grid bank charged, as the
finished run's report charges it; a censored baseline makes it a lower bound.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from ctprune.fileio import read_json
from ctprune.pruning.configs import variant_key
from ctprune.run.protocol import BankCost, Configuration, Cost, TimeToTarget, saving

JOB = re.compile(r"finetune (baseline|composed) (.+) \(seed (\d+)\)$")


def job_records(run: Path) -> dict[str, dict[str, Any]]:
    """The run's job records by job name; where a job ran under two settings (a finetuning cap
    raised mid-run: a new key, the same folder), the one that started last."""
    out: dict[str, dict[str, Any]] = {}
    for p in (run / "jobs").glob("*.json"):
        d = read_json(p, "job record")
        if d["job"] not in out or float(d.get("started", 0)) > float(out[d["job"]].get("started", 0)):
            out[d["job"]] = d
    return out


def grid_bank_cost(run: Path) -> BankCost:
    """What the run's grid bank cost: its pruning and its (first) tuned bank's tuning."""
    pruned, tuned = (next((run / "banks").glob(f"{kind}-*")) for kind in ("pruned", "tuned"))
    tuning = read_json(tuned / "index.json", "bank index")["tuning"]
    index = read_json(pruned / "index.json", "bank index")
    return BankCost(prune_seconds=float(index.get("prune_seconds", 0.0)), n_pruned=len(index["variants"]),
                    tuning_seconds=tuning["wall_time_s"], teacher_flops=tuning["teacher_flops"],
                    variant_flops=tuning["variant_flops"])


def _side(r: dict[str, Any]) -> dict[str, Any]:
    keep = ("epochs_to_target", "epochs_trained", "cost_flops", "val_bleu_epoch0", "val_bleu_budget",
            "val_bleu_best", "test_bleu_epoch0", "test_bleu_budget", "test_bleu_best", "kept")
    return {k: r.get(k) for k in keep}


def progress(run: Path) -> dict[str, Any]:
    found = read_json(run / "search.json", "search result")
    confs = found["configurations"]
    sweep = found["sweep"]
    records = job_records(run)
    rows: list[dict[str, Any]] = []
    for name, rec in records.items():
        m = JOB.match(name)
        if m is None:
            continue
        side, label, seed = m.group(1), m.group(2), int(m.group(3))
        if label.isdigit():
            c = confs[int(label)]
            row = {"method": "searched", "index": int(label), "budget": c["budget"],
                   "flops_fraction": c["flops_fraction"], "configuration": c["configuration"]}
        else:
            b = int(label.rsplit(" ", 1)[1])
            u = sweep[b]["uniform"]
            row = {"method": label.split(" ")[0], "budget": b, "flops_fraction": u["flops_fraction"],
                   "configuration": u["configuration"]}
        rows.append({**row, "side": side, "seed": seed, **_side(rec["result"])})
    rows.sort(key=lambda r: (r["budget"], r["method"] != "searched", r.get("index", 0), r["side"]))
    randoms = [{"budget": rec["result"]["budget"], **{k: x[k] for k in ("flops_fraction", "val_loss", "val_bleu",
                                                                       "test_bleu")}}
               for name, rec in records.items() if name.startswith("random budget") for x in rec["result"]["rows"]]
    pairs = []
    for r in rows:
        if r["method"] == "searched" and r["side"] == "baseline":
            other = next((x for x in rows if x["method"] == "searched" and x["side"] == "composed"
                          and x["index"] == r["index"] and x["seed"] == r["seed"]), None)
            if other is not None:
                pairs.append(Configuration(tuple(variant_key(n, k) for n, k in r["configuration"].items() if k < 1),
                                           *(TimeToTarget(s["epochs_to_target"], Cost(0.0, s["cost_flops"]))
                                             for s in (r, other))))
    bank = grid_bank_cost(run)
    so_far = None
    if pairs:  # in FLOPs only: the run's wall times span sessions, machines and shared load
        so_far = {k: v for k, v in saving(pairs, bank, list(bank.variant_flops)).to_dict().items()
                  if "seconds" not in k}
    seeds = {r["seed"] for r in rows} or {0}  # the seeds that have started finetuning
    total = len(seeds) * (len(confs) + sum(1 for s in sweep if s.get("uniform")))
    return {"run": str(run), "partial": not (run / "summary.json").is_file(), "searched": len(confs),
            "finetunings_expected": 2 * total, "finetunings_done": len(rows), "pairs_done": len(pairs),
            "saving_so_far": so_far,
            "finetunings": rows, "random": randoms}


def is_sweep_run(run: Path, prog: str) -> bool:
    """Whether ``run`` is the folder of a budget-sweep run whose search has run; else says why on stderr."""
    if (run / "search.json").is_file():
        return True
    print(f"{prog}: error: {run} has no search.json: not a budget-sweep run folder, or its search has not run yet",
          file=sys.stderr)
    return False


def _line(r: dict[str, Any]) -> str:
    label = f"{r['method']} {r.get('index', '')}".strip()
    ett = r["epochs_to_target"]
    reached = "censored" if ett is None else f"target at epoch {ett:g}"
    test = "/".join(f"{v:.2f}" for v in (r["test_bleu_best"] or {}).values())
    return (f"budget {r['budget']} {label:<12} {r['side']:<8} {r['flops_fraction']:.3f} of the FLOPs  val BLEU "
            f"ep0 {r['val_bleu_epoch0']:.2f} -> kept {r['val_bleu_best']:.2f}  {reached:<20} "
            f"{r['cost_flops'] / 1e12:7.1f} TFLOP  test (kept) {test}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", type=Path, help="the run folder of a [search] experiment")
    p.add_argument("--output", type=Path, help="write OUTPUT.json and OUTPUT.md")
    a = p.parse_args(argv)
    if not is_sweep_run(a.run, "frontier_progress"):
        return 2
    out = progress(a.run)
    lines = [_line(r) for r in out["finetunings"]]
    s = out["saving_so_far"]
    when = "so far " if out["partial"] else ""
    lines.append(f"{out['finetunings_done']} of {out['finetunings_expected']} finetunings done; "
                 + (f"saving {when}over {out['pairs_done']} searched configurations: {s['ratio_flops']:.2f}x in "
                    f"FLOPs ({s['bound'] or 'exact'}; whole grid bank charged)" if s else "no searched pair done yet"))
    print("\n".join(lines))
    print(json.dumps({k: out[k] for k in ("partial", "finetunings_done", "finetunings_expected", "pairs_done",
                                          "saving_so_far")}))
    if a.output:
        a.output.parent.mkdir(parents=True, exist_ok=True)
        a.output.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
        a.output.with_suffix(".md").write_text(
            f"# {a.run.name}: "
            + ("progress (partial, the run has not finished)" if out["partial"]
               else "every job done (the run's own report: report.md)")
            + "\n\n```\n" + "\n".join(lines) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
