"""Search: grid banks, variant scores, the MIP solver (against brute force) and `ctprune search`."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ctprune.arch import arch_of
from ctprune.cli import main
from ctprune.errors import CtpruneError
from ctprune.model.checkpoint import load_model_folder, save_model_folder
from ctprune.model.flops import forward_flops, parameter_counts
from ctprune.model.transformer import Seq2SeqTransformer
from ctprune.pruning.bank import Bank, compose, load_index
from ctprune.pruning.configs import load_configurations, prunable_modules
from ctprune.pruning.solver import feasible, smallest_reachable, solve
from ctprune.spec import SearchSpec, from_table
from ctprune.stages.configs import PlanArgs, write_plan
from ctprune.stages.prune import PruneArgs, prune
from ctprune.stages.score import ScoreArgs, score_bank, validation_subset
from ctprune.stages.search import (
    SearchArgs,
    budget_points,
    budget_sweep,
    parse_budget,
    prepare,
    search,
    uniform_choices,
)
from ctprune.stages.tune_blocks import TuneArgs, tune_blocks

from .conftest import run_cli, tiny_config

SUBSET = {"corpus": "synthetic", "batches": 2, "max_tokens": 1024}
SUBSET_CLI = ["--corpus", "synthetic", "--batches", "2", "--max-tokens", "1024"]


# --- the solver against brute-force enumeration ---------------------------------------------

def random_instance(seed: int, n_slots: int, resources: int) -> tuple[np.ndarray, ...]:
    """Slots of 1-4 choices; choice 0 of each is "untouched" (score 0, cost 0); pruning lowers
    costs and adds damage. Limits between the cheapest and the origin."""
    rng = np.random.default_rng(seed)
    slot, score, costs = [], [], []
    for s in range(n_slots):
        for j in range(int(rng.integers(1, 5))):
            slot.append(s)
            score.append(0.0 if j == 0 else float(rng.random()))
            costs.append([0.0] * resources if j == 0 else list(-rng.integers(1, 100, resources).astype(float)))
    costs_arr = np.array(costs).T  # (R, n)
    slot_arr = np.array(slot)
    least = np.array([sum(costs_arr[r][slot_arr == s].min() for s in range(n_slots)) for r in range(resources)])
    limits = least * rng.uniform(0.2, 0.7, resources)
    return np.array(score), slot_arr, costs_arr, limits


def brute_force(score: np.ndarray, slot: np.ndarray, costs: np.ndarray, limits: np.ndarray, k: int,
                d: int) -> list[float]:
    """Objectives of the greedy sequence of best points, each at distance >= d from the earlier."""
    groups = [np.flatnonzero(slot == s) for s in range(int(slot.max()) + 1)]
    points = [(float(score[list(c)].sum()), c) for c in itertools.product(*groups)
              if np.all(costs[:, list(c)].sum(axis=1) <= limits)]
    chosen: list[tuple[float, tuple[int, ...]]] = []
    for _ in range(k):
        ok = [p for p in points if all(sum(a != b for a, b in zip(p[1], q[1])) >= d for q in chosen)]
        if not ok:
            break
        chosen.append(min(ok))
    return [c[0] for c in chosen]


@pytest.mark.parametrize("resources", [1, 2, 3], ids=["params", "params+flops", "params+flops+latency"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_solver_optimum_equals_brute_force(seed: int, resources: int) -> None:
    score, slot, costs, limits = random_instance(seed, n_slots=5, resources=resources)
    expected = brute_force(score, slot, costs, limits, k=3, d=2)
    found = solve(score, slot, costs, limits, k=3, min_distance=2)
    assert [round(s.objective, 9) for s in found] == [round(v, 9) for v in expected]
    for s in found:
        assert sorted(int(slot[j]) for j in s.choices) == list(range(5))
        assert np.all(costs[:, list(s.choices)].sum(axis=1) <= limits)
    for a, b in itertools.combinations(found, 2):
        assert sum(x != y for x, y in zip(a.choices, b.choices)) >= 2


@pytest.mark.filterwarnings("error")  # the HiGHS options solve passes raise no warning either
@pytest.mark.parametrize("presolve,heuristics", [(True, True), (False, False), (False, True)])
def test_solver_optimum_is_the_same_whatever_highs_settings(presolve: bool, heuristics: bool) -> None:
    score, slot, costs, limits = random_instance(7, n_slots=6, resources=2)
    expected = brute_force(score, slot, costs, limits, k=4, d=2)
    found = solve(score, slot, costs, limits, k=4, min_distance=2, presolve=presolve, heuristics=heuristics)
    assert [round(s.objective, 9) for s in found] == [round(v, 9) for v in expected]
    assert [s.choices for s in found] == [s.choices for s in solve(score, slot, costs, limits, k=4, min_distance=2)]


def test_solver_returns_nothing_when_no_point_is_feasible() -> None:
    score, slot, costs, _ = random_instance(5, n_slots=4, resources=1)
    least = np.array([sum(costs[0][slot == s].min() for s in range(4))])
    assert solve(score, slot, costs, least - 1) == []
    assert len(solve(score, slot, costs, least, k=3)) == 1  # the cheapest point and nothing else


@pytest.mark.parametrize("text,expected", [("0.6", (0.6, True)), ("60%", (0.6, True)),
                                           ("10M", (1e7, False)), ("2500", (2500.0, False))])
def test_budgets_are_fractions_or_absolute(text: str, expected: tuple[float, bool]) -> None:
    b = parse_budget("params", text)
    assert (round(b.value, 9), b.relative) == expected


# --- grid bank, scores, search on the tiny model ---------------------------------------------

@pytest.fixture(scope="module")
def grid(model_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("search")
    prune(PruneArgs(model=model_folder, output=d / "bank", grid=[0.25, 0.5, 0.75]))
    score_bank(ScoreArgs(model=model_folder, bank=d / "bank", latency=True, latency_repeats=2,
                         **SUBSET))  # type: ignore[arg-type]
    return {"dir": d, "bank": d / "bank"}


def test_grid_bank_has_every_block_at_every_ratio(grid: dict[str, Path], model_folder: Path) -> None:
    index = load_index(grid["bank"])
    origin, _, _ = load_model_folder(model_folder)
    blocks = [n for n, m in prunable_modules(origin).items() if m.kind in ("attention", "ffn")]
    assert len(blocks) == 10
    assert sorted(index["variants"]) == sorted(f"{n}@{r:g}" for n in blocks for r in (0.25, 0.5, 0.75))
    scores = index["scores"]
    assert set(scores["variants"]) == set(index["variants"]) and scores["scored"] == 30
    assert all(s["kl"] >= 0 for s in scores["variants"].values())
    assert set(scores["latency"]["variants"]) == set(index["variants"])


def test_score_of_a_variant_equals_the_composed_model(grid: dict[str, Path], model_folder: Path) -> None:
    """The shared computation (cached layer inputs, no encoder rerun for decoder variants) gives
    the same KL as running the whole composed model."""
    origin, tok, _ = load_model_folder(model_folder)
    index = load_index(grid["bank"])
    subset = validation_subset(tok, origin.cfg.max_len, **SUBSET)  # type: ignore[arg-type]
    b = subset.batches[0]
    arch = arch_of(origin)
    with torch.no_grad():
        logits, trace = arch.traced_logits(origin, b.src, b.tgt_in)
        for name in ("encoder.layers.0.ffn", "decoder.layers.1.cross_attn"):
            torch.testing.assert_close(arch.logits_after(origin, name, b.src, b.tgt_in, trace), logits)
    for key in ("encoder.layers.1.self_attn@0.25", "decoder.layers.0.ffn@0.5"):
        entry = index["variants"][key]
        model = compose(origin, grid["bank"], {entry["module"]: entry["ratio"]}).eval()
        kl = tokens = 0.0
        with torch.no_grad():
            for b in subset.batches:
                real = b.tgt_out != 0
                ref = origin(b.src, b.tgt_in).log_softmax(-1)[real]
                logp = model(b.src, b.tgt_in).log_softmax(-1)[real]
                kl += float((ref.exp() * (ref - logp)).sum())
                tokens += int(real.sum())
        assert index["scores"]["variants"][key]["kl"] == pytest.approx(kl / tokens, rel=1e-3, abs=1e-6)


def slot_choices(conf: dict[str, float], modules: dict[str, object]) -> dict[str, tuple]:
    out: dict[str, list] = {}
    for m, r in conf.items():
        if r < 1:
            parent = m.rpartition(".")[0]
            out.setdefault(parent if parent in modules else m, []).append((m, r))
    return {k: tuple(sorted(v)) for k, v in out.items()}


def test_every_solution_meets_its_budgets_on_the_composed_model(grid: dict[str, Path], model_folder: Path
                                                                ) -> None:
    out = grid["dir"] / "found" / "conf.json"
    args = SearchArgs(model=model_folder, bank=grid["bank"], output=out, k=5, min_distance=2,
                      budgets=(parse_budget("params", "0.8"), parse_budget("flops", "0.6")), **SUBSET)  # type: ignore[arg-type]
    _, report = search(args)
    origin, _, _ = load_model_folder(model_folder)
    modules = prunable_modules(origin)
    confs = load_configurations(out, modules)  # the configuration format plan/compose/finetune read
    assert len(confs) == 5 and json.loads((out.parent / "search.json").read_text())["solver"]["found"] == 5
    write_plan(PlanArgs(configurations=out, model=model_folder, output=grid["dir"] / "found" / "plan.json"))
    sl, tl = report["flops_at"]["src_len"], report["flops_at"]["tgt_len"]
    params_limit, flops_limit = report["budgets"]["params"]["limit"], report["budgets"]["flops"]["limit"]
    assert params_limit == pytest.approx(0.8 * parameter_counts(origin)[1])
    assert flops_limit == pytest.approx(0.6 * forward_flops(origin.cfg, sl, tl))
    for conf, row in zip(confs, report["configurations"]):
        model = compose(origin, grid["bank"], conf).eval()
        assert parameter_counts(model)[1] == row["params"] <= params_limit
        assert forward_flops(model.cfg, sl, tl) == row["flops"] <= flops_limit
    estimates = [r["estimate"] for r in report["configurations"]]
    assert estimates == sorted(estimates)
    for a, b in itertools.combinations([slot_choices(c, modules) for c in confs], 2):
        assert sum(a.get(s) != b.get(s) for s in set(a) | set(b)) >= 2


def test_search_and_verify_from_the_command_line(grid: dict[str, Path], model_folder: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = grid["dir"] / "cli" / "conf.json"
    # No subset options: the subset the bank was scored on.
    rc = main(["search", str(model_folder), "--bank", str(grid["bank"]), "--flops", "0.7", "--latency", "0.95",
               "-k", "3", "--verify", "--random", "3", "--verify-sentences", "16", "-o", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "Spearman(estimate, val loss)" in printed and "solver" in printed
    report = json.loads((out.parent / "search.json").read_text())
    assert len(report["configurations"]) == 3 and all(c["latency_fraction"] <= 0.95 for c in report["configurations"])
    v = report["verify"]
    assert [r["kind"] for r in v["rows"]].count("found") == 3 and v["random"] == 3
    assert all(r["flops_on_model"] <= report["budgets"]["flops"]["limit"] for r in v["rows"])
    # both objectives' estimates: each the sum of its variants' scores in the bank
    index = load_index(grid["bank"])
    scores, variants = index["scores"], index["variants"]
    for c in report["configurations"]:
        taken = [k for k, e in variants.items() if c["configuration"].get(e["module"]) == e["ratio"]]
        assert c["estimates"]["kl"] == c["estimate"] == pytest.approx(sum(scores["variants"][k]["kl"] for k in taken),
                                                                      abs=1e-5)
        assert c["estimates"]["loss"] == pytest.approx(
            sum(scores["variants"][k]["loss"] - scores["origin"]["loss"] for k in taken), abs=1e-5)
    assert set(v["spearman_found_by"]) == {"kl", "loss"}
    losses = [r["val_loss"] for r in v["rows"][:3]]  # the found ones come first, in the solver's order
    assert losses[v["lowest_loss_found"]] == min(losses)
    assert f"lowest measured val loss of the found: configuration {v['lowest_loss_found']} " in printed


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory, model_folder: Path) -> Path:
    _, tok, _ = load_model_folder(model_folder)
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("other") / "origin"
    save_model_folder(folder, Seq2SeqTransformer(tiny_config(vocab_size=tok.vocab_size)), tok, {"stage": "test"})
    return folder


@pytest.mark.parametrize("case", ["infeasible", "unscored", "other model", "k", "distance", "subset", "latency"])
def test_bad_input_is_refused_in_one_line_and_writes_nothing(
        case: str, grid: dict[str, Path], model_folder: Path, other_model: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    bank, model, extra = grid["bank"], model_folder, ["--flops", "0.6"]
    expect = {"infeasible": "smallest reachable value", "unscored": "ctprune score", "other model": "another model",
              "k": "-k must be at least 1", "distance": "larger than the number of module slots",
              "subset": "another validation subset", "latency": "--latency"}[case]
    subset = SUBSET_CLI
    if case == "infeasible":
        extra = ["--flops", "0.05"]
    elif case == "unscored":
        bank = grid["dir"] / "unscored"
        if not bank.exists():
            prune(PruneArgs(model=model_folder, output=bank, grid=[0.5], kinds=("ffn",)))
    elif case == "other model":
        model = other_model
    elif case == "k":
        extra += ["-k", "0"]
    elif case == "distance":
        extra += ["--min-distance", "11"]
    elif case == "subset":
        subset = [*SUBSET_CLI[:-3], "1", *SUBSET_CLI[-2:]]  # --batches 1
    elif case == "latency":
        bank, extra = grid["dir"] / "no-latency", ["--latency", "0.9"]
        if not bank.exists():
            shutil.copytree(grid["bank"], bank)
            index = load_index(bank)
            del index["scores"]["latency"]
            (bank / "index.json").write_text(json.dumps(index))
    out = grid["dir"] / f"bad-{case.replace(' ', '-')}" / "conf.json"
    rc = main(["search", str(model), "--bank", str(bank), *extra, *subset, "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("ctprune search: error: ") and err.count("\n") == 1, err
    assert expect in err and not out.parent.exists()


def test_refusal_through_the_real_command_has_no_traceback(grid: dict[str, Path], model_folder: Path) -> None:
    out = grid["dir"] / "refused" / "conf.json"
    r = run_cli("search", str(model_folder), "--bank", str(grid["bank"]), "--params", "0.01", *SUBSET_CLI,
                "-o", str(out))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "smallest reachable value" in r.stderr and not out.parent.exists()


def test_scores_are_reused_then_recomputed_when_the_bank_changes(grid: dict[str, Path], model_folder: Path
                                                                 ) -> None:
    bank = grid["dir"] / "changed"
    shutil.copytree(grid["bank"], bank)
    assert score_bank(ScoreArgs(model=model_folder, bank=bank, **SUBSET))["scored"] == 0  # type: ignore[arg-type]
    changed = Bank.open(bank)
    key = "decoder.layers.1.ffn@0.5"
    origin, _, _ = load_model_folder(model_folder)
    variant = changed.load_variant(key, origin)
    with torch.no_grad():
        variant.linear1.weight.mul_(0.5)
    changed.add(key, variant, changed.variants[key])
    changed.write()
    args = ["search", str(model_folder), "--bank", str(bank), "--flops", "0.6", *SUBSET_CLI]
    assert main([*args, "-o", str(bank.parent / "stale" / "conf.json")]) == 2
    s = score_bank(ScoreArgs(model=model_folder, bank=bank, **SUBSET))  # type: ignore[arg-type]
    assert (s["scored"], s["reused"]) == (1, 29) and "latency" not in s  # latency no longer matches
    assert s["variants"][key]["kl"] != load_index(grid["bank"])["scores"]["variants"][key]["kl"]
    assert score_bank(ScoreArgs(model=model_folder, bank=bank,
                                **{**SUBSET, "batches": 1}))["scored"] == 30  # type: ignore[arg-type]


def test_tune_blocks_works_on_a_grid_bank(grid: dict[str, Path], model_folder: Path) -> None:
    tuned = grid["dir"] / "tuned"
    index = tune_blocks(TuneArgs(model=model_folder, bank=grid["bank"], output=tuned, epochs=1, corpus="synthetic",
                                 lr=2e-3, max_tokens=4096, device="cpu", patience=0))
    assert len(index["variants"]) == 30 and index["tuning"]["epochs_done"] == 1
    s = score_bank(ScoreArgs(model=model_folder, bank=tuned, **SUBSET))  # type: ignore[arg-type]
    changed = sum(e["provenance"]["stage"] == "tuned" for e in load_index(tuned)["variants"].values())
    assert changed > 0 and s["scored"] == changed


def test_a_block_and_its_linears_are_alternatives_of_one_slot(grid: dict[str, Path], model_folder: Path) -> None:
    bank = grid["dir"] / "with-linears"
    prune(PruneArgs(model=model_folder, output=bank, grid=[0.5], kinds=("ffn", "linear")))
    score_bank(ScoreArgs(model=model_folder, bank=bank, **{**SUBSET, "batches": 1}))  # type: ignore[arg-type]
    out = grid["dir"] / "linears" / "conf.json"
    args = SearchArgs(model=model_folder, bank=bank, output=out, k=6, min_distance=1,
                      budgets=(parse_budget("params", "0.9"),), **{**SUBSET, "batches": 1})  # type: ignore[arg-type]
    problem, report = search(args)
    assert len(problem.choices.slots) == 10  # 4 FFNs and 6 attention blocks (through their Linears)
    origin, _, _ = load_model_folder(model_folder)
    confs = load_configurations(out, prunable_modules(origin))  # refuses a block with its Linears
    assert any(m.endswith(("proj", "linear1", "linear2")) for c in confs for m in c)
    for conf, row in zip(confs, report["configurations"]):
        assert parameter_counts(compose(origin, bank, conf))[1] == row["params"] <= report["budgets"]["params"]["limit"]


# --- budget sweeps, the fewer-than-k note, the uniform competitor ----------------------------

def test_budget_sweep_pairs_lists_and_repeats_single_values() -> None:
    points = budget_sweep({"flops": ["0.75", 0.5, "35%"], "params": "10M", "latency": None})
    assert [[(b.resource, round(b.value, 9), b.relative) for b in p] for p in points] == [
        [("flops", 0.75, True), ("params", 1e7, False)], [("flops", 0.5, True), ("params", 1e7, False)],
        [("flops", 0.35, True), ("params", 1e7, False)]]
    with pytest.raises(CtpruneError, match="one length"):
        budget_sweep({"flops": ["0.75", "0.5"], "params": ["0.9", "0.8", "0.7"]})
    # [search] takes a list or, as older experiment files have it, one value
    assert from_table(SearchSpec, {"flops": [0.75, 0.5], "k": 4}, "e.toml", "search").flops == ("0.75", "0.5")
    assert from_table(SearchSpec, {"flops": 0.6, "params": "10M"}, "e.toml", "search").budgets == (
        ("flops", "0.6"), ("params", "10M"))
    with pytest.raises(CtpruneError, match="e.toml: .*--flops 'lots'"):
        from_table(SearchSpec, {"flops": [0.5, "lots"]}, "e.toml", "search")


def test_a_budget_sweep_gives_k_configurations_per_budget_each_within_it(grid: dict[str, Path],
                                                                         model_folder: Path) -> None:
    out = grid["dir"] / "sweep" / "conf.json"
    args = SearchArgs(model=model_folder, bank=grid["bank"], output=out, k=3, min_distance=2,
                      budgets=budget_sweep({"flops": ["0.8", "0.6", "0.5"], "params": "0.9"}), **SUBSET)  # type: ignore[arg-type]
    _, report = search(args)
    origin, _, _ = load_model_folder(model_folder)
    confs = load_configurations(out, prunable_modules(origin))
    assert "budgets" not in report and len(report["sweep"]) == 3 and report["notes"] == []
    assert [r["budget"] for r in report["configurations"]] == [0] * 3 + [1] * 3 + [2] * 3
    assert len(confs) == 9 and [s["found"] for s in report["sweep"]] == [3, 3, 3]
    tables = budget_points(json.loads((out.parent / "search.json").read_text()))
    assert [t["flops"]["value"] for t in tables] == [0.8, 0.6, 0.5] and all(t["params"]["value"] == 0.9 for t in tables)
    sl, tl = report["flops_at"]["src_len"], report["flops_at"]["tgt_len"]
    for conf, row in zip(confs, report["configurations"]):
        model = compose(origin, grid["bank"], conf)
        limit = tables[row["budget"]]
        assert forward_flops(model.cfg, sl, tl) == row["flops"] <= limit["flops"]["limit"]
        assert parameter_counts(model)[1] == row["params"] <= limit["params"]["limit"]
    # a tighter budget never finds a better estimate than a looser one
    best = [min(r["estimate"] for r in report["configurations"] if r["budget"] == i) for i in range(3)]
    assert best == sorted(best)


def test_fewer_than_k_is_said_on_the_first_line(grid: dict[str, Path], model_folder: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """At the smallest reachable FLOPs only one configuration exists (every block at 0.25); -k 4
    says so first, and --verify says it drew no random configuration."""
    p = prepare(SearchArgs(model=model_folder, bank=grid["bank"], output=grid["dir"] / "unused.json",
                           budgets=(parse_budget("flops", "0.9"),), **SUBSET))  # type: ignore[arg-type]
    _, slot, costs = p.arrays()
    least = int(p.base["flops"] + smallest_reachable(slot, costs[0]))
    out = grid["dir"] / "short" / "conf.json"
    rc = main(["search", str(model_folder), "--bank", str(grid["bank"]), "--flops", str(least), "-k", "4",
               "--verify", "--random", "2", "--verify-sentences", "4", *SUBSET_CLI, "-o", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0 and lines[0].startswith("note: only 1 configuration (of k = 4) found under flops <= ")
    assert any(line.startswith("note: budget 0: no random configuration meets it") for line in lines)
    report = json.loads((out.parent / "search.json").read_text())
    assert report["sweep"][0]["found"] == 1 and report["verify"]["random"] == 0
    assert set(report["configurations"][0]["configuration"].values()) == {0.25}


@pytest.mark.parametrize("flops", ["0.95", "0.8", "0.65", "0.5"])
def test_uniform_meets_its_budget_and_is_the_largest_such(grid: dict[str, Path], model_folder: Path,
                                                          flops: str) -> None:
    p = prepare(SearchArgs(model=model_folder, bank=grid["bank"], output=grid["dir"] / "unused.json",
                           budgets=budget_sweep({"flops": flops, "params": "0.95"}), **SUBSET))  # type: ignore[arg-type]
    _, slot, costs = p.arrays()
    taken, ratios = uniform_choices(p, ("attention", "ffn"), 0)  # type: ignore[misc]
    conf = {m: r for m, r in p.configuration(taken).items() if r < 1}
    every = {m: conf.get(m, 1.0) for m in p.choices.slots}  # every attention block and FFN (10)
    assert set(every.values()) == set(ratios) and 1 <= len(ratios) <= 2  # one ratio, or the nearest pair
    sl, tl = p.subset["src_len"], p.subset["tgt_len"]
    origin, _, _ = load_model_folder(model_folder)
    model = compose(origin, grid["bank"], conf)
    assert forward_flops(model.cfg, sl, tl) <= p.args.budgets[0][0].limit(p.base["flops"])
    assert parameter_counts(model)[1] <= p.args.budgets[0][1].limit(p.base["params"])
    # the largest such: every block at the next ratio up misses the budget, and so does raising
    # any one more block to the higher ratio of the pair
    ladder = [0.25, 0.5, 0.75, 1.0]
    higher = ladder[ladder.index(min(ratios)) + 1] if min(ratios) < 1 else None
    choice = {(m, r): j for j, part in enumerate(p.choices.parts) for m, r in part.items()}
    untouched = {p.choices.slot[j]: j for j, part in enumerate(p.choices.parts) if not part}

    def at(r: float, s: int) -> int:
        return untouched[s] if r == 1 else choice[p.choices.slots[s], r]

    if higher is not None:
        assert not feasible([at(higher, s) for s in range(10)], slot, costs, p.limits[0], 10)
        for s in range(10):
            if every[p.choices.slots[s]] != higher:
                raised = [at(higher, s) if i == s else j for i, j in enumerate(taken)]
                assert not feasible(raised, slot, costs, p.limits[0], 10)


def test_removed_blocks_reach_budgets_the_grid_could_not(grid: dict[str, Path], model_folder: Path) -> None:
    """keep 0 (the block removed) and 0.125 in the grid: 0.35 of the FLOPs is reachable; block
    tuning, scoring and search run over the removed blocks; uniform can pick 0."""
    bank = grid["dir"] / "with-zero"
    prune(PruneArgs(model=model_folder, output=bank, grid=[0, 0.125, 0.5]))
    tuned = grid["dir"] / "with-zero-tuned"
    tune_blocks(TuneArgs(model=model_folder, bank=bank, output=tuned, epochs=1, corpus="synthetic", lr=2e-3,
                         max_tokens=4096, device="cpu", patience=0))
    score_bank(ScoreArgs(model=model_folder, bank=tuned, **{**SUBSET, "batches": 1}))  # type: ignore[arg-type]
    out = grid["dir"] / "zero" / "conf.json"
    _, report = search(SearchArgs(model=model_folder, bank=tuned, output=out, k=2,
                                  budgets=budget_sweep({"flops": ["0.35", "0.2"]}),
                                  **{**SUBSET, "batches": 1}))  # type: ignore[arg-type]
    origin, _, _ = load_model_folder(model_folder)
    sl, tl = report["flops_at"]["src_len"], report["flops_at"]["tgt_len"]
    assert [s["found"] for s in report["sweep"]] == [2, 2]
    assert any(0.0 in c["configuration"].values() for c in report["configurations"])
    for row in report["configurations"]:
        limit = report["sweep"][row["budget"]]["budgets"]["flops"]["limit"]
        assert forward_flops(compose(origin, tuned, row["configuration"]).cfg, sl, tl) == row["flops"] <= limit
    for s in report["sweep"]:
        assert s["uniform"]["flops"] <= s["budgets"]["flops"]["limit"]


def test_refinement_returns_the_best_measured_under_the_budget(grid: dict[str, Path], model_folder: Path) -> None:
    """--refine: every configuration meets the budget, is min_distance from the others, and the
    first is measured no worse than any solver solution or the uniform cut it started from; the
    measured value is the composed model's KL to the origin on the scoring subset."""
    from ctprune.pruning.solver import solve
    from ctprune.stages.search_refine import Measurer

    args = SearchArgs(model=model_folder, bank=grid["bank"], output=grid["dir"] / "refined.json",
                      budgets=budget_sweep({"flops": "0.6"}), k=2, min_distance=2, refine=12, **SUBSET)  # type: ignore[arg-type]
    p, report = search(args)
    rows = report["configurations"]
    assert len(rows) == 2 and all(r["status"] == "refined" for r in rows)
    assert report["refine"]["evaluations"] == 12 and report["refine"]["candidates_measured"] >= 3
    score, slot, costs = p.arrays()
    measure = Measurer(p)
    starts = [s.choices for s in solve(score, slot, costs, p.limits[0], k=2, min_distance=2)]
    starts.append(tuple(uniform_choices(p, ("attention", "ffn"), 0)[0]))  # type: ignore[index]
    taken = []
    for r in rows:
        conf = {m: v for m, v in r["configuration"].items() if v < 1}
        t = tuple(next(int(j) for j in np.flatnonzero(slot == s) if p.choices.parts[j] == {
            m: v for m, v in conf.items() if m == name or m.startswith(name + ".")})
            for s, name in enumerate(p.choices.slots))
        assert feasible(t, slot, costs, p.limits[0], len(p.choices.slots))
        assert r["measured"] == pytest.approx(measure(t), abs=1e-5)
        taken.append(t)
    assert sum(a != b for a, b in zip(*taken)) >= 2
    assert rows[0]["measured"] <= min(measure(tuple(s)) for s in starts) + 1e-6
    assert rows[0]["measured"] <= rows[1]["measured"]
    # the measured value is the KL of the composed model itself, computed here independently
    origin, _, _ = load_model_folder(model_folder)
    model = compose(origin, grid["bank"], rows[0]["configuration"]).eval()
    kl, tokens = 0.0, 0
    with torch.no_grad():
        for b in validation_subset(p.tok, 64, **SUBSET).batches:  # type: ignore[arg-type]
            real = b.tgt_out != b.pad_id
            ref = origin.eval()(b.src, b.tgt_in)[real].float().log_softmax(-1)
            logp = model(b.src, b.tgt_in)[real].float().log_softmax(-1)
            kl += float((ref.exp() * (ref - logp)).sum())
            tokens += int(real.sum())
    assert rows[0]["measured"] == pytest.approx(kl / tokens, rel=1e-4)


def test_the_origin_pass_of_scoring_keeps_no_graph(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """``traced_logits`` runs without grad even when called with grad on: its trace (every
    layer's input) holds no autograd graph."""
    arch = arch_of(tiny_model)
    src = torch.randint(4, 99, (2, 6))
    tgt = torch.randint(4, 99, (2, 5))
    logits, trace = arch.traced_logits(tiny_model.eval(), src, tgt)
    assert not logits.requires_grad and not trace["memory"].requires_grad
    assert not any(x.requires_grad for x in trace["inputs"].values())
