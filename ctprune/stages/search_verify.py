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

from ctprune.arch import arch_of
from ctprune.data.batching import Batch, TokenizedSplit
from ctprune.data.corpus import default_splits, load_split
from ctprune.fileio import write_json
from ctprune.model.decode import translate
from ctprune.model.flops import parameter_counts
from ctprune.pruning.bank import compose
from ctprune.pruning.solver import feasible
from ctprune.scoring import bleu_score, spearman
from ctprune.spec import OBJECTIVES
from ctprune.stages.search import Problem, search_json_path


def random_feasible(p: Problem, n: int, seed: int = 0, attempts: int = 200_000) -> list[list[int]]:
    """Up to ``n`` distinct configurations drawn uniformly (one random choice per slot) that meet
    the budgets, by rejection."""
    _, slot, costs = p.arrays()
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(slot == s) for s in range(len(p.choices.slots))]
    found: dict[tuple[int, ...], None] = {}
    for _ in range(attempts):
        if len(found) == n:
            break
        taken = [int(rng.choice(g)) for g in groups]
        if feasible(taken, slot, costs, p.limits, len(groups)):
            found.setdefault(tuple(taken))
    return [list(t) for t in found]


@torch.no_grad()
def val_loss(model: torch.nn.Module, batches: list[Batch]) -> float:
    """Mean teacher-forced cross-entropy per target token over ``batches``."""
    total, tokens = 0.0, 0
    for b in batches:
        real = b.tgt_out != b.pad_id  # (B, T)
        logits = arch_of(model).logits(model, b.src, b.tgt_in)[real].float()  # (N, V)
        total += float(torch.nn.functional.cross_entropy(logits, b.tgt_out[real], reduction="sum"))
        tokens += int(real.sum())
    return total / max(tokens, 1)


def verify(p: Problem, report: dict[str, Any], n_random: int = 16,
           sentences: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Measure every found and ``n_random`` random configuration; add the results to
    ``search.json`` and return them. ``sentences`` limits the BLEU sentences (default: all)."""
    a = p.args
    val = load_split(a.corpus, default_splits(a.corpus)[1], a.data_dir)
    batches = TokenizedSplit(val, p.tok, arch_of(p.origin).max_len(p.origin)).batches(a.max_tokens)
    src, refs = val.src[:sentences], val.tgt[:sentences]
    found = [list(c["configuration"].items()) for c in report["configurations"]]
    rand = random_feasible(p, n_random, seed)
    sl, tl = report["flops_at"]["src_len"], report["flops_at"]["tgt_len"]
    t0 = time.perf_counter()

    def measure(conf: dict[str, float], extra: dict[str, Any]) -> dict[str, Any]:
        model = compose(p.origin, a.bank, conf, p.index).eval()
        return {**extra, "val_loss": round(val_loss(model, batches), 4),
                "val_bleu": round(bleu_score(translate(model, p.tok, src), refs).score, 2),
                "params_on_model": parameter_counts(model)[1],
                "flops_on_model": arch_of(model).forward_flops(model, sl, tl)}

    rows = [measure(dict(c), {"kind": "found", "estimate": r["estimate"], "estimates": r["estimates"]})
            for c, r in zip(found, report["configurations"])]
    rows += [measure(p.configuration(t), {"kind": "random", **p.describe(t),
                                          "configuration": p.configuration(t)}) for t in rand]
    origin_row = {"val_loss": round(val_loss(p.origin, batches), 4),
                  "val_bleu": round(bleu_score(translate(p.origin, p.tok, src), refs).score, 2)}
    mine = [r for r in rows if r["kind"] == "found"]
    others = [r for r in rows if r["kind"] == "random"]
    result: dict[str, Any] = {
        "corpus": a.corpus, "split": default_splits(a.corpus)[1], "bleu_sentences": len(src),
        "origin": origin_row, "rows": rows, "wall_time_s": round(time.perf_counter() - t0, 2),
        "spearman_found": spearman([r["estimate"] for r in mine], [r["val_loss"] for r in mine]),
        "spearman_all": spearman([r["estimate"] for r in rows], [r["val_loss"] for r in rows]),
        # Each objective's estimate within the found set: the one the solver did not minimise is
        # not range-restricted by the selection and may rank the found set where the other cannot.
        "spearman_found_by": {o: spearman([r["estimates"][o] for r in mine], [r["val_loss"] for r in mine])
                              for o in OBJECTIVES},
        "best_found_bleu": mine[0]["val_bleu"], "best_found_loss": mine[0]["val_loss"],
        # The estimate does not rank near-optimal configurations (README): the measured best of them.
        "lowest_loss_found": min(range(len(mine)), key=lambda i: mine[i]["val_loss"]),
        "random": len(others),
        "random_best_bleu": max((r["val_bleu"] for r in others), default=None),
        "random_median_bleu": statistics.median([r["val_bleu"] for r in others]) if others else None,
        "random_best_loss": min((r["val_loss"] for r in others), default=None),
        "random_median_loss": round(statistics.median([r["val_loss"] for r in others]), 4) if others else None,
    }
    write_json(search_json_path(a.output), {**report, "verify": result})
    return result


def print_verify(v: dict[str, Any], out: Any = None) -> None:
    """A readable table of the verification and its summary lines."""
    print(f"{'':>3} {'kind':<7} {'estimate':>9} {'val loss':>9} {'val BLEU':>9}", file=out)
    for i, r in enumerate(v["rows"]):
        print(f"{i:>3} {r['kind']:<7} {r['estimate']:>9.4f} {r['val_loss']:>9.4f} {r['val_bleu']:>9.2f}", file=out)
    print(f"origin: val loss {v['origin']['val_loss']:.4f}, val BLEU {v['origin']['val_bleu']:.2f}", file=out)
    print(f"Spearman(estimate, val loss): found {v['spearman_found']}, found+random {v['spearman_all']}; "
          "within the found by each objective's estimate: "
          + ", ".join(f"{o} {rho}" for o, rho in v["spearman_found_by"].items()), file=out)
    low = v["rows"][v["lowest_loss_found"]]
    print(f"lowest measured val loss of the found: configuration {v['lowest_loss_found']} "
          f"(val loss {low['val_loss']:.4f}, val BLEU {low['val_bleu']:.2f})", file=out)
    print(f"best found: val BLEU {v['best_found_bleu']:.2f} (loss {v['best_found_loss']:.4f}); "
          f"{v['random']} random at the same budget: best BLEU {v['random_best_bleu']}, "
          f"median {v['random_median_bleu']} (best loss {v['random_best_loss']}, "
          f"median {v['random_median_loss']})", file=out)
