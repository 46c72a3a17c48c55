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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ctprune.arch import Architecture, arch_of
from ctprune.budget import RESOURCES, Budget, describe_point
from ctprune.budget import budget_sweep as budget_sweep  # the grammar's home is ctprune.budget; kept importable
from ctprune.budget import parse_budget as parse_budget  # from here for the callers that import it so
from ctprune.errors import CtpruneError
from ctprune.fileio import write_json
from ctprune.model.checkpoint import load_model_folder
from ctprune.model.flops import parameter_counts
from ctprune.model.transformer import Seq2SeqTransformer
from ctprune.pruning.bank import check_bank_model, load_index, load_variant
from ctprune.pruning.configs import Configuration, model_fingerprint
from ctprune.pruning.solver import HEURISTICS, PRESOLVE, feasible, smallest_reachable, solve
from ctprune.pruning.surgery import swapped
from ctprune.spec import OBJECTIVES, spec_default
from ctprune.stages.args import ScoreArgs, SearchArgs
from ctprune.stages.score import validation_subset, variant_digest

if TYPE_CHECKING:
    from ctprune.stages.search_refine import Measurer

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


def build_choices(arch: Architecture, origin: Seq2SeqTransformer, bank: Path, index: dict[str, Any], objective: str,
                  src_len: int, tgt_len: int) -> tuple[Choices, dict[str, float]]:
    """Every slot's choices with their scores and cost changes, and the origin's costs."""
    scores, lat = index["scores"], index["scores"].get("latency")
    origin_nonzero = parameter_counts(origin)[1]
    origin_flops = arch.forward_flops(origin, src_len, tgt_len)
    base = {"params": float(origin_nonzero), "flops": float(origin_flops),
            "latency": float(lat["origin_ms"]) if lat else math.nan}
    modules = arch.units(origin)
    per_variant: dict[str, tuple[str, float, dict[str, float], dict[str, float]]] = {}
    for key, e in index["variants"].items():
        variant = load_variant(bank, index, key, origin)
        with swapped(arch, origin, e["module"], variant):
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


@dataclass
class Problem:
    """A search ready to solve: the origin, the choices as arrays, the limits of each budget point."""

    arch: Architecture  # the origin's
    origin: Seq2SeqTransformer
    tok: Any
    index: dict[str, Any]
    choices: Choices
    base: dict[str, float]
    resources: list[str]
    limits: np.ndarray  # (P, R): per budget point and resource, the limit on the summed changes
    subset: dict[str, Any]
    args: SearchArgs  # with the subset options resolved
    batches: list[Any] = field(default_factory=list)  # the scoring subset's batches (measured refinement)

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

    def budget_table(self, point: int) -> dict[str, Any]:
        """``{resource: {value, relative, limit}}`` of budget point ``point`` (search.json's form)."""
        return {b.resource: {"value": b.value, "relative": b.relative,
                             "limit": round(float(b.limit(self.base[b.resource])), 4)}
                for b in self.args.budgets[point]}


def prepare(a: SearchArgs) -> Problem:
    """Load and check everything; refuse bad input before anything is solved or written."""
    origin, tok, _ = load_model_folder(a.model)
    arch = arch_of(origin)
    index = load_index(a.bank)
    model_fp = model_fingerprint(a.model)
    check_bank_model(index, model_fp, a.bank)
    scored = (index.get("scores") or {}).get("subset", {})
    # Not given: the subset the bank was scored on (else `ctprune score`'s defaults).
    a = dataclasses.replace(a, **{f: scored.get(f, spec_default(ScoreArgs, f))
                                  for f in ("corpus", "batches", "max_tokens") if getattr(a, f) is None})
    subset = validation_subset(tok, arch.max_len(origin), a.corpus, a.data_dir, a.batches, a.max_tokens)
    check_scores(index, a.bank, model_fp, subset.meta)
    if any(b.resource == "latency" for b in a.budgets[0]) and not index["scores"].get("latency"):
        raise CtpruneError(f"bank {a.bank} has no latency measurements; make them with "
                           f"`ctprune score MODEL --bank {a.bank} --latency`")
    choices, base = build_choices(arch, origin, a.bank, index, a.objective, subset.meta["src_len"],
                                  subset.meta["tgt_len"])
    if a.min_distance > len(choices.slots):
        raise CtpruneError(f"--min-distance {a.min_distance} is larger than the number of module slots "
                           f"({len(choices.slots)})")
    resources = [b.resource for b in a.budgets[0]]
    limits = np.array([[b.limit(base[b.resource]) for b in point] for point in a.budgets])  # (P, R)
    slot = np.array(choices.slot)
    for r, resource in enumerate(resources):
        least = base[resource] + smallest_reachable(slot, np.array(choices.costs[resource]))
        for point, limit in zip(a.budgets, limits[:, r]):
            if least > limit:
                raise CtpruneError(
                    f"no configuration meets --{resource} {_show(resource, limit, base)}"
                    f"{f' ({describe_point(point)})' if len(a.budgets) > 1 else ''}: the smallest reachable "
                    f"value with this bank is {_show(resource, least, base)}")
    limits = limits - np.array([base[r] for r in resources])  # limits on the summed changes
    return Problem(arch, origin, tok, index, choices, base, resources, limits, subset.meta, a, subset.batches)


def _show(resource: str, value: float, base: dict[str, float]) -> str:
    unit = " ms" if resource == "latency" else ""
    return f"{value:,.4g}{unit} ({value / base[resource]:.3f} of the origin)"


def uniform_choices(p: Problem, kinds: tuple[str, ...], point: int) -> tuple[list[int], list[float]] | None:
    """The uniform competitor at budget point ``point``: every module of ``kinds`` at one keep
    ratio of the bank's grid, the largest whose model meets the budgets; when the next larger
    ratio does not, modules are raised to it one at a time in model order (skipping one that
    would break a budget), so the result mixes the nearest pair of ratios and no further module
    fits the higher one. Modules of other kinds stay untouched; with ``linear`` among ``kinds``
    a block of another kind has all its Linears at the ratio. Untouched (1) tops the ratios.

    Returns (one choice index per slot, the ratios used: [r] or [r, higher r]), or None when
    even every module at the smallest ratio misses the budgets."""
    ch, units = p.choices, p.arch.units(p.origin)
    _, slot, costs = p.arrays()
    limits = p.limits[point]
    at: list[dict[float, int]] = []  # per slot: keep ratio -> its uniform choice
    for i, name in enumerate(ch.slots):
        mine = [j for j in range(len(ch.slot)) if ch.slot[j] == i]
        linears = {m for j in mine for m in ch.parts[j]} - {name}
        wanted = {name} if units[name].kind in kinds else linears if "linear" in kinds else set()
        ratios = {j: set(ch.parts[j].values()) for j in mine}
        at.append({next(iter(ratios[j])): j for j in mine
                   if ch.parts[j] and set(ch.parts[j]) == wanted and len(ratios[j]) == 1})
        at[-1][1.0] = next(j for j in mine if not ch.parts[j])
    uniform = [i for i, a in enumerate(at) if len(a) > 1]
    if not uniform:
        return None
    ladder = sorted(set.intersection(*(set(at[i]) for i in uniform)))

    def meets(taken: list[int]) -> bool:
        return feasible(taken, slot, costs, limits, len(ch.slots))

    fits = [r for r in ladder if meets([a.get(r, a[1.0]) for a in at])]
    if not fits:
        return None
    low = fits[-1]
    taken = [a.get(low, a[1.0]) for a in at]
    if low == 1.0:
        return taken, [low]
    high = ladder[ladder.index(low) + 1]
    for i in uniform:
        trial = [*taken[:i], at[i][high], *taken[i + 1:]]
        if meets(trial):
            taken = trial
    return taken, [low, high] if any(taken[i] == at[i][high] for i in uniform) else [low]


def grid_kinds(index: dict[str, Any]) -> tuple[str, ...]:
    """The module kinds of a bank's variants (a grid bank's ``kinds``)."""
    return tuple(sorted({e["kind"] for e in index["variants"].values()}))


def search(a: SearchArgs) -> tuple[Problem, dict[str, Any]]:
    """Solve every budget point (k configurations each), write the configuration file ``a.output``
    (every point's configurations, point by point) and ``search.json`` beside it; return the
    problem (for ``--verify``) and the report."""
    p = prepare(a)
    score, slot, costs = p.arrays()
    kinds = grid_kinds(p.index)
    solver_s = refine_s = 0.0
    rows: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []
    measure: Measurer | None = None
    for point, limits in enumerate(p.limits):
        t0 = time.perf_counter()
        solutions = solve(score, slot, costs, limits, k=a.k, min_distance=a.min_distance,
                          time_limit=a.time_limit)
        solver_s += time.perf_counter() - t0
        if not solutions:
            raise CtpruneError(f"no configuration meets all budgets together ({describe_point(a.budgets[point])})")
        for s in solutions:  # the solver re-checked them; this guards the conversion to configurations
            if not feasible(s.choices, slot, costs, limits, len(p.choices.slots)):
                raise CtpruneError("internal error: the solver returned an infeasible configuration")
        uni = uniform_choices(p, kinds, point)
        if a.refine:
            from ctprune.stages.search_refine import Measurer

            t0 = time.perf_counter()
            measure = measure or Measurer(p)  # one cache for every budget point
            mine = _refined_rows(p, point, solutions, uni, measure)
            refine_s += time.perf_counter() - t0
        else:
            mine = [{**p.describe(s.choices), "budget": point, "status": s.status, "solver_s": round(s.seconds, 4),
                     "configuration": p.configuration(s.choices)} for s in solutions]
        rows += mine
        sweep.append({"budgets": p.budget_table(point), "k": a.k, "found": len(mine),
                      "uniform": None if uni is None else {**p.describe(uni[0]), "ratios": uni[1], "kinds": list(kinds),
                                                           "configuration": p.configuration(uni[0])}})
    report: dict[str, Any] = {
        "model": str(a.model), "bank": str(a.bank), "configurations_file": str(a.output),
        "objective": a.objective, "k": a.k, "min_distance": a.min_distance,
        **({"refine": {"evaluations": a.refine, "candidates_measured": len(measure.cache),
                       "seconds": round(refine_s, 2)}} if measure else {}),
        # One budget point: its table, as single-budget search.json files have it.
        **({"budgets": p.budget_table(0)} if len(a.budgets) == 1 else {}),
        "sweep": sweep,
        "notes": shortfalls(sweep, a.min_distance),
        "origin": {r: round(v, 4) if r == "latency" else int(v) for r, v in p.base.items() if not math.isnan(v)},
        "flops_at": {"src_len": p.subset["src_len"], "tgt_len": p.subset["tgt_len"]},
        "params_counted": "non-zero parameters",
        "slots": len(p.choices.slots), "choices": len(p.choices.slot),
        "solver": {"name": "scipy.optimize.milp (HiGHS)", "time_limit_s": a.time_limit,
                   "highs_presolve": PRESOLVE, "highs_heuristics": HEURISTICS,
                   "total_s": round(solver_s, 4), "found": len(rows)},
        "configurations": rows,
    }
    write_json(a.output, [r["configuration"] for r in rows])
    write_json(search_json_path(a.output), report)
    return p, report


def _refined_rows(p: Problem, point: int, solutions: list[Any], uni: tuple[list[int], list[float]] | None,
                  measure: Measurer) -> list[dict[str, Any]]:
    """search.json rows of the refined configurations of budget point ``point`` (stages/search_refine.py)."""
    from ctprune.stages.search_refine import refine

    a = p.args
    starts = [(tuple(s.choices), "solver") for s in solutions] + ([(tuple(uni[0]), "uniform")] if uni else [])
    found = refine(p, point, starts, a.k, a.min_distance, a.refine, measure=measure)
    return [{**p.describe(m.taken), "budget": point, "status": "refined", "source": m.source,
             "measured": m.value, "configuration": p.configuration(m.taken)} for m in found]


def budget_points(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per budget point of a search.json (this one's or an older single-budget one's), its
    ``{resource: {value, relative, limit}}`` table."""
    if "sweep" in report:
        return [s["budgets"] for s in report["sweep"]]
    return [report["budgets"]]


def describe_table(table: dict[str, Any]) -> str:
    """A search.json budget table in words: ``flops <= 0.5 of the origin``."""
    return describe_point(tuple(Budget(r, b["value"], b["relative"]) for r, b in table.items()))


def shortfalls(sweep: list[dict[str, Any]], min_distance: int) -> list[str]:
    """One line per budget point under which fewer than k configurations were found."""
    return [f"only {s['found']} configuration{'s' * (s['found'] != 1)} (of k = {s['k']}) found under "
            f"{describe_table(s['budgets'])}: no other meets it at least {min_distance} slot(s) apart from "
            "those (or the solver's time limit ran out)" for s in sweep if s["found"] < s["k"]]


def search_json_path(conf_path: Path) -> Path:
    return Path(conf_path).parent / "search.json"
