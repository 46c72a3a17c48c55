"""Stage `search`: origin + scored bank + budgets -> the K best configurations, before finetuning.

Each module slot (an attention block or an FFN; with its Linears as further alternatives) takes
exactly one choice: "untouched", one of the block's variants, or one or all of its Linears'
variants at a ratio, never a block and its Linears together. A configuration's estimated damage
is the sum of its choices' scores (``ctprune score``); its parameters, FLOPs and latency are
the origin's plus the sum of its choices' changes. Parameters and FLOPs are exact: each change
is counted on the origin with that one variant swapped in (non-zero parameters, so that
unstructured Linears count; FLOPs by ``ctprune.model.flops`` at the subset's mean lengths), and
both are additive over disjoint modules. Latency is the measured in-context sum (an estimate).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctprune.arch import arch_of
from ctprune.errors import CtpruneError
from ctprune.fileio import write_json
from ctprune.model.checkpoint import load_model_folder
from ctprune.model.flops import parameter_counts
from ctprune.model.transformer import Seq2SeqTransformer
from ctprune.pruning.bank import check_bank_model, load_index, load_variant
from ctprune.pruning.configs import Configuration, model_fingerprint, prunable_modules
from ctprune.pruning.solver import HEURISTICS, PRESOLVE, feasible, smallest_reachable, solve
from ctprune.pruning.surgery import swapped
from ctprune.spec import OBJECTIVES, SearchSpec, check_option, spec_default
from ctprune.stages.score import validation_subset, variant_digest

RESOURCES = ("params", "flops", "latency")
_SUFFIX = {"k": 1e3, "m": 1e6, "g": 1e9}


@dataclass(frozen=True)
class Budget:
    """A limit on one resource: ``relative`` means a fraction of the origin's value."""

    resource: str
    value: float
    relative: bool

    def limit(self, origin: float) -> float:
        return self.value * origin if self.relative else self.value


def parse_budget(resource: str, text: str) -> Budget:
    """``0.6`` or ``60%``: a fraction of the origin; ``12ms``, ``10M``, ``1.5G`` or a plain number
    above 1: absolute (parameters, FLOPs per sentence pair, or milliseconds)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(%|ms|[kKmMgG])?\s*", str(text))
    if resource not in RESOURCES or not m:
        raise CtpruneError(f"--{resource} {text!r}: give a fraction of the origin (0.6 or 60%) or an "
                           "absolute value (10M parameters, 1.5G FLOPs, 12ms)")
    value, unit = float(m.group(1)), m.group(2) or ""
    if not math.isfinite(value) or value <= 0:
        raise CtpruneError(f"--{resource} {text!r}: must be positive")
    if unit == "%":
        return Budget(resource, value / 100, True)
    if unit == "ms" and resource != "latency" or unit.lower() in _SUFFIX and resource == "latency":
        raise CtpruneError(f"--{resource} {text!r}: unit {unit!r} does not fit {resource}")
    if unit:
        return Budget(resource, value * _SUFFIX.get(unit.lower(), 1.0), False)
    return Budget(resource, value, value <= 1)


@dataclass
class Choices:
    """Flat arrays over every (slot, choice): what the solver sees, plus what each choice means."""

    slots: list[str]
    objective: str
    slot: list[int] = field(default_factory=list)
    parts: list[Configuration] = field(default_factory=list)  # {} = untouched
    # Per objective (kl, loss) the estimated damage of each choice; the solver sums the objective's.
    damage: dict[str, list[float]] = field(default_factory=lambda: {o: [] for o in OBJECTIVES})
    costs: dict[str, list[float]] = field(default_factory=lambda: {r: [] for r in RESOURCES})

    @property
    def score(self) -> list[float]:
        return self.damage[self.objective]

    def add(self, slot: int, part: Configuration, damage: dict[str, float], costs: dict[str, float]) -> None:
        self.slot.append(slot)
        self.parts.append(part)
        for o in OBJECTIVES:
            self.damage[o].append(damage.get(o, 0.0))
        for r in RESOURCES:
            self.costs[r].append(costs.get(r, 0.0))


def build_choices(origin: Seq2SeqTransformer, bank: Path, index: dict[str, Any], objective: str,
                  src_len: int, tgt_len: int) -> tuple[Choices, dict[str, float]]:
    """Every slot's choices with their scores and cost changes, and the origin's costs."""
    scores, lat = index["scores"], index["scores"].get("latency")
    origin_nonzero = parameter_counts(origin)[1]
    arch = arch_of(origin)
    origin_flops = arch.forward_flops(origin, src_len, tgt_len)
    base = {"params": float(origin_nonzero), "flops": float(origin_flops),
            "latency": float(lat["origin_ms"]) if lat else math.nan}
    modules = prunable_modules(origin)
    per_variant: dict[str, tuple[str, float, dict[str, float], dict[str, float]]] = {}
    for key, e in index["variants"].items():
        variant = load_variant(bank, index, key, origin)
        with swapped(origin, e["module"], variant):
            cost = {"params": float(parameter_counts(origin)[1] - origin_nonzero),
                    "flops": float(arch.forward_flops(origin, src_len, tgt_len) - origin_flops)}
        if lat:
            cost["latency"] = float(lat["variants"][key]["delta_ms"])
        s = scores["variants"][key]
        damage = {"kl": s["kl"], "loss": s["loss"] - scores["origin"]["loss"]}
        parent = e["module"].rpartition(".")[0]
        slot = parent if modules[e["module"]].kind == "linear" and parent in modules else e["module"]
        per_variant[key] = (slot, e["ratio"], damage, cost)
    slots = list(dict.fromkeys(v[0] for v in per_variant.values()))
    slots.sort(key=list(modules).index)
    ch = Choices(slots, objective)
    for i, name in enumerate(slots):
        ch.add(i, {}, {}, {})
        mine = {k: v for k, v in per_variant.items() if v[0] == name}
        for key, (_, ratio, damage, cost) in mine.items():
            ch.add(i, {index["variants"][key]["module"]: ratio}, damage, cost)
        # All Linears of a block at one ratio, as one more choice (scores and costs add up).
        linears = [k for k in mine if index["variants"][k]["module"] != name]
        for ratio in sorted({mine[k][1] for k in linears}):
            group = [k for k in linears if mine[k][1] == ratio]
            if len(group) > 1:
                ch.add(i, {index["variants"][k]["module"]: ratio for k in group},
                       {o: sum(mine[k][2][o] for k in group) for o in OBJECTIVES},
                       {r: sum(mine[k][3].get(r, 0.0) for k in group) for r in RESOURCES})
    return ch, base


def check_scores(index: dict[str, Any], bank: Path, model_fp: str, subset_meta: dict[str, Any]) -> None:
    """Scores exist, belong to this origin and validation subset, and to these variant weights."""
    scores = index.get("scores")
    if not scores or not scores.get("variants"):
        raise CtpruneError(f"bank {bank} has no variant scores; make them with "
                           f"`ctprune score MODEL --bank {bank}`")
    if scores.get("model_fingerprint") != model_fp:
        raise CtpruneError(f"the scores in bank {bank} were measured with another origin model; "
                           "rerun `ctprune score`")
    theirs = scores.get("subset", {})
    if theirs.get("fingerprint") != subset_meta["fingerprint"]:
        raise CtpruneError(
            f"the scores in bank {bank} come from another validation subset ({theirs.get('corpus')} "
            f"{theirs.get('split')}, {theirs.get('batches')} batches of {theirs.get('max_tokens')} tokens, "
            f"fingerprint {theirs.get('fingerprint')}; here {subset_meta['corpus']} {subset_meta['split']}, "
            f"{subset_meta['batches']} batches of {subset_meta['max_tokens']} tokens, fingerprint "
            f"{subset_meta['fingerprint']}); pass the scoring's --corpus/--batches/--max-tokens or rerun "
            "`ctprune score`")
    stale = [k for k, e in index["variants"].items()
             if scores["variants"].get(k, {}).get("digest") != variant_digest(bank, e)]
    if stale:
        raise CtpruneError(f"bank {bank} changed since it was scored ({len(stale)} variants, e.g. "
                           f"{stale[0]}); rerun `ctprune score MODEL --bank {bank}`")


@dataclass(frozen=True)
class SearchArgs:
    model: Path
    bank: Path
    output: Path
    budgets: tuple[Budget, ...]
    k: int = spec_default(SearchSpec, "k")
    min_distance: int = spec_default(SearchSpec, "min_distance")
    objective: str = spec_default(SearchSpec, "objective")
    time_limit: float = spec_default(SearchSpec, "time_limit")
    # The validation subset; None: the one the bank was scored on (its fingerprint is checked).
    corpus: str | None = None
    data_dir: str | None = None
    batches: int | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.budgets:
            raise CtpruneError("give at least one budget: --flops F, --params P or --latency L")
        if len({b.resource for b in self.budgets}) != len(self.budgets):
            raise CtpruneError("give each of --flops, --params, --latency at most once")
        for name, flag in (("k", "-k"), ("min_distance", "--min-distance"), ("objective", "--objective"),
                           ("time_limit", "--time-limit")):
            check_option(SearchSpec, name, getattr(self, name), flag)


@dataclass
class Problem:
    """A search ready to solve: the origin, the choices as arrays, the limits."""

    origin: Seq2SeqTransformer
    tok: Any
    index: dict[str, Any]
    choices: Choices
    base: dict[str, float]
    resources: list[str]
    limits: np.ndarray
    subset: dict[str, Any]
    args: SearchArgs  # with the subset options resolved

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ch = self.choices
        return (np.array(ch.score), np.array(ch.slot),
                np.array([ch.costs[r] for r in self.resources]).reshape(len(self.resources), -1))

    def configuration(self, taken: tuple[int, ...] | list[int]) -> Configuration:
        conf = {m: r for j in taken for m, r in self.choices.parts[j].items()}
        # An empty configuration is not a valid configuration file entry: name one slot at 1.
        return conf or {self.choices.slots[0]: 1.0}

    def describe(self, taken: tuple[int, ...] | list[int]) -> dict[str, Any]:
        ch = self.choices
        # Both objectives' sums: the one not minimised may rank a found set (README).
        estimates = {o: round(float(sum(ch.damage[o][j] for j in taken)), 6) for o in OBJECTIVES}
        out: dict[str, Any] = {"estimate": estimates[ch.objective], "estimates": estimates}
        for r in RESOURCES:
            if not math.isnan(self.base[r]):
                value = self.base[r] + sum(ch.costs[r][j] for j in taken)
                out[r] = round(value, 4) if r == "latency" else int(round(value))
                out[f"{r}_fraction"] = round(value / self.base[r], 4)
        out["pruned_slots"] = sum(1 for j in taken if ch.parts[j])
        return out


def prepare(a: SearchArgs) -> Problem:
    """Load and check everything; refuse bad input before anything is solved or written."""
    origin, tok, _ = load_model_folder(a.model)
    index = load_index(a.bank)
    model_fp = model_fingerprint(a.model)
    check_bank_model(index, model_fp, a.bank)
    scored = (index.get("scores") or {}).get("subset", {})
    a = dataclasses.replace(a, **{f: scored.get(f, default) for f, default in
                                  (("corpus", "multi30k"), ("batches", 8), ("max_tokens", 4096))
                                  if getattr(a, f) is None})
    subset = validation_subset(tok, arch_of(origin).max_len(origin), a.corpus, a.data_dir, a.batches, a.max_tokens)
    check_scores(index, a.bank, model_fp, subset.meta)
    if any(b.resource == "latency" for b in a.budgets) and not index["scores"].get("latency"):
        raise CtpruneError(f"bank {a.bank} has no latency measurements; make them with "
                           f"`ctprune score MODEL --bank {a.bank} --latency`")
    choices, base = build_choices(origin, a.bank, index, a.objective, subset.meta["src_len"],
                                  subset.meta["tgt_len"])
    if a.min_distance > len(choices.slots):
        raise CtpruneError(f"--min-distance {a.min_distance} is larger than the number of module slots "
                           f"({len(choices.slots)})")
    resources = [b.resource for b in a.budgets]
    limits = np.array([b.limit(base[b.resource]) for b in a.budgets])
    slot = np.array(choices.slot)
    for b, limit in zip(a.budgets, limits):
        least = base[b.resource] + smallest_reachable(slot, np.array(choices.costs[b.resource]))
        if least > limit:
            raise CtpruneError(
                f"no configuration meets --{b.resource} {_show(b.resource, limit, base)}: the smallest "
                f"reachable value with this bank is {_show(b.resource, least, base)}")
    limits = limits - np.array([base[r] for r in resources])  # limits on the summed changes
    return Problem(origin, tok, index, choices, base, resources, limits, subset.meta, a)


def _show(resource: str, value: float, base: dict[str, float]) -> str:
    unit = " ms" if resource == "latency" else ""
    return f"{value:,.4g}{unit} ({value / base[resource]:.3f} of the origin)"


def search(a: SearchArgs) -> tuple[Problem, dict[str, Any]]:
    """Solve, write the configuration file ``a.output`` and ``search.json`` beside it; return the
    problem (for ``--verify``) and the report."""
    p = prepare(a)
    score, slot, costs = p.arrays()
    t0 = time.perf_counter()
    solutions = solve(score, slot, costs, p.limits, k=a.k, min_distance=a.min_distance,
                      time_limit=a.time_limit)
    solver_s = time.perf_counter() - t0
    if not solutions:
        shown = ", ".join(f"--{b.resource} {_show(b.resource, b.limit(p.base[b.resource]), p.base)}"
                          for b in a.budgets)
        raise CtpruneError(f"no configuration meets all budgets together ({shown})")
    for s in solutions:  # the solver re-checked them; this guards the conversion to configurations
        if not feasible(s.choices, slot, costs, p.limits, len(p.choices.slots)):
            raise CtpruneError("internal error: the solver returned an infeasible configuration")
    confs = [p.configuration(s.choices) for s in solutions]
    report: dict[str, Any] = {
        "model": str(a.model), "bank": str(a.bank), "configurations_file": str(a.output),
        "objective": a.objective, "k": a.k, "min_distance": a.min_distance,
        "budgets": {b.resource: {"value": b.value, "relative": b.relative,
                                 "limit": round(float(b.limit(p.base[b.resource])), 4)} for b in a.budgets},
        "origin": {r: round(v, 4) if r == "latency" else int(v) for r, v in p.base.items() if not math.isnan(v)},
        "flops_at": {"src_len": p.subset["src_len"], "tgt_len": p.subset["tgt_len"]},
        "params_counted": "non-zero parameters",
        "slots": len(p.choices.slots), "choices": len(p.choices.slot),
        "solver": {"name": "scipy.optimize.milp (HiGHS)", "time_limit_s": a.time_limit,
                   "highs_presolve": PRESOLVE, "highs_heuristics": HEURISTICS,
                   "total_s": round(solver_s, 4), "found": len(solutions)},
        "configurations": [{**p.describe(s.choices), "status": s.status, "solver_s": round(s.seconds, 4),
                            "configuration": c} for s, c in zip(solutions, confs)],
    }
    write_json(a.output, confs)
    write_json(search_json_path(a.output), report)
    return p, report


def search_json_path(conf_path: Path) -> Path:
    return Path(conf_path).parent / "search.json"
