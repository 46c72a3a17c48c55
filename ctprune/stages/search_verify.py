"""`ctprune search --verify`: how well the summed variant scores predict real quality.

Each found configuration, and random configurations meeting the same budgets, is composed from
the bank and measured before any finetuning: teacher-forced val loss and greedy val BLEU. The
Spearman rank correlation between estimate and measured loss says whether the estimate ranks
configurations right; the best found against the best and median random one says whether the
search beats chance.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

from ctprune.arch import Architecture
from ctprune.data.batching import Batch, TokenizedSplit
from ctprune.data.corpus import Parallel, default_splits, load_split
from ctprune.fileio import write_json
from ctprune.model.flops import parameter_counts
from ctprune.pruning.bank import compose
from ctprune.pruning.solver import feasible
from ctprune.scoring import spearman
from ctprune.spec import OBJECTIVES
from ctprune.stages.search import Problem, search_json_path
from ctprune.task import evaluate


def random_feasible(p: Problem, n: int, seed: int = 0, attempts: int = 200_000, point: int = 0
                    ) -> list[list[int]]:
    """Up to ``n`` distinct configurations drawn uniformly (one random choice per slot) that meet
    the budgets of budget point ``point``, by rejection."""
    _, slot, costs = p.arrays()
    limits = p.limits[point]
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(slot == s) for s in range(len(p.choices.slots))]
    found: dict[tuple[int, ...], None] = {}
    for _ in range(attempts):
        if len(found) == n:
            break
        taken = [int(rng.choice(g)) for g in groups]
        if feasible(taken, slot, costs, limits, len(groups)):
            found.setdefault(tuple(taken))
    return [list(t) for t in found]


@torch.no_grad()
def val_loss(arch: Architecture, model: torch.nn.Module, batches: list[Batch]) -> float:
    """Mean teacher-forced cross-entropy per target token over ``batches``."""
    total, tokens = 0.0, 0
    for b in batches:
        real = b.tgt_out != b.pad_id  # (B, T)
        logits = arch.logits(model, b.src, b.tgt_in)[real].float()  # (N, V)
        total += float(torch.nn.functional.cross_entropy(logits, b.tgt_out[real], reduction="sum"))
        tokens += int(real.sum())
    return total / max(tokens, 1)


def verify(p: Problem, report: dict[str, Any], n_random: int = 16,
           sentences: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Measure every found and, per budget point, ``n_random`` random configurations; add the
    results to ``search.json`` and return them. ``sentences`` limits the BLEU sentences (default:
    all). The summary is per budget point (``per_budget``); with one point it is also at the top
    level, as single-budget results have it."""
    a = p.args
    val = load_split(a.corpus, default_splits(a.corpus)[1], a.data_dir)
    batches = TokenizedSplit(val, p.tok, p.arch.max_len(p.origin)).batches(a.max_tokens)
    src, refs = val.src[:sentences], val.tgt[:sentences]
    sl, tl = report["flops_at"]["src_len"], report["flops_at"]["tgt_len"]
    t0 = time.perf_counter()

    def measure(conf: dict[str, float], extra: dict[str, Any]) -> dict[str, Any]:
        model = compose(p.origin, a.bank, conf, p.index).eval()
        return {**extra, "val_loss": round(val_loss(p.arch, model, batches), 4),
                "val_bleu": round(evaluate(model, p.tok, Parallel(src, refs)), 2),
                "params_on_model": parameter_counts(model)[1],
                "flops_on_model": p.arch.forward_flops(model, sl, tl)}

    rows = [measure(dict(r["configuration"]), {"kind": "found", "budget": r.get("budget", 0),
                                               "estimate": r["estimate"], "estimates": r["estimates"]})
            for r in report["configurations"]]
    for point in range(len(p.limits)):
        rows += [measure(p.configuration(t), {"kind": "random", "budget": point, **p.describe(t),
                                              "configuration": p.configuration(t)})
                 for t in random_feasible(p, n_random, seed, point=point)]
    origin_row = {"val_loss": round(val_loss(p.arch, p.origin, batches), 4),
                  "val_bleu": round(evaluate(p.origin, p.tok, Parallel(src, refs)), 2)}
    per_budget = [_summary(rows, point) for point in range(len(p.limits))]
    result: dict[str, Any] = {
        "corpus": a.corpus, "split": default_splits(a.corpus)[1], "bleu_sentences": len(src),
        "origin": origin_row, "rows": rows, "wall_time_s": round(time.perf_counter() - t0, 2),
        "random_asked": n_random, **(per_budget[0] if len(per_budget) == 1 else {}), "per_budget": per_budget,
    }
    write_json(search_json_path(a.output), {**report, "verify": result})
    return result


def _summary(rows: list[dict[str, Any]], point: int) -> dict[str, Any]:
    """Spearman and best / median of the found and random rows of budget point ``point``;
    ``lowest_loss_found`` indexes ``rows``."""
    mine = [i for i, r in enumerate(rows) if r["kind"] == "found" and r["budget"] == point]
    found = [rows[i] for i in mine]
    others = [r for r in rows if r["kind"] == "random" and r["budget"] == point]
    both = found + others
    return {
        "budget": point,
        "spearman_found": spearman([r["estimate"] for r in found], [r["val_loss"] for r in found]),
        "spearman_all": spearman([r["estimate"] for r in both], [r["val_loss"] for r in both]),
        # Each objective's estimate within the found set: the one the solver did not minimise is
        # not range-restricted by the selection and may rank the found set where the other cannot.
        "spearman_found_by": {o: spearman([r["estimates"][o] for r in found], [r["val_loss"] for r in found])
                              for o in OBJECTIVES},
        "best_found_bleu": found[0]["val_bleu"], "best_found_loss": found[0]["val_loss"],
        # The estimate does not rank near-optimal configurations (README): the measured best of them.
        "lowest_loss_found": min(mine, key=lambda i: rows[i]["val_loss"]),
        "random": len(others),
        "random_best_bleu": max((r["val_bleu"] for r in others), default=None),
        "random_median_bleu": statistics.median([r["val_bleu"] for r in others]) if others else None,
        "random_best_loss": min((r["val_loss"] for r in others), default=None),
        "random_median_loss": round(statistics.median([r["val_loss"] for r in others]), 4) if others else None,
    }


def print_verify(v: dict[str, Any], out: Any = None) -> None:
    """A readable table of the verification and its summary lines, per budget point."""
    for s in v["per_budget"]:
        if s["random"] == 0:  # said first: the comparison with chance is missing
            print(f"note: budget {s['budget']}: no random configuration meets it "
                  f"(asked {v.get('random_asked', '?')}, drawn by rejection)", file=out)
    print(f"{'':>3} {'kind':<7} {'budget':>6} {'estimate':>9} {'val loss':>9} {'val BLEU':>9}", file=out)
    for i, r in enumerate(v["rows"]):
        print(f"{i:>3} {r['kind']:<7} {r.get('budget', 0):>6} {r['estimate']:>9.4f} {r['val_loss']:>9.4f} "
              f"{r['val_bleu']:>9.2f}", file=out)
    print(f"origin: val loss {v['origin']['val_loss']:.4f}, val BLEU {v['origin']['val_bleu']:.2f}", file=out)
    for s in v["per_budget"]:
        at = f"budget {s['budget']}: " if len(v["per_budget"]) > 1 else ""
        print(f"{at}Spearman(estimate, val loss): found {s['spearman_found']}, found+random {s['spearman_all']}; "
              "within the found by each objective's estimate: "
              + ", ".join(f"{o} {rho}" for o, rho in s["spearman_found_by"].items()), file=out)
        low = v["rows"][s["lowest_loss_found"]]
        print(f"{at}lowest measured val loss of the found: configuration {s['lowest_loss_found']} "
              f"(val loss {low['val_loss']:.4f}, val BLEU {low['val_bleu']:.2f})", file=out)
        print(f"{at}best found: val BLEU {s['best_found_bleu']:.2f} (loss {s['best_found_loss']:.4f}); "
              f"{s['random']} random at the same budget: best BLEU {s['random_best_bleu']}, "
              f"median {s['random_median_bleu']} (best loss {s['random_best_loss']}, "
              f"median {s['random_median_loss']})", file=out)
