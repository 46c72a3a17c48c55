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
from pathlib import Path
from typing import Any

from frontier_progress import grid_bank_cost, is_sweep_run, job_records  # benchmarks/ is this script's sys.path[0]

from ctprune.errors import CtpruneError
from ctprune.fileio import read_json
from ctprune.pruning.configs import variant_key
from ctprune.run.experiment import load_experiment
from ctprune.run.protocol import Configuration, saving, time_to_target
from ctprune.run.summary import SIDES
from ctprune.spec import parse_target
from ctprune.training.history import read_history


def _finished(run: Path, target: float, cap: int) -> dict[tuple[str, int], list[dict[str, str]]]:
    """(side, configuration index) -> history of every finished finetuning of a searched configuration:
    its train_summary.json written and its history reaching the run's target or the cap (a folder
    censored under a lower cap, before its job trained on, is not finished)."""
    out: dict[tuple[str, int], list[dict[str, str]]] = {}
    where: dict[tuple[str, int], Path] = {}
    for side in SIDES:
        for folder in sorted((run / "finetune" / side).glob("config-*")):
            if not (folder / "train_summary.json").is_file():
                continue
            hp = read_json(folder / "hparams.json", "finetuning hparams")
            if Path(hp["configurations"]).name != "conf.json":  # a competitor's
                continue
            history = read_history(folder / "history.csv")
            try:
                time_to_target(history, target, cap)
            except CtpruneError:
                continue
            key = (side, int(hp["configuration_index"]))
            if key in where:
                raise CtpruneError(f"{where[key]} and {folder} both finetune {side} configuration {key[1]}: "
                                   "a run folder of one setting per configuration is needed")
            out[key], where[key] = history, folder
    return out


def targets(run: Path, deltas: list[float]) -> dict[str, Any]:
    """The saving over the searched configurations finished on both sides, per budget and in all, at
    each target origin - delta (FLOPs; the whole grid bank charged)."""
    exp = load_experiment(run / "experiment.toml")
    if len(exp.seeds) != 1:
        raise CtpruneError(f"the run has seeds {exp.seeds}: one seed per run folder is read (each has its own bank)")
    cap = exp.finetuning.epochs
    origin = float(job_records(run)["origin val BLEU"]["result"]["val_bleu"])
    target = parse_target(exp.finetuning.target_bleu, "finetuning.target_bleu")
    if target is None:
        raise CtpruneError("the run has no target (target_bleu = \"none\"): no time to target to read again")
    run_target = origin - float(target.removeprefix("origin-")) if isinstance(target, str) else target
    if any(origin - d > run_target + 1e-9 for d in deltas):
        raise CtpruneError(f"--deltas below the run's own {origin - run_target:g} (a stricter target) cannot be read "
                           "from histories that stop at the run's target")
    confs = read_json(run / "search.json", "search result")["configurations"]
    histories = _finished(run, run_target, cap)
    bank = grid_bank_cost(run)
    pairs = sorted(i for side, i in histories if side == "baseline" and ("composed", i) in histories)
    rows = []
    for delta in deltas:
        t = origin - delta
        per: dict[int | str, list[Configuration]] = {}
        for i in pairs:
            variants = tuple(variant_key(n, k) for n, k in confs[i]["configuration"].items() if k < 1)
            c = Configuration(variants, *(time_to_target(histories[side, i], t, cap) for side in SIDES))
            per.setdefault(confs[i]["budget"], []).append(c)
            per.setdefault("all", []).append(c)
        for budget, cs in sorted(per.items(), key=lambda kv: (kv[0] == "all", str(kv[0]))):
            s = saving(cs, bank, list(bank.variant_flops))
            rows.append({"delta": delta, "target": round(t, 2), "budget": budget, "configurations": len(cs),
                         "ratio_flops": round(s.flops, 3), "bound": s.bound,
                         "censored_baselines": s.censored_baselines, "censored_composed": s.censored_composed,
                         "epochs": [[c.baseline.epochs, c.composed.epochs] for c in cs]})
    return {"run": str(run), "origin_val_bleu": round(origin, 2), "cap_epochs": cap,
            "run_delta": round(origin - run_target, 4), "partial": len(pairs) < len(confs), "pairs": len(pairs),
            "searched": len(confs), "rows": rows}


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
