"""The frontier's comparisons with their uncertainty: per budget, the kept models of the best
searched configuration (composed), the uniform cut (composed and plain), scratch and the origin,
translated on every test split, with sacreBLEU's bootstrap 95 % interval per model and its paired
bootstrap test of each method against the searched model.

    python benchmarks/frontier_bootstrap.py runs/multi30k-frontier --data-dir ../shared/data/multi30k \\
        --output benchmarks/results/multi30k-frontier/bootstrap

reads the finished run's summary.json (the models are its kept finetunings, chosen by the run's
own ``select`` rule; the best searched configuration of a budget is the one whose kept weights
score best on val by that rule, never on test), prints one line per budget and method and a JSON
line per model, and writes OUTPUT.json and OUTPUT.md. Greedy decoding, as the report's BLEU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ctprune.data.corpus import load_split
from ctprune.errors import CtpruneError
from ctprune.fileio import read_json
from ctprune.model.checkpoint import load_model_folder
from ctprune.model.decode import translate
from ctprune.run.report import best_searched, frontier
from ctprune.run.summary import Summary
from ctprune.spec import FinetuningSpec, spec_default

SAMPLES = 1000  # bootstrap resamples (sacreBLEU's default for its paired test)


def models(run: Path, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """(budget, method, folder) of every model compared, the run's first seed."""
    seed = summary["runs"][0]
    rows = frontier(Summary.from_json(summary, run / "summary.json"))
    select = summary["protocol"].get("select", spec_default(FinetuningSpec, "select"))
    out = [{"budget": None, "method": "origin", "dir": summary["origin"]["dir"]}]
    budgets = sorted({c["budget"] for c in summary["configurations"]})
    for b in budgets:
        best = best_searched(rows, b, select)  # the report's pick: on val, mean over seeds
        if best is None:
            raise CtpruneError(f"budget {b} has no searched model with a kept val loss and val BLEU in {run}")
        index = int(best.name.removeprefix("#"))  # a searched row's name: its configuration's index
        out.append({"budget": b, "method": "searched", "dir": seed["configurations"][index]["composed"]["dir"]})
        for comp in seed.get("competitors", []):
            if comp["budget"] == b:
                out += [{"budget": b, "method": f"{comp['method']} {side}", "dir": comp[side]["dir"]}
                        for side in ("composed", "baseline")]
        out += [{"budget": b, "method": s["method"], "dir": s["dir"]}  # scratch, scratch ceiling
                for s in seed.get("scratch", []) if s["budget"] == b]
    for m in out:
        folder = Path(m["dir"])
        m["dir"] = str(folder if folder.is_absolute() else run / folder)
    return out


def bootstrap(hyps: dict[str, list[str]], refs: list[str], against: str) -> dict[str, dict[str, float]]:
    """BLEU, its bootstrap 95 % interval, and the paired bootstrap p-value against ``against``."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    systems = [(against, hyps[against])] + [(k, v) for k, v in hyps.items() if k != against]
    test = PairedTest(systems, {"BLEU": BLEU()}, [refs], test_type="bs", n_samples=SAMPLES)
    _, results = test()
    out = {}
    for (name, _), r in zip(systems, results["BLEU"]):
        out[name] = {"bleu": round(r.score, 2), "mean": round(float(r.mean), 2), "ci95": round(float(r.ci), 2),
                     "p_vs_searched": None if r.p_value is None else round(r.p_value, 4)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a finished [search] run folder (with summary.json)")
    p.add_argument("--data-dir", help="the corpus's data folder (default: the run's own)")
    p.add_argument("--output", type=Path, help="write OUTPUT.json and OUTPUT.md")
    p.add_argument("--limit", type=int, help="only the first LIMIT sentences of each test split (a quick look)")
    a = p.parse_args(argv)
    try:
        summary = read_json(a.run / "summary.json", "run summary")
        if not summary.get("frontier"):
            raise CtpruneError(f"{a.run / 'summary.json'} has no frontier: not a budget-sweep run")
        data_dir = a.data_dir or (summary.get("inputs") or {}).get("data_dir")
        tests = {name: load_split(summary["corpus"], name, data_dir) for name in summary["test_splits"]}
        tests = {name: type(t)(t.src[:a.limit], t.tgt[:a.limit]) for name, t in tests.items()}
        compared = models(a.run, summary)
        hyps: dict[str, dict[str, list[str]]] = {name: {} for name in tests}
        for folder in dict.fromkeys(m["dir"] for m in compared):  # a folder two methods share: once
            model, tok, _ = load_model_folder(folder)
            for name, t in tests.items():
                hyps[name][folder] = translate(model, tok, t.src)
    except CtpruneError as e:
        print(f"frontier_bootstrap: error: {e}", file=sys.stderr)
        return 2
    rows, lines = [], []
    for b in sorted({m["budget"] for m in compared if m["budget"] is not None}):
        here = [m for m in compared if m["budget"] in (b, None)]
        for name, t in tests.items():
            stats = bootstrap({m["method"]: hyps[name][m["dir"]] for m in here}, t.tgt, "searched")
            for m in here:
                s = stats[m["method"]]
                rows.append({"budget": b, "method": m["method"], "split": name, "dir": m["dir"], **s})
                print(json.dumps(rows[-1]))
                p_text = "" if s["p_vs_searched"] is None else f"  p vs searched {s['p_vs_searched']:.3f}"
                lines.append(f"budget {b}  {name}  {m['method']:<18} BLEU {s['bleu']:6.2f} "
                             f"({s['mean']:.2f} +- {s['ci95']:.2f}){p_text}")
    print("\n".join(lines))
    if a.output:
        a.output.parent.mkdir(parents=True, exist_ok=True)
        a.output.with_suffix(".json").write_text(json.dumps({"samples": SAMPLES, "rows": rows}, indent=1) + "\n")
        a.output.with_suffix(".md").write_text(
            f"# {a.run.name}: test BLEU with bootstrap 95 % intervals ({SAMPLES} resamples; paired test against "
            "the searched model)\n\n```\n" + "\n".join(lines) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
