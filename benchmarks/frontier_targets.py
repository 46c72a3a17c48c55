"""The saving's sensitivity to the target: the searched configurations' finished finetunings of a
budget-sweep run, their time to target read again from their histories at targets looser than the
run's own, and the saving over them per budget and in all.

    python benchmarks/frontier_targets.py runs/multi30k-frontier --deltas 1 1.5 2 3 \\
        --output benchmarks/results/multi30k-frontier/targets

A target is the origin's val BLEU minus DELTA. A looser target than the run's (a larger delta) is
read exactly from the histories: every finetuning trained until it reached the run's target or hit
the cap, and val BLEU was measured at every evaluation on the way (``eval_every``). A stricter one
cannot be (a finetuning stops after it reaches the run's target), and is refused. The protocol's
arithmetic is the run's own (``time_to_target``, ``saving``, the whole grid bank charged to the
composed side); FLOPs only, as the run's wall times span sessions. Reads the run, writes nothing in it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

from frontier_progress import _bank, _records, is_sweep_run  # benchmarks/ is this script's sys.path[0]

from ctprune.errors import CtpruneError
from ctprune.fileio import read_json
from ctprune.pruning.configs import variant_key
from ctprune.run.protocol import Configuration, saving, time_to_target
from ctprune.training.history import read_history


def _finished(run: Path) -> dict[tuple[str, int, int], Path]:
    """(side, configuration index, seed) -> folder of every finished finetuning of a searched
    configuration (its train_summary.json written)."""
    out = {}
    for side in ("baseline", "composed"):
        for folder in sorted((run / "finetune" / side).glob("config-*")):
            hp = read_json(folder / "hparams.json", "finetuning hparams")
            if Path(hp["configurations"]).name == "conf.json" and (folder / "train_summary.json").is_file():
                out[side, int(hp["configuration_index"]), int(hp["recipe"]["seed"])] = folder
    return out


def targets(run: Path, deltas: list[float]) -> dict[str, Any]:
    exp = tomllib.loads((run / "experiment.toml").read_text())
    cap = int(exp["finetuning"]["epochs"])
    records = _records(run)
    origin = float(records["origin val BLEU"]["result"]["val_bleu"])
    target = str(exp["finetuning"].get("target_bleu", "origin-1"))
    if not target.startswith("origin-"):
        raise CtpruneError(f"the run's target {target!r} is no origin-DELTA: looser targets are not defined")
    run_delta = float(target.removeprefix("origin-"))
    if any(d < run_delta for d in deltas):
        raise CtpruneError(f"--deltas below the run's own {run_delta:g} (a stricter target) cannot be read from "
                           "histories that stop at the run's target")
    confs = read_json(run / "search.json", "search result")["configurations"]
    folders = _finished(run)
    bank = _bank(run)
    pairs = sorted((i, seed) for side, i, seed in folders if side == "baseline" and ("composed", i, seed) in folders)
    histories = {k: read_history(f / "history.csv") for k, f in folders.items()}
    rows = []
    for delta in deltas:
        t = origin - delta
        per: dict[int | str, list[Configuration]] = {}
        for i, seed in pairs:
            variants = tuple(variant_key(n, k) for n, k in confs[i]["configuration"].items() if k < 1)
            c = Configuration(variants, *(time_to_target(histories[side, i, seed], t, cap)
                                          for side in ("baseline", "composed")))
            per.setdefault(confs[i]["budget"], []).append(c)
            per.setdefault("all", []).append(c)
        for budget, cs in sorted(per.items(), key=lambda kv: (kv[0] == "all", str(kv[0]))):
            s = saving(cs, bank, list(bank.variant_flops))
            rows.append({"delta": delta, "target": round(t, 2), "budget": budget, "configurations": len(cs),
                         "ratio_flops": round(s.flops, 3), "bound": s.bound,
                         "censored_baselines": s.censored_baselines, "censored_composed": s.censored_composed,
                         "epochs": [[c.baseline.epochs, c.composed.epochs] for c in cs]})
    return {"run": str(run), "origin_val_bleu": round(origin, 2), "cap_epochs": cap, "run_delta": run_delta,
            "partial": len(pairs) < len(confs), "pairs": len(pairs), "searched": len(confs), "rows": rows}


def _line(r: dict[str, Any]) -> str:
    where = "all budgets" if r["budget"] == "all" else f"budget {r['budget']}"
    return (f"target origin-{r['delta']:g} ({r['target']:.2f})  {where:<11} {r['configurations']:>2} configurations  "
            f"saving {r['ratio_flops']:.2f}x in FLOPs ({r['bound'] or 'exact'})  censored baseline / composed "
            f"{r['censored_baselines']} / {r['censored_composed']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", type=Path, help="the run folder of a [search] experiment")
    p.add_argument("--deltas", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0],
                   help="targets as val BLEU below the origin's, none below the run's own (default: 1 1.5 2 3)")
    p.add_argument("--output", type=Path, help="write OUTPUT.json and OUTPUT.md")
    a = p.parse_args(argv)
    if not is_sweep_run(a.run, "frontier_targets"):
        return 2
    try:
        out = targets(a.run, a.deltas)
    except CtpruneError as e:
        print(f"frontier_targets: error: {e}", file=sys.stderr)
        return 2
    if not out["pairs"]:
        print(f"frontier_targets: error: {a.run} has no searched configuration finetuned on both sides yet",
              file=sys.stderr)
        return 2
    lines = [_line(r) for r in out["rows"]]
    label = (f"{out['pairs']} of {out['searched']} searched configurations finished on both sides"
             + (" (partial: the run has not finished)" if out["partial"] else ""))
    print(label + "\n" + "\n".join(lines))
    print(json.dumps({k: out[k] for k in ("origin_val_bleu", "cap_epochs", "pairs", "partial")}
                     | {"saving": {f"origin-{r['delta']:g} {r['budget']}": r["ratio_flops"] for r in out["rows"]}}))
    if a.output:
        a.output.parent.mkdir(parents=True, exist_ok=True)
        a.output.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
        a.output.with_suffix(".md").write_text(f"# {a.run.name}: the saving at looser targets\n\n{label}; "
                                               f"origin val BLEU {out['origin_val_bleu']:.2f}, cap "
                                               f"{out['cap_epochs']} epochs.\n\n```\n" + "\n".join(lines) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
