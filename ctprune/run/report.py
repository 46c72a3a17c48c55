"""`ctprune report`: RUN_DIR/summary.json + histories -> report.md and a self-contained report.html.

Both are rendered from one list of blocks (headings, paragraphs, tables, images), so the HTML
has real tables and inline plots rather than Markdown source.
"""

from __future__ import annotations

import base64
import html
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctprune.errors import CtpruneError
from ctprune.fileio import atomic_write, contained, read_json, write_text
from ctprune.run.summary import SIDES, Summary
from ctprune.scoring import spearman
from ctprune.spec import FinetuningSpec, spec_default
from ctprune.stages.search import budget_points, describe_table
from ctprune.training.history import read_history

PROTOCOL = (
    "Protocol. *Time to target*: each configuration is finetuned from the merely pruned modules "
    "(baseline) and from the bank's tuned modules (composed) until its val BLEU (greedy) reaches the "
    "target, at most {cap} epochs; a run that never reaches it counts as {cap} epochs and is censored "
    "(a censored baseline makes the saving a lower bound). *Cost*: wall seconds and analytic training "
    "FLOPs (finetuning: forward and backward of the whole model; block tuning: the teacher's forward "
    "plus every variant's forward and backward); the composed side pays the shared bank (pruning and "
    "block tuning) once, each baseline pays the pruning of its own modules. "
    "Saving = sum of baseline costs / (bank cost + sum of composed costs). *Curve*: the saving for the "
    "first k configurations with a bank of only the variants they use. *Equal budget*: test BLEU of "
    "both sides after {budget} finetuning epoch(s). *Seeds*: {seeds} (tuning and finetuning "
    "randomness; one origin model). *Latency*: greedy decoding with the origin's step counts for "
    "every model, batched (and, where latency.json has it, one sentence at a time), {repeats} interleaved "
    "rounds, median ratio to the origin with the spread; a ratio contradicting the FLOPs ratio by more "
    "than the spread is flagged, not printed.")


_NUMERIC = re.compile(r"(\*\*)?[-+>~]?\s*[\d.]")  # a cell that reads as a number


def numeric_columns(rows: Sequence[Sequence[str]]) -> list[bool]:
    """Per column, whether most of its filled cells read as numbers (right-aligned in HTML; words
    left): decided for the whole column, so one column is aligned one way."""
    out = []
    for col in zip(*rows):
        filled = [c for c in col if c.strip() not in ("", "-") and not c.startswith("n/a")]  # n/a: not measured
        out.append(bool(filled) and 2 * sum(bool(_NUMERIC.match(c)) for c in filled) > len(filled))
    return out


@dataclass
class Doc:
    """Blocks rendered to Markdown and to HTML: ("h", level, text), ("p", text),
    ("table", header, rows), ("img", title, path)."""

    blocks: list[tuple[Any, ...]]

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.blocks.append(("table", list(header), [[str(c) for c in r] for r in rows]))

    def img(self, title: str, path: Path) -> None:
        self.blocks.append(("img", title, path))

    def markdown(self, root: Path) -> str:
        out: list[str] = []
        for b in self.blocks:
            if b[0] == "h":
                out += ["#" * b[1] + " " + b[2], ""]
            elif b[0] == "p":
                out += [b[1], ""]
            elif b[0] == "table":
                out += ["| " + " | ".join(b[1]) + " |", "|" + "---|" * len(b[1])]
                out += ["| " + " | ".join(r) + " |" for r in b[2]] + [""]
            else:
                out += [f"![{b[1]}]({b[2].relative_to(root)})", ""]
        return "\n".join(out)

    def html(self, title: str) -> str:
        def inline(text: str) -> str:
            t = html.escape(text)
            t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
            t = re.sub(r"\*(.+?)\*", r"<i>\1</i>", t)
            return re.sub(r"`(.+?)`", r"<code>\1</code>", t)

        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
                 "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;"
                 "line-height:1.45}table{border-collapse:collapse;margin:1em 0;font-size:90%}"
                 "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
                 ".text{text-align:left}img{max-width:100%}code{background:#f5f5f5}"
                 "</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                parts.append(f"<h{b[1]}>{inline(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                parts.append(f"<p>{inline(b[1])}</p>")
            elif b[0] == "table":
                align = ["" if n else " class='text'" for n in numeric_columns(b[2] or [b[1]])]
                head = "".join(f"<th{a}>{inline(c)}</th>" for a, c in zip(align, b[1]))
                body = "".join("<tr>" + "".join(f"<td{a}>{inline(c)}</td>" for a, c in zip(align, r)) + "</tr>"
                               for r in b[2])
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            else:
                data = base64.b64encode(b[2].read_bytes()).decode()
                parts.append(f"<figure><img alt='{html.escape(b[1])}' src='data:image/png;base64,{data}'/>"
                             f"<figcaption>{html.escape(b[1])}</figcaption></figure>")
        return "".join(parts) + "</body></html>"


def _mean_sd(xs: Sequence[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.2f}x"
    return f"{statistics.mean(xs):.2f}x ± {statistics.stdev(xs):.2f}"


def _tflop(x: float) -> str:
    return f"{x / 1e12:.3g}"


def _epochs(side: dict[str, Any], cap: int) -> str:
    # an evaluation every fraction of an epoch sits at a batch count: 0.252874 epochs reads 0.25
    return f"> {cap} (censored)" if side["epochs_to_target"] is None else f"{round(side['epochs_to_target'], 2):g}"


def _mean(xs: Sequence[float]) -> str:
    return f"{statistics.mean(xs):.2f}"


def _plots(run_dir: Path, s: Summary) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: list[tuple[str, Path]] = []

    def save(fig: Any, title: str, name: str) -> None:
        fig.tight_layout()
        figs.append((title, run_dir / name))
        atomic_write(run_dir / name, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for unit, ax in zip(("seconds", "flops"), axes):
        for run in s.runs:
            ks = range(1, len(run["curve"]) + 1)
            ax.plot(ks, [c[f"ratio_{unit}"] for c in run["curve"]], marker="o", ms=3, label=f"seed {run['seed']}")
        ax.axhline(1.0, color="k", lw=0.8, ls=":")
        ax.set(xlabel="number of configurations k", ylabel=f"saving ({'wall time' if unit == 'seconds' else 'FLOPs'})",
               title=f"Saving vs k ({'wall seconds' if unit == 'seconds' else 'training FLOPs'})")
        ax.legend(fontsize=7)
    save(fig, "saving curve: baseline cost / (bank + composed cost) for the first k configurations",
         "plot_saving_curve.png")

    run = s.runs[0]
    n = len(run["configurations"])
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    bank_s = run["saving"]["bank_seconds"]
    for ax, c in zip(axes.flat, run["configurations"]):
        for side, color in (("baseline", "tab:gray"), ("composed", "tab:blue")):
            hist = read_history(contained(run_dir, c[side]["dir"], "summary.json") / "history.csv")
            x = [float(r["wall_time_s"]) + (bank_s if side == "composed" else 0.0) for r in hist]
            ax.plot(x, [float(r["val_bleu"]) for r in hist], marker="o", ms=3, color=color, label=side)
        if s.target_bleu is not None:
            ax.axhline(s.target_bleu, ls="--", color="tab:red", lw=1, label="target")
        ax.set_title(f"configuration {c['index']}", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes[0][0].legend(fontsize=6)
    fig.supxlabel("wall seconds (composed: from the start of block tuning)", fontsize=8)
    fig.supylabel("val BLEU", fontsize=8)
    save(fig, f"val BLEU vs wall time, seed {run['seed']} (composed curves start after the whole bank's cost)",
         "plot_bleu_vs_time.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    first = s.test_splits[0]
    o = s.origin
    ax.scatter([1.0], [o["test_bleu"][first]], marker="*", s=150, color="k", label="origin")
    for side, color in (("baseline", "tab:gray"), ("composed", "tab:blue")):
        ax.scatter([c["flops_ratio"] for c in s.configurations],
                   [statistics.mean(r["configurations"][i][side]["test_bleu_budget"][first] for r in s.runs)
                    for i in range(len(s.configurations))], color=color, label=side)
    ax.set(xlabel="FLOPs per token / origin's", ylabel=f"test BLEU ({first})",
           title=f"Quality after {s.protocol['budget_epochs']} finetuning epoch(s)")
    ax.legend(fontsize=7)
    save(fig, "FLOPs vs test BLEU at equal finetuning budget (mean over seeds)", "plot_flops_vs_bleu.png")
    block = contained(run_dir, run["tuned_bank"], "summary.json") / "block_loss.png"
    if block.exists():
        figs.append((f"block-tuning loss, seed {run['seed']}", block))
    return figs


def _latency(c: dict[str, Any]) -> str:
    lat = c["latency"]
    return "flagged" if lat["flagged"] else f"{lat['ratio']:.2f}x ± {lat['spread']:.2f}"


def _equal_quality(doc: Doc, s: Summary) -> None:
    """The configurations (and competitors) whose both sides missed the target: the time to equal quality."""
    lines = []
    for r in s.runs:
        named = [(f"configuration {c['index']}", c) for c in r["configurations"]]
        named += [(f"{c['method']} at budget {c['budget']}", c) for c in r.get("competitors", [])]
        for name, c in named:
            if "equal_quality" in c:
                q = c["equal_quality"]
                took = ("not reached within the cap" if q["epochs"] is None else
                        f"reached after {round(q['epochs'], 2):g} epoch(s), {q['cost_seconds']:.1f} s, "
                        f"{_tflop(q['cost_flops'])} TFLOP of finetuning")
                lines.append(f"{name}, seed {r['seed']}: the baseline's best val BLEU {q['target']:.2f}: {took}")
    if lines:
        doc.p("Both sides censored, **time to equal quality** (the composed side to the baseline's best val BLEU "
              "within the cap, its finetuning only): " + "; ".join(lines) + ".")


METHODS = ("searched", "uniform baseline", "uniform composed", "random", "scratch", "scratch ceiling")
SCRATCH = ("`scratch`: the uniform cut's shape (same layers, fewer heads, narrower FFNs: its FLOPs per token), "
           "randomly initialised (normal(0, init_std), the model's own init) and trained from scratch with the "
           "origin's recipe on the same data and tokenizer for the training FLOPs of the budget's composed side: the "
           "whole tuned bank (teacher passes and every variant's tuning: a user wanting only this budget still pays "
           "for the whole bank; scoring is charged in seconds only, as in the saving) plus one configuration's "
           "finetuning to the equal budget ({budget} epoch(s) of the budget's uniform composed model); training "
           "stops at that FLOPs count within an epoch, its lr schedule ending there. `scratch ceiling`: the same "
           "shape trained for the origin's whole training (first seed), a reference, not an equal-compute one. "
           "Its latency is the uniform cut's (the same architecture).")


@dataclass(frozen=True)
class FrontierRow:
    """One model of the frontier: a method at a budget point, its cost and its quality (mean over the
    seeds that have it). None: not measured (the job did not run, or the number does not apply:
    `random` is never finetuned, `scratch` has no epoch 0)."""

    budget: int
    method: str  # one of METHODS
    name: str  # which model of the method: the configuration's index, the uniform keep ratios
    flops_ratio: float | None
    params: int | None
    latency: float | None  # batched greedy decoding, median ratio to the origin (None: flagged or not measured)
    latency_single: float | None  # one sentence at a time, where latency.json has it
    val_bleu_epoch0: float | None
    val_bleu_budget: float | None  # after the equal budget (scratch: at its equal FLOPs)
    val_bleu_best: float | None  # the kept model's
    test_bleu_epoch0: dict[str, float] = field(default_factory=dict)  # per test split
    test_bleu_budget: dict[str, float] = field(default_factory=dict)
    test_bleu_best: dict[str, float] = field(default_factory=dict)
    val_loss_kept: float | None = None  # the kept model's (random: before finetuning): a select = "val_loss" pick

    def quality(self, split: str) -> float | None:
        """Test BLEU of the model a user would ship: the kept one, or before finetuning (random)."""
        return self.test_bleu_best.get(split, self.test_bleu_epoch0.get(split))


def _avg(xs: Sequence[float | None]) -> float | None:
    got = [x for x in xs if x is not None]
    return round(statistics.mean(got), 2) if got else None


def _avg_splits(ds: Sequence[dict[str, float] | None]) -> dict[str, float]:
    got = [d for d in ds if d]
    return {k: v for k in (got[0] if got else {}) if (v := _avg([d.get(k) for d in got])) is not None}


def _kept_loss(per: Sequence[dict[str, Any]]) -> float | None:
    got = [float(x["kept"]["val_loss"]) for x in per if (x.get("kept") or {}).get("val_loss") is not None]
    return statistics.mean(got) if got else None  # unrounded: it picks the searched model of a budget


def _latency_ratio(c: dict[str, Any], key: str = "ratio") -> float | None:
    lat = c.get("latency") or {}
    flag = key.removesuffix("ratio") + "flagged"  # "flagged" / "single_flagged"
    return None if lat.get(flag) or lat.get(key) is None else float(lat[key])


def _trained(budget: int, method: str, name: str, shape: dict[str, Any], per: list[dict[str, Any]]) -> FrontierRow:
    """A finetuned model's row: ``per`` its finetune results (one per seed)."""
    return FrontierRow(budget, method, name, shape.get("flops_ratio"), shape.get("params"), _latency_ratio(shape),
                       _latency_ratio(shape, "single_ratio"), _avg([x.get("val_bleu_epoch0") for x in per]),
                       _avg([x.get("val_bleu_budget") for x in per]), _avg([x.get("val_bleu_best") for x in per]),
                       _avg_splits([x.get("test_bleu_epoch0") for x in per]),
                       _avg_splits([x.get("test_bleu_budget") for x in per]),
                       _avg_splits([x.get("test_bleu_best") for x in per]), _kept_loss(per))


def frontier(s: Summary) -> list[FrontierRow]:
    """Every model of a budget sweep's summary as a frontier row, by budget and method (an older summary
    gives the rows it has numbers for)."""
    runs = s.runs
    rows = [_trained(c.get("budget", 0), "searched", f"#{i}", c, [r["configurations"][i]["composed"] for r in runs])
            for i, c in enumerate(s.configurations)]
    uniform = {c["budget"]: c for c in (s.competitors or []) if c.get("method") == "uniform"}
    for j, c in enumerate(s.competitors or []):
        name = "/".join(f"{x:g}" for x in c.get("ratios", []))
        for side in SIDES:
            rows.append(_trained(c["budget"], f"{c['method']} {side}", name, c,
                                 [r["competitors"][j][side] for r in runs if j < len(r.get("competitors", []))]))
    for i, c in enumerate(s.random or []):
        rows.append(FrontierRow(c["budget"], "random", f"r{i}", c.get("flops_ratio"), c.get("params"),
                                _latency_ratio(c), _latency_ratio(c, "single_ratio"), c.get("val_bleu"), None, None,
                                dict(c.get("test_bleu", {})), val_loss_kept=c.get("val_loss")))
    scratch: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in runs:
        for x in r.get("scratch", []):
            scratch.setdefault((x["budget"], x["method"]), []).append(x)
    for (b, method), per in scratch.items():
        shape = uniform.get(b, {})
        equal = method == "scratch"
        rows.append(FrontierRow(
            b, method, "uniform shape", _avg([x.get("flops_ratio") for x in per]), per[0].get("params"),
            _latency_ratio(shape), _latency_ratio(shape, "single_ratio"), None,
            _avg([x.get("val_bleu_best") for x in per]) if equal else None, _avg([x.get("val_bleu_best") for x in per]),
            {}, _avg_splits([x.get("test_bleu_best") for x in per]) if equal else {},
            _avg_splits([x.get("test_bleu_best") for x in per]), _kept_loss(per)))
    return sorted(rows, key=lambda x: (x.budget, METHODS.index(x.method) if x.method in METHODS else len(METHODS)))


def best_searched(rows: Sequence[FrontierRow], budget: int, select: str) -> FrontierRow | None:
    """The searched model of ``budget`` whose kept models (mean over seeds) are best on val by the run's
    ``select`` rule, its other measure breaking a tie; never picked on test. None: none has both."""
    searched = [x for x in rows if x.budget == budget and x.method == "searched"
                and x.val_loss_kept is not None and x.val_bleu_best is not None]
    if not searched:
        return None
    if select == "val_loss":
        return min(searched, key=lambda x: (x.val_loss_kept, -x.val_bleu_best))
    return max(searched, key=lambda x: (x.val_bleu_best, -x.val_loss_kept))


def verdicts(rows: Sequence[FrontierRow], splits: Sequence[str], select: str, equal: bool = False) -> list[str]:
    """Per budget: the best searched model, picked on val by the run's ``select`` rule over the kept
    models (mean over seeds; never on test), against the competitors of the budget (uniform from both
    banks, scratch), test BLEU per split: of the kept models, or with ``equal`` after the equal budget
    (scratch: within its equal FLOPs either way). A competitor ahead on a split is said in bold."""
    attr = "test_bleu_budget" if equal else "test_bleu_best"
    out = []
    for b in sorted({x.budget for x in rows}):
        best = best_searched(rows, b, select)
        mine = {} if best is None else getattr(best, attr)
        if best is None or not any(sp in mine for sp in splits):
            continue
        parts = []
        for x in (x for x in rows if x.budget == b and x.method in ("uniform composed", "uniform baseline", "scratch")):
            theirs = getattr(x, attr)
            cells = [f"{theirs[sp]:.2f} ({d:+.2f})" if d >= 0 else
                     f"**{theirs[sp]:.2f} ({d:+.2f}): ahead of the search**"
                     for sp in splits if sp in mine and sp in theirs for d in [mine[sp] - theirs[sp]]]
            if cells:
                parts.append(f"{x.method} " + " / ".join(cells))
        test = " / ".join(f"{mine[sp]:.2f}" for sp in splits if sp in mine)
        out.append(f"budget {b}: searched {best.name} {test} against " + ("; ".join(parts) or "no competitor"))
    return out


def pareto(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Whether each (cost, quality) point is on the Pareto front: no other point costs at most as much
    and is at least as good, and is strictly better in one."""
    return [not any(c2 <= c and q2 >= q and (c2, q2) != (c, q) for c2, q2 in points) for c, q in points]


def _num(x: float | None, fmt: str = ".2f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{fmt}}{suffix}"


def _frontier(doc: Doc, run_dir: Path, s: Summary) -> None:
    """The frontier: per budget and method, cost (FLOPs, parameters, latency) against quality (val BLEU
    before finetuning, after the equal budget, best; test BLEU on every split); plots with Pareto points."""
    if s.competitors is None and s.random is None and "budgets" not in s.runs[0]:
        return
    rows, splits, p = frontier(s), s.test_splits, s.protocol
    first = splits[0]
    placed = [i for i, x in enumerate(rows) if x.flops_ratio is not None and x.quality(first) is not None]
    front = pareto([(rows[i].flops_ratio or 0.0, rows[i].quality(first) or 0.0) for i in placed])
    marked = {i for i, on in zip(placed, front) if on}
    doc.h(3, "Frontier")
    doc.p("Per budget and method: cost against quality, mean over seeds. `searched`: the search's configurations "
          "composed from the tuned bank and finetuned; `uniform baseline` / `uniform composed`: the uniform cut "
          "finetuned from plain pruning / from the tuned bank; `random`: random configurations meeting the budget, "
          "composed from the tuned bank, measured before finetuning only. " + SCRATCH.format(budget=p["budget_epochs"])
          + f" BLEU cells: before finetuning / after the equal budget ({p['budget_epochs']} epoch(s); `scratch`: its "
          f"kept model within its equal FLOPs, the alternative's best shot) / the kept model. **P**: on the "
          f"Pareto front of FLOPs against the kept (random: "
          f"untuned) model's test BLEU on {first}. n/a: not measured (the job did not run, or it does not apply).")
    single = any(x.latency_single is not None for x in rows)
    header = ["budget", "method", "model", "FLOPs/token", "params", "latency (batched)"]
    header += ["latency (1 sentence)"] if single else []
    header += ["val BLEU ep. 0 / equal / best"] + [f"test BLEU ({sp}) ep. 0 / equal / best" for sp in splits] + ["P"]
    table = []
    for i, x in enumerate(rows):
        line = [x.budget, x.method, x.name, _num(x.flops_ratio, suffix="x"), _num(x.params, ","),
                _num(x.latency, suffix="x")] + ([_num(x.latency_single, suffix="x")] if single else [])
        line.append(" / ".join(_num(v) for v in (x.val_bleu_epoch0, x.val_bleu_budget, x.val_bleu_best)))
        line += [" / ".join(_num(d.get(sp)) for d in (x.test_bleu_epoch0, x.test_bleu_budget, x.test_bleu_best))
                 for sp in splits]
        table.append(line + ["**P**" if i in marked else ""])
    doc.table(header, table)
    select = p.get("select", spec_default(FinetuningSpec, "select"))
    kept, equal = verdicts(rows, splits, select), verdicts(rows, splits, select, equal=True)
    if kept or equal:
        rule = "lowest mean val loss" if select == "val_loss" else "highest mean val BLEU"
        doc.p(f"**The search against the obvious alternatives** (test BLEU on {', '.join(splits)}; per budget the "
              f"searched configuration whose kept models have the {rule}, picked on val, never on test; in brackets "
              f"the search's lead; paired bootstrap intervals: `benchmarks/frontier_bootstrap.py`). Kept models "
              f"(each finetuned to the target or the cap; scratch within its equal FLOPs): " + "; ".join(kept)
              + f". After the equal budget ({p['budget_epochs']} epoch(s) of finetuning; scratch within its equal "
              f"FLOPs): " + "; ".join(equal) + ".")
    if not single:
        doc.p("Single-sentence latency: not in this run's latency.json (batched decoding only).")
    asked = s.protocol.get("random", 0)
    short = [f"budget {b}: {n} of {asked}" for b in sorted({x.budget for x in rows})
             if (n := sum(x.method == "random" and x.budget == b for x in rows)) < asked]
    if short:
        doc.p("**Note:** fewer random configurations than asked meet these budgets (drawn by rejection): "
              + "; ".join(short) + ".")
    trained = [f"{x['method']} at budget {x['budget']}, seed {r['seed']}: {_tflop(x['train_flops'])} TFLOP"
               + (f" (budget {_tflop(x['max_flops'])})" if x.get("max_flops") is not None else "")
               + f", {x['epochs_trained']:.2f} epochs, {x['train_seconds']:.0f} s"
               + (" (**short of its budget**: the epochs' cap ended it first)" if x.get("budget_reached") is False
                  else "")
               for r in s.runs for x in r.get("scratch", [])]
    if trained:
        doc.p("Scratch training (TFLOP, its FLOPs budget, epochs, wall seconds): " + "; ".join(trained) + ".")
    for title, path in _frontier_plots(run_dir, s, rows, first):
        doc.img(title, path)


def _frontier_plots(run_dir: Path, s: Summary, rows: list[FrontierRow], split: str) -> list[tuple[str, Path]]:
    """BLEU against FLOPs and against batched latency: one line per method (through each budget's best
    model of it), every model a point, the Pareto points ringed; PNGs beside the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for attr, cost, label, name in (
            ("flops_ratio", "FLOPs", "FLOPs per token / origin's", "plot_frontier_flops.png"),
            ("latency", "latency", "batched greedy latency / origin's", "plot_frontier_latency.png")):
        pts = [(getattr(x, attr), x.quality(split), x.method, x.budget) for x in rows]
        pts = [t for t in pts if t[0] is not None and t[1] is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        origin = s.origin.get("test_bleu", {}).get(split)
        if origin is not None:
            ax.scatter([1.0], [origin], marker="*", s=150, color="k", label="origin")
        for method in dict.fromkeys(t[2] for t in pts):
            mine = [t for t in pts if t[2] == method]
            best = {}
            for t in mine:
                if t[3] not in best or t[1] > best[t[3]][1]:
                    best[t[3]] = t
            line = sorted(best.values())
            (drawn,) = ax.plot([t[0] for t in line], [t[1] for t in line], marker="o", ms=4, label=method)
            ax.scatter([t[0] for t in mine], [t[1] for t in mine], s=12, color=drawn.get_color())
        front = [t for t, on in zip(pts, pareto([(t[0], t[1]) for t in pts])) if on]
        ax.scatter([t[0] for t in front], [t[1] for t in front], s=110, facecolors="none", edgecolors="k",
                   label="Pareto")
        ax.set(xlabel=label, ylabel=f"test BLEU ({split}), kept model", title=f"Frontier: BLEU vs {cost}")
        _clip_untuned(ax, pts, front, origin)
        ax.legend(fontsize=7)
        fig.tight_layout()
        atomic_write(run_dir / name, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)
        out.append((f"frontier: test BLEU ({split}) vs {label} per method, Pareto points ringed", run_dir / name))
    return out


def _clip_untuned(ax: Any, pts: Sequence[tuple[Any, ...]], front: Sequence[tuple[Any, ...]],
                  origin: float | None) -> None:
    """Zoom the y axis on the finetuned and trained models (``pts``: (cost, BLEU, method, budget)):
    random configurations (measured before finetuning) far below them would squeeze every other line
    into a band; those are drawn as triangles on the axis's lower edge instead, ringed when on the
    Pareto ``front``."""
    trained = [t[1] for t in pts if t[2] != "random"]
    if not trained:
        return
    trained += [origin] if origin is not None else []
    lo, hi = min(trained), max(trained)
    lo -= max(1.0, 0.3 * (hi - lo))
    below = [t for t in pts if t[2] == "random" and t[1] < lo]
    if not below:
        return
    ax.set_ylim(bottom=lo)
    ax.scatter([t[0] for t in below], [lo] * len(below), marker="v", s=30, color="tab:gray", clip_on=False,
               label=f"random below {lo:.1f} ({len(below)}; before finetuning)")
    ringed = [t for t in below if t in front]
    ax.scatter([t[0] for t in ringed], [lo] * len(ringed), s=110, facecolors="none", edgecolors="k", clip_on=False)


def _budgets(doc: Doc, s: Summary) -> None:
    """Per budget point and method (searched, and each competitor): shape, latency and the protocol's
    numbers side by side (mean over seeds), and the saving of the budget's searched configurations."""
    if s.competitors is None and "budgets" not in s.runs[0]:
        return
    runs, p, first = s.runs, s.protocol, s.test_splits[0]
    tables = budget_points(s.search) if s.search else []
    doc.h(3, "Per budget and method")
    doc.p(f"Each model finetuned from plain pruning (base) and from the tuned bank (comp) under the same protocol; "
          f"test BLEU on {first}; the search's configurations by index, `uniform`: every module of the grid's "
          "kinds at one keep ratio (or the nearest pair of grid ratios) that meets the budget.")
    entries = [(c.get("budget", 0), "search", f"#{i}", c, [r["configurations"][i] for r in runs])
               for i, c in enumerate(s.configurations)]
    entries += [(c["budget"], c["method"], "/".join(f"{x:g}" for x in c["ratios"]), c,
                 [r["competitors"][j] for r in runs]) for j, c in enumerate(s.competitors or [])]
    rows = []
    for b, method, name, c, per in sorted(entries, key=lambda e: (e[0], e[1] != "search")):
        def both(f: Any, per: list[dict[str, Any]] = per) -> str:
            return " / ".join(_mean([f(x[side]) for x in per]) for side in SIDES)

        rows.append([b, method, name, f"{c['flops_ratio']:.2f}x", f"{c['params']:,}", _latency(c),
                     both(lambda x: x["val_bleu_epoch0"]),
                     " / ".join(", ".join(_epochs(x[side], p["cap_epochs"]) for x in per) for side in SIDES),
                     both(lambda x: x["test_bleu_budget"][first]), both(lambda x: x["test_bleu_best"][first])])
    doc.table(["budget", "method", "configuration", "FLOPs/token", "params", "latency", "val BLEU ep. 0 base / comp",
               "epochs to target base / comp", f"test BLEU after {p['budget_epochs']} ep.", "test BLEU best"], rows)
    if "budgets" in runs[0]:
        def one(k: int, b: int) -> str:
            named = f" ({describe_table(tables[b])})" if b < len(tables) else ""
            return (f"budget {b}{named}: {_mean([r['budgets'][k]['saving']['ratio_seconds'] for r in runs])}x / "
                    f"{_mean([r['budgets'][k]['saving']['ratio_flops'] for r in runs])}x")

        doc.p("Saving of each budget's searched configurations (the whole grid bank charged to each budget alone; "
              "mean over seeds, time / FLOPs): "
              + "; ".join(one(k, x["budget"]) for k, x in enumerate(runs[0]["budgets"])) + ".")


def _build(run_dir: Path, s: Summary) -> Doc:
    doc = Doc([])
    p, o, runs = s.protocol, s.origin, s.runs
    cap, splits = p["cap_epochs"], s.test_splits
    doc.h(1, f"ctprune experiment report: {s.experiment}")
    doc.p(PROTOCOL.format(cap=cap, budget=p["budget_epochs"], seeds=", ".join(map(str, s.seeds)),
                          repeats=p["latency_repeats"]))
    every = p.get("eval_every", 1.0)  # summaries before eval_every: whole epochs, kept by val BLEU
    doc.p(f"Val BLEU and loss were measured {'after every epoch' if every == 1 else f'every {every:g} of an epoch'} "
          f"(time to target in {'whole' if every == 1 else 'fractional'} epochs, its cost up to that evaluation); "
          f"the kept (\"best\") model of each finetuning is the evaluation with the "
          f"{'lowest val loss' if p.get('select') == 'val_loss' else 'highest val BLEU'} (`select = "
          f"\"{p.get('select', 'val_bleu')}\"`). *Time to equal quality*: where both sides of a configuration miss "
          "the target within the cap, the time the composed side took to reach the baseline's best val BLEU "
          "within the cap; it is no time to target and enters no saving.")
    tests = ", ".join(f"{k} {v}" for k, v in o["test_bleu"].items())
    doc.p(f"Origin model: val BLEU {o['val_bleu']}, test BLEU {tests}, {o['params']:,} parameters, "
          f"{o['flops_per_token'] / 1e6:.2f} MFLOPs per target token. " + (
              f"Target: val BLEU >= **{s.target_bleu}** ({p['target']})." if s.target_bleu is not None else
              f"No target (`target_bleu = \"none\"`): every run trains the cap of {cap} epochs, and its cost is "
              "the cost of those epochs."))

    if s.search:
        q = s.search
        budgets = "; ".join(f"budget {i}: {describe_table(t)}" for i, t in enumerate(budget_points(q)))
        doc.p(f"Configurations found by `ctprune search` ({budgets}; k = {q['k']} per budget, at least "
              f"{q['min_distance']} slots apart) among {q['choices']} choices in {q['slots']} slots of a grid bank "
              f"that was tuned and scored whole, once for every budget: scoring {q['scoring_seconds']:.1f} s, solver "
              f"{q['solver']['total_s']:.2f} s. The bank's whole cost (every grid variant, and the scoring) is "
              "charged to the composed side for every k, and to each budget alone in the per-budget savings.")
        for note in q.get("notes", []):
            doc.p(f"**Note:** {note}.")
    doc.h(2, "What composability saved")
    sec = [r["saving"]["ratio_seconds"] for r in runs]
    flo = [r["saving"]["ratio_flops"] for r in runs]
    bounds = {r["saving"]["bound"] for r in runs} - {""}
    doc.p(f"All {len(s.configurations)} configurations, over {len(runs)} seed(s): **saving {_mean_sd(sec)} in "
          f"wall time, {_mean_sd(flo)} in training FLOPs**"
          + (f" ({', '.join(sorted(bounds))} in some seeds: see the censored columns)" if bounds else "") + ".")
    doc.table(["seed", "baseline s", "bank s (prune + tune)", "composed finetuning s", "saving (time)",
               "baseline TFLOP", "bank TFLOP", "composed TFLOP", "saving (FLOPs)", "censored base / comp"],
              [[r["seed"], f"{v['baseline_seconds']:.1f}", f"{v['bank_seconds']:.1f}", f"{v['composed_seconds']:.1f}",
                f"**{v['ratio_seconds']:.2f}x**", _tflop(v["baseline_flops"]), _tflop(v["bank_flops"]),
                _tflop(v["composed_flops"]), f"**{v['ratio_flops']:.2f}x**",
                f"{v['censored_baselines']} / {v['censored_composed']}"]
               for r in runs for v in [r["saving"]]])
    ks = range(1, len(s.configurations) + 1)
    doc.p("Saving for the first k configurations (mean over seeds; time / FLOPs):")
    doc.table(["k"] + [str(k) for k in ks],
              [["time"] + [f"{statistics.mean(r['curve'][k - 1]['ratio_seconds'] for r in runs):.2f}x" for k in ks],
               ["FLOPs"] + [f"{statistics.mean(r['curve'][k - 1]['ratio_flops'] for r in runs):.2f}x" for k in ks]])
    t = runs[0]["tuning"]
    doc.p(f"Efficiency: block tuning ran at {t['achieved_gflops']} GFLOP/s (seed {runs[0]['seed']}, "
          f"{'bf16' if t.get('bf16') else 'fp32'}), finetuning at {s.finetune_achieved_gflops} GFLOP/s "
          f"(all finetuning epochs of the run).")

    doc.h(2, "Configurations")
    doc.p("Architecture of each configuration (the same for both sides and all seeds). Latency: median "
          "ratio to the origin ± spread.")
    estimates = [c["estimate"] for c in s.search["configurations"]] if s.search else None
    sweep = any("budget" in c for c in s.configurations)
    doc.table(["#"] + (["budget"] if sweep else []) + ["params", "non-zero", "FLOPs/token", "latency vs origin",
                                                       "modules pruned"]
              + (["search estimate"] if estimates else []),
              [[i] + ([c.get("budget", "")] if sweep else []) + [f"{c['params']:,}", f"{c['nonzero_params']:,}",
                                                                 f"{c['flops_ratio']:.2f}x",
                "flagged: contradicts FLOPs" if c["latency"]["flagged"]
                else f"{c['latency']['ratio']:.2f}x ± {c['latency']['spread']:.2f}",
                sum(1 for r in c["configuration"].values() if r < 1)]
               + ([f"{estimates[i]:.4f}"] if estimates else [])
               for i, c in enumerate(s.configurations)])
    _budgets(doc, s)
    _frontier(doc, run_dir, s)
    doc.p(f"Finetuning results, mean over seeds; epochs to target per seed. Test BLEU after "
          f"{p['budget_epochs']} epoch(s) is the equal-budget comparison.")
    header = ["#", "val BLEU epoch 0 base / comp", "epochs to target base / comp"]
    header += [f"test BLEU ({x}) after {p['budget_epochs']} ep. base / comp" for x in splits]
    header += [f"test BLEU ({x}) best base / comp" for x in splits]
    rows = []
    for i in range(len(s.configurations)):
        per = [r["configurations"][i] for r in runs]

        def both(f: Any, per: list[dict[str, Any]] = per) -> str:
            return " / ".join(_mean([f(c[side]) for c in per]) for side in SIDES)

        row = [i, both(lambda x: x["val_bleu_epoch0"]),
               " / ".join(", ".join(_epochs(c[side], cap) for c in per) for side in SIDES)]
        row += [both(lambda x, sp=sp: x["test_bleu_budget"][sp]) for sp in splits]
        row += [both(lambda x, sp=sp: x["test_bleu_best"][sp]) for sp in splits]
        rows.append(row)
    doc.table(header, rows)
    _equal_quality(doc, s)
    if estimates:
        start = [statistics.mean(r["configurations"][i]["composed"]["val_bleu_epoch0"] for r in runs)
                 for i in range(len(estimates))]
        rho = spearman(estimates, start)
        doc.p("The search's estimate against the composed models before finetuning: Spearman between estimate "
              f"and val BLEU at epoch 0 (mean over seeds) **{'n/a (fewer than 3, or constant)' if rho is None else rho}"
              "** over these configurations (near -1: the estimate ranks them; near-optimal configurations lie "
              "close together, so expect less there than over random ones: `ctprune search --verify`).")

    doc.h(2, "Plots")
    for title, path in _plots(run_dir, s):
        doc.img(title, path)
    doc.h(2, "Provenance")
    doc.p("Block tuning per seed: " + "; ".join(
        f"seed {r['seed']}: {r['tuning']['variants']} variants, {r['tuning']['epochs_done']} epochs, "
        f"{r['tuning']['wall_time_s']} s, {r['tuning']['train_tokens']:,} tokens"
        f"{', ' + str(r['tuning']['sessions']) + ' shards or sessions' if r['tuning'].get('sessions', 1) > 1 else ''}"
        for r in runs) + ".")
    if s.execution is not None:  # summaries written before executors existed have none
        e = s.execution
        doc.p(f"Executed by the {e['executor']} executor: {e['workers']} worker(s) sharing {e['cores']} CPU "
              f"thread(s) (a job alone gets them all), device {e['device']}. Wall seconds are comparable only "
              "within one run.")
    doc.p(f"sacreBLEU signature `{s.bleu_signature}`; chrF `{s.chrf_signature}`. Corpus {s.corpus}; "
          f"versions {s.versions}; machine {s.machine}.")
    return doc


def write_report(run_dir: Path) -> Path:
    """Write report.md and a self-contained report.html from RUN_DIR/summary.json (read and checked
    by ``Summary.from_json``: an incomplete summary is refused in one line naming what it lacks)."""
    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    if not path.exists():
        raise CtpruneError(f"{run_dir} has no summary.json; is it a finished `ctprune run` folder?")
    summary = Summary.from_json(read_json(path, "run summary"), path)
    try:
        doc = _build(run_dir, summary)
    except (KeyError, IndexError, TypeError, ValueError) as e:  # a field below what from_json checks
        raise CtpruneError(f"{path}: not a complete run summary ({type(e).__name__}: {e}); re-run "
                           "`ctprune run` to rewrite it") from None
    write_text(run_dir / "report.md", doc.markdown(run_dir))
    write_text(run_dir / "report.html", doc.html(f"ctprune report: {summary.experiment}"))
    return run_dir / "report.md"
