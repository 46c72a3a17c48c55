"""`ctprune run`: the whole composability experiment, resumable, calling the stage functions.

RUN_DIR/
  origin/                 origin model (unless the experiment names one)
  conf.json, plan.json    configurations and plan
  banks/pruned            merely pruned variants (every variant any plan of this run asked for)
  banks/tuned-SCHED_FP    the same variants tuned with one tuning schedule (one per seed)
  finetune/{baseline,composed}/config-FP   one model folder per configuration, bank, seed and schedule
  latency.json            decoding latency of every configuration's architecture (interleaved repeats)
  summary.json            every number of the report; report.md / report.html
The protocol (ctprune/protocol.py): each side finetunes until the target or the cap of E epochs,
and at least the equal-budget epochs (whose model is kept as epoch-K for the test BLEU).
Each step is skipped when its output is complete, resumed when it is partial. The banks grow
with the plan: after the configurations are edited only the variants no bank has yet are pruned
and tuned, and only configurations whose fingerprint changed are finetuned again.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ctprune import __version__
from ctprune.data.batching import pad
from ctprune.data.corpus import Parallel, default_splits, load_split, test_splits
from ctprune.data.tokenizer import EOS_ID
from ctprune.errors import CtpruneError
from ctprune.experiment import Experiment, load_experiment
from ctprune.fileio import read_json, write_json
from ctprune.model.checkpoint import is_model_folder, load_model_folder
from ctprune.model.decode import greedy, translate
from ctprune.model.flops import forward_flops, parameter_counts
from ctprune.model.transformer import Seq2SeqTransformer
from ctprune.progress import progress
from ctprune.protocol import BankCost, Configuration, Cost, TimeToTarget, saving, saving_curve, time_to_target
from ctprune.pruning.bank import INDEX_FILE, compose, load_index
from ctprune.pruning.configs import (
    default_configurations,
    fingerprint,
    load_configurations,
    make_plan,
    model_fingerprint,
    prunable_modules,
    validate_configurations,
    variant_ids,
    variant_key,
)
from ctprune.scoring import score
from ctprune.stages.finetune import finetune
from ctprune.stages.prune import prune
from ctprune.stages.train import TrainArgs, train_origin
from ctprune.stages.tune_blocks import plot_block_losses, tune_blocks, write_block_history
from ctprune.training.loop import TINY_RECIPE, Recipe, has_training_run, read_history

SIDES = ("baseline", "composed")
LATENCY_REPEATS = 5  # interleaved rounds; the median is reported with the spread
LATENCY_SENTENCES = 256  # the first sentences of the first test split


def _say(msg: str) -> None:
    print(f"[ctprune run] {msg}", flush=True)


def _origin(exp: Experiment, run_dir: Path) -> Path:
    if exp.origin_model is not None:
        return exp.origin_model
    out = run_dir / "origin"
    if is_model_folder(out) and (out / "train_summary.json").exists():
        # Banks, finetunings and latencies of the run folder belong to this origin: refuse to
        # reuse it for another [origin] or [data] (the banks would be silently stale).
        hp = read_json(out / "hparams.json", "origin hparams")
        was = (hp.get("preset"), hp.get("corpus"), (hp.get("recipe") or {}).get("epochs"))
        if was != (exp.preset, exp.corpus, exp.origin_epochs):
            raise CtpruneError(f"{run_dir} holds an origin model of preset {was[0]}, corpus {was[1]}, {was[2]} "
                               f"epochs, but {exp.path} asks for {exp.preset}, {exp.corpus}, {exp.origin_epochs}; "
                               "choose another -o for a new origin")
        _say(f"origin model: done ({out})")
        return out
    resume = has_training_run(out)
    _say(f"origin model: {'resuming' if resume else 'training'} {exp.preset} on {exp.corpus}")
    recipe = Recipe(epochs=exp.origin_epochs, seed=exp.seeds[0], bf16=exp.bf16,
                    **(TINY_RECIPE if exp.preset == "tiny" else {}))  # type: ignore[arg-type]
    train_origin(TrainArgs(output=out, preset=exp.preset, corpus=exp.corpus, data_dir=exp.data_dir,
                           resume=resume, recipe=recipe, device="cpu"))
    return out


def experiment_configurations(exp: Experiment, origin: Seq2SeqTransformer) -> list[dict[str, float]]:
    modules = prunable_modules(origin)
    if exp.conf_file is not None:
        return load_configurations(exp.conf_file, modules)
    if exp.conf_inline is not None:
        return validate_configurations(exp.conf_inline, modules, f"{exp.path} [configurations].inline")
    n = len(exp.attention or exp.linear or exp.ffn or [])
    return default_configurations(modules, n, exp.attention, exp.linear, exp.ffn)


def _plan_keys(plan: dict[str, Any]) -> list[str]:
    return [variant_key(n, r) for n, r in variant_ids(plan)]


def _missing(plan: dict[str, Any], bank: Path) -> list[str]:
    """The plan's variant keys that ``bank`` does not hold (all of them when it does not exist)."""
    have = load_index(bank)["variants"] if (bank / INDEX_FILE).exists() else {}
    return [variant_key(n, r) for n, r in variant_ids(plan) if variant_key(n, r) not in have]


def _merge(src: Path, dst: Path, keys: list[str]) -> None:
    """Move the variants ``keys`` of bank ``src`` into bank ``dst`` (made if absent), adding up
    tuning cost and history; ``dst``'s index is written last, so a crash loses nothing."""
    new = load_index(src)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "variants").mkdir(exist_ok=True)
    dst_existed = (dst / INDEX_FILE).exists()
    if dst_existed:
        index = load_index(dst)
    else:
        index = {**{k: v for k, v in new.items() if k != "tuning"}, "variants": {}}
    for key in keys:
        entry = new["variants"][key]
        if (src / entry["file"]).exists():  # absent only if an earlier merge moved it already
            os.replace(src / entry["file"], dst / entry["file"])
        index["variants"][key] = entry
    if "prune_seconds" in new and dst_existed:
        index["prune_seconds"] = round(index.get("prune_seconds", 0.0) + new["prune_seconds"], 3)
    if "tuning" in new:
        t, old = {**new["tuning"], "sessions": 1}, index.get("tuning")
        if old:
            t.update(wall_time_s=round(old["wall_time_s"] + t["wall_time_s"], 2),
                     train_tokens=old["train_tokens"] + t["train_tokens"],
                     teacher_flops=old["teacher_flops"] + t["teacher_flops"],
                     train_flops=old["train_flops"] + t["train_flops"],
                     variant_flops={**old["variant_flops"], **t["variant_flops"]},
                     epochs_done=max(old["epochs_done"], t["epochs_done"]), sessions=old["sessions"] + 1)
            t["achieved_gflops"] = round(t["train_flops"] / max(t["wall_time_s"], 1e-9) / 1e9, 2)
        index["tuning"] = {**t, "variants": len(index["variants"])}
        # one row per (variant, epoch), epochs in order (a merge redone after a kill sees its rows twice)
        rows = list({(r["variant"], r["epoch"]): r for f in (src / "history.csv", dst / "history.csv")
                     for r in read_history(f) if r["variant"] in index["variants"]}.values())
        rows.sort(key=lambda r: int(r["epoch"]))
        write_block_history(dst / "history.csv", rows)
        plot_block_losses(rows, dst / "block_loss.png")
    write_json(dst / INDEX_FILE, index)
    shutil.rmtree(src)


def _sub_plan(plan: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    modules = {n: {**e, "ratios": [r for r in e["ratios"] if variant_key(n, r) in keys]}
               for n, e in plan["modules"].items()}
    body = {k: v for k, v in plan.items() if k != "modules_fingerprint"}  # a sub-plan is no edit
    return {**body, "modules": {n: e for n, e in modules.items() if e["ratios"]}}


def _banks(exp: Experiment, origin_dir: Path, plan: dict[str, Any], banks: Path, seed: int) -> tuple[Path, Path]:
    """Prune and tune the variants of ``plan`` that the run's banks lack; returns (pruned, tuned).
    The pruned bank is shared by all seeds; each seed tunes its own."""
    pruned = banks / "pruned"
    missing = _missing(plan, pruned)
    if missing:
        _say(f"prune: {len(missing)} block variants")
        write_json(banks / ".plan-missing.json", _sub_plan(plan, missing))
        tmp = banks / ".pruning"
        shutil.rmtree(tmp, ignore_errors=True)
        prune(origin_dir, tmp, plan_path=banks / ".plan-missing.json", corpus=exp.corpus, data_dir=exp.data_dir)
        _merge(tmp, pruned, missing)
    schedule = {"epochs": exp.tune_epochs, "lr": exp.tune_lr, "seed": seed}
    tuned = banks / f"tuned-{fingerprint(schedule)[:8]}"
    missing = _missing(plan, tuned)
    if missing:
        tmp = banks / f".tuning-{fingerprint([tuned.name, missing])[:8]}"
        _say(f"tune-blocks (seed {seed}): {len(missing)} variants, {exp.tune_epochs} epochs"
             f"{' (resuming)' if tmp.exists() else ''}")
        tune_blocks(origin_dir, pruned, tmp, epochs=exp.tune_epochs, corpus=exp.corpus, data_dir=exp.data_dir,
                    lr=exp.tune_lr, resume=tmp.exists(), device="cpu", only=missing, seed=seed,
                    max_tokens=exp.max_tokens, bf16=exp.bf16)
        _merge(tmp, tuned, missing)
    return pruned, tuned


def test_bleu(model: Seq2SeqTransformer, tok: Any, tests: dict[str, Parallel]) -> dict[str, float]:
    """Test BLEU (greedy) on every test split."""
    return {name: round(score(translate(model, tok, t.src), t.tgt).bleu, 2) for name, t in tests.items()}


def latencies(models: list[Seq2SeqTransformer], ids: list[list[int]], steps: list[int], repeats: int = 5,
              batch_size: int = 64) -> list[list[float]]:
    """Seconds of batched greedy decoding with fixed step counts (the same work for every model),
    ``repeats`` rounds in which every model runs once (interleaved, so drifts hit all alike),
    after one untimed warm-up round (allocator and kernel caches)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    chunks = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    srcs = [(pad([ids[i] for i in c]), max(steps[i] for i in c)) for c in chunks]
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for r in progress(range(repeats + 1), desc="latency", unit="round", leave=False):
            for m, model in enumerate(models):
                t0 = time.perf_counter()
                for src, n in srcs:
                    greedy(model, src, steps=n)
                if r:
                    times[m].append(time.perf_counter() - t0)
    return times


def _latency_table(run_dir: Path, origin: Seq2SeqTransformer, tok: Any, bank: Path, confs: list[dict[str, float]],
                   test: Parallel, flops: list[float]) -> list[dict[str, Any]]:
    """Latency ratio to the origin per configuration: median of interleaved repeats, with the
    spread (max - min over the median, both models' spreads added); a ratio below the FLOPs
    ratio or above 1 by more than that spread contradicts the FLOPs and is flagged."""
    path = run_dir / "latency.json"
    key = [fingerprint(c) for c in confs]
    if path.exists() and read_json(path).get("configurations") == key:
        return read_json(path)["rows"]
    _say(f"latency: origin and {len(confs)} configurations, {LATENCY_REPEATS} interleaved rounds")
    sentences = test.src[:LATENCY_SENTENCES]
    ids = [s[:origin.cfg.max_len - 1] + [EOS_ID] for s in tok.encode(sentences)]
    with torch.inference_mode():
        steps = [len(h) + 1 for k in range(0, len(ids), 128) for h in greedy(origin, pad(ids[k:k + 128]))]
    models = [origin] + [compose(origin, bank, c).eval() for c in confs]
    times = latencies(models, ids, steps, LATENCY_REPEATS)
    med = [statistics.median(t) for t in times]
    spread = [(max(t) - min(t)) / m for t, m in zip(times, med)]
    rows = []
    for i, f in enumerate(flops):
        ratio, tol = med[i + 1] / med[0], spread[i + 1] + spread[0]
        rows.append({"median_s": round(med[i + 1], 4), "ratio": round(ratio, 3), "spread": round(tol, 3),
                     "flagged": ratio < f - tol or ratio > 1 + tol})
    write_json(path, {"configurations": key, "origin_median_s": round(med[0], 4), "repeats": LATENCY_REPEATS,
                      "sentences": len(ids), "rows": rows})
    return rows


def _finetune_side(exp: Experiment, run_dir: Path, origin_dir: Path, bank: Path, i: int, conf: dict[str, float],
                   side: str, seed: int, target: float, tests: dict[str, Parallel]) -> dict[str, Any]:
    recipe = Recipe.finetune(epochs=exp.finetune_epochs, lr=exp.finetune_lr, seed=seed, bf16=exp.bf16,
                             max_tokens=exp.max_tokens)
    key = {"configuration": conf, "bank": bank.name, "seed": seed, "target_bleu": round(target, 2),
           "epochs": exp.finetune_epochs, "budget_epochs": exp.budget_epochs, "lr": exp.finetune_lr,
           "max_tokens": recipe.max_tokens}
    out = run_dir / "finetune" / side / f"config-{fingerprint(key)}"
    budget = out / f"epoch-{exp.budget_epochs}"
    if not (out / "train_summary.json").exists():
        _say(f"finetune {side} configuration {i} (seed {seed})")
        finetune(origin_dir, bank, run_dir / "conf.json", i, out, recipe, corpus=exp.corpus, data_dir=exp.data_dir,
                 target_bleu=target, resume=has_training_run(out), device="cpu",
                 min_epochs=exp.budget_epochs, snapshot_epochs=(exp.budget_epochs,))
    metrics = out / "test_metrics.json"
    if not metrics.exists() or set(read_json(metrics)["test_bleu_best"]) != set(tests):
        origin, tok, _ = load_model_folder(origin_dir)
        write_json(metrics, {"test_bleu_epoch0": test_bleu(compose(origin, bank, conf).eval(), tok, tests),
                             "test_bleu_budget": test_bleu(load_model_folder(budget)[0], tok, tests),
                             "test_bleu_best": test_bleu(load_model_folder(out)[0], tok, tests)})
    history = read_history(out / "history.csv")
    ttt = time_to_target(history, target, exp.finetune_epochs)
    by_epoch = {int(r["epoch"]): float(r["val_bleu"]) for r in history}
    return {**read_json(metrics), "dir": str(out.relative_to(run_dir)), "epochs_to_target": ttt.epochs,
            "cost_seconds": ttt.cost.seconds, "cost_flops": ttt.cost.flops, "val_bleu_epoch0": by_epoch[0],
            "val_bleu_budget": by_epoch[exp.budget_epochs], "val_bleu_best": max(by_epoch.values()),
            "epochs_trained": max(by_epoch)}


def _searched_configurations(exp: Experiment, run_dir: Path, origin_dir: Path, origin: Seq2SeqTransformer
                             ) -> tuple[list[dict[str, float]], dict[str, Any], float]:
    """[search]: prune and tune a grid bank (first seed), score it, and let `ctprune search` pick
    the configurations. Returns (configurations, the grid plan, scoring seconds)."""
    from ctprune.stages.score import score_bank
    from ctprune.stages.search import SearchArgs, parse_budget, search

    spec = exp.search
    if spec is None:
        raise CtpruneError("internal error: no [search] section")
    modules = prunable_modules(origin)
    grid = [{n: r for n, m in modules.items() if m.kind in spec.kinds} for r in spec.grid]
    plan = make_plan(grid, modules, model_fingerprint(origin_dir))
    _, tuned = _banks(exp, origin_dir, plan, run_dir / "banks", exp.seeds[0])
    _say(f"score: {len(load_index(tuned)['variants'])} variants of {tuned.name}")
    scores = score_bank(origin_dir, tuned, corpus=exp.corpus, data_dir=exp.data_dir, device="cpu")
    digests = {k: v["digest"] for k, v in scores["variants"].items()}
    key = fingerprint([dataclasses.asdict(spec), scores["subset"], digests])
    done = run_dir / "search.json"
    if done.exists() and (run_dir / "conf.json").exists() and read_json(done).get("run_key") == key:
        _say("search: done")  # the same scores and spec: the same configurations, never re-solved
    else:
        _, found = search(SearchArgs(model=origin_dir, bank=tuned, output=run_dir / "conf.json",
                                     budgets=tuple(parse_budget(r, v) for r, v in spec.budgets), k=spec.k,
                                     min_distance=spec.min_distance, corpus=exp.corpus, data_dir=exp.data_dir))
        write_json(done, {**found, "run_key": key})
        _say(f"search: {len(found['configurations'])} configurations in {found['solver']['total_s']:.2f} s")
    confs = load_configurations(run_dir / "conf.json", modules)
    return confs, plan, float(scores["total_wall_time_s"])


def _seed_run(exp: Experiment, run_dir: Path, origin_dir: Path, confs: list[dict[str, float]],
              plan: dict[str, Any], target: float, tests: dict[str, Parallel], seed: int,
              scoring_seconds: float = 0.0) -> dict[str, Any]:
    """Tuning and both sides' finetuning for one seed, and the protocol's numbers. With a search
    the whole grid bank is paid for (tuning and scoring) whatever the configurations use."""
    pruned, tuned = _banks(exp, origin_dir, plan, run_dir / "banks", seed)
    rows, protocol_rows = [], []
    for i, conf in enumerate(confs):
        sides = {side: _finetune_side(exp, run_dir, origin_dir, bank, i, conf, side, seed, target, tests)
                 for side, bank in zip(SIDES, (pruned, tuned))}
        rows.append({"index": i, **sides})
        protocol_rows.append(Configuration(
            tuple(variant_key(n, r) for n, r in conf.items() if r < 1),
            *(TimeToTarget(sides[s]["epochs_to_target"], Cost(sides[s]["cost_seconds"], sides[s]["cost_flops"]))
              for s in SIDES)))
    tuning = load_index(tuned)["tuning"]
    pruned_index = load_index(pruned)
    bank = BankCost(prune_seconds=float(pruned_index.get("prune_seconds", 0.0)),
                    n_pruned=len(pruned_index["variants"]),
                    tuning_seconds=tuning["wall_time_s"], teacher_flops=tuning["teacher_flops"],
                    variant_flops=tuning["variant_flops"], scoring_seconds=scoring_seconds)
    whole = _plan_keys(plan) if exp.search is not None else None
    return {"seed": seed, "tuned_bank": str(tuned.relative_to(run_dir)),
            "pruned_bank": str(pruned.relative_to(run_dir)),
            "tuning": {k: v for k, v in tuning.items() if k != "variant_flops"}, "configurations": rows,
            "saving": saving(protocol_rows, bank, whole).to_dict(),
            "curve": [c.to_dict() for c in saving_curve(protocol_rows, bank, whole)]}


def _finetune_gflops(run_dir: Path, seeds: list[dict[str, Any]]) -> float:
    """Achieved GFLOP/s of all finetuning epochs of the run (training FLOPs over training seconds)."""
    flops = seconds = 0.0
    for s in seeds:
        for c in s["configurations"]:
            for side in SIDES:
                last = read_history(run_dir / c[side]["dir"] / "history.csv")[-1]
                flops, seconds = flops + float(last["train_flops"]), seconds + float(last["wall_time_s"])
    return round(flops / max(seconds, 1e-9) / 1e9, 2)


def run_experiment(exp_path: Path, run_dir: Path | None = None) -> Path:
    """Run (or finish) the experiment of ``exp_path`` in ``run_dir``; returns the report path."""
    from ctprune.stages.report import write_report

    exp = load_experiment(exp_path)
    run_dir = Path(run_dir or Path("runs") / Path(exp_path).stem)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "experiment.toml").exists() or not (run_dir / "experiment.toml").samefile(exp_path):
        shutil.copyfile(exp_path, run_dir / "experiment.toml")
    origin_dir = _origin(exp, run_dir)
    origin, tok, _ = load_model_folder(origin_dir)
    modules = prunable_modules(origin)
    scoring_seconds = 0.0
    if exp.search is not None:
        confs, plan, scoring_seconds = _searched_configurations(exp, run_dir, origin_dir, origin)
    else:
        confs = experiment_configurations(exp, origin)
        write_json(run_dir / "conf.json", confs)
        plan = make_plan(confs, modules, model_fingerprint(origin_dir))
    write_json(run_dir / "plan.json", plan)
    summary_path = origin_dir / "train_summary.json"
    _, val_name, _ = default_splits(exp.corpus)
    if summary_path.exists():
        origin_bleu = float(read_json(summary_path)["best_val_bleu"])
    else:
        val = load_split(exp.corpus, val_name, exp.data_dir)
        origin_bleu = score(translate(origin, tok, val.src), val.tgt).bleu
    target = exp.target_bleu(origin_bleu)
    tests = {name: load_split(exp.corpus, name, exp.data_dir) for name in test_splits(exp.corpus, exp.data_dir)}
    seeds = [_seed_run(exp, run_dir, origin_dir, confs, plan, target, tests, seed, scoring_seconds)
             for seed in exp.seeds]
    pruned = run_dir / seeds[0]["pruned_bank"]
    shapes = []
    origin_params, origin_nonzero = parameter_counts(origin)
    first = next(iter(tests.values()))
    ids = tok.encode(first.src)
    src_len = round(sum(map(len, ids)) / len(ids)) + 1
    tgt_len = round(sum(map(len, tok.encode(first.tgt))) / len(first.tgt)) + 1
    origin_flops = forward_flops(origin.cfg, src_len, tgt_len) / tgt_len
    for conf in confs:
        model = compose(origin, pruned, conf)
        params, nonzero = parameter_counts(model)
        flops = forward_flops(model.cfg, src_len, tgt_len) / tgt_len
        shapes.append({"configuration": conf, "fingerprint": fingerprint(conf), "params": params,
                       "nonzero_params": nonzero, "flops_per_token": round(flops),
                       "flops_ratio": round(flops / origin_flops, 3)})
    for shape, lat in zip(shapes, _latency_table(run_dir, origin, tok, pruned, confs, first,
                                                 [s["flops_ratio"] for s in shapes])):
        shape["latency"] = lat
    origin_test = score(translate(origin, tok, first.src), first.tgt)
    summary = {
        "experiment": str(exp_path), "seeds": exp.seeds, "corpus": exp.corpus, "target_bleu": round(target, 2),
        "search": None if exp.search is None else {
            **read_json(run_dir / "search.json"), "scoring_seconds": scoring_seconds},
        "protocol": {"target": exp.target, "cap_epochs": exp.finetune_epochs, "budget_epochs": exp.budget_epochs,
                     "tuning_epochs": exp.tune_epochs, "latency_repeats": LATENCY_REPEATS},
        "test_splits": list(tests),
        "origin": {"dir": str(origin_dir), "val_bleu": round(origin_bleu, 2),
                   "test_bleu": test_bleu(origin, tok, tests), "params": origin_params,
                   "nonzero_params": origin_nonzero, "flops_per_token": round(origin_flops)},
        "bleu_signature": origin_test.bleu_signature, "chrf_signature": origin_test.chrf_signature,
        "configurations": shapes, "runs": seeds,
        "finetune_achieved_gflops": _finetune_gflops(run_dir, seeds),
        "versions": {"ctprune": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads()},
    }
    _say("report: summary.json, report.md, report.html")
    write_json(run_dir / "summary.json", summary)
    report = write_report(run_dir)
    _say(f"done: {report} (and report.html)")
    return report
