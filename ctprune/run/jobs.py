"""The job functions of `ctprune run`: every unit of work as a function of input paths and
options that writes one output (a folder, or a file of the run folder), resumable, and returns a
small JSON result. ``ctprune.run.runtime`` names them in ``Job``s, fingerprints and records them;
ctprune/run/graph.py builds the graph of jobs of an experiment.
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path
from typing import Any

from ctprune.device import resolve_device
from ctprune.errors import CtpruneError
from ctprune.fileio import read_json, write_json
from ctprune.pruning.configs import fingerprint, variant_ids, variant_key
from ctprune.run.experiment import resolve_configurations
from ctprune.run.runtime import write_json_strict
from ctprune.spec import LATENCY_REPEATS, FinetuningSpec, OriginSpec, spec_default

LATENCY_SENTENCES = 256  # the first sentences of the first test split, decoded in batches
LATENCY_SINGLE = 32  # the first of them, decoded one sentence at a time


def train_origin_job(output: str, preset: str, corpus: str, data_dir: str | None, epochs: int, seed: int,
                     device: str, arch: str = spec_default(OriginSpec, "arch")) -> dict[str, Any]:
    """The origin model (ctprune's Transformer or a Hugging Face ``arch``): trained (or resumed) into ``output``."""
    from ctprune.stages.train import TrainArgs, train_origin
    from ctprune.training.loop import has_training_run

    out = Path(output)
    res = train_origin(TrainArgs(output=out, preset=preset, arch=arch, corpus=corpus, data_dir=data_dir, device=device,
                                 resume=has_training_run(out), epochs=epochs, seed=seed))
    return {"best_val_bleu": res.best_bleu, "epochs_done": res.epochs_done}


def configurations_job(origin: str, conf_out: str, plan_out: str, configurations: dict[str, Any],
                       where: str, device: str) -> dict[str, Any]:
    """The experiment's configurations ([configurations] of the spec) checked against the origin,
    written as the run's configuration file and plan."""
    from ctprune.model.checkpoint import load_model_folder
    from ctprune.pruning.configs import make_plan, model_fingerprint, prunable_modules

    modules = prunable_modules(load_model_folder(Path(origin))[0])
    confs = resolve_configurations(modules, configurations, where)
    write_json(Path(conf_out), confs)
    write_json(Path(plan_out), make_plan(confs, modules, model_fingerprint(Path(origin))))
    return {"configurations": len(confs)}


def grid_plan_job(origin: str, plan_out: str, grid: list[float], kinds: list[str], device: str) -> dict[str, Any]:
    """[search]: the plan of a grid bank (every module of ``kinds`` at every ratio of ``grid``)."""
    from ctprune.model.checkpoint import load_model_folder
    from ctprune.pruning.configs import make_plan, model_fingerprint, prunable_modules

    modules = prunable_modules(load_model_folder(Path(origin))[0])
    grid_confs = [{n: r for n, m in modules.items() if m.kind in kinds} for r in grid]
    plan = make_plan(grid_confs, modules, model_fingerprint(Path(origin)))
    write_json(Path(plan_out), plan)
    return {"variants": len(variant_ids(plan))}


def sub_plan(plan: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """The part of ``plan`` whose variant keys are in ``keys``."""
    modules = {n: {**e, "ratios": [r for r in e["ratios"] if variant_key(n, r) in keys]}
               for n, e in plan["modules"].items()}
    body = {k: v for k, v in plan.items() if k != "modules_fingerprint"}  # a sub-plan is no edit
    return {**body, "modules": {n: e for n, e in modules.items() if e["ratios"]}}


def prune_job(origin: str, bank: str, plan: str, keys: list[str], corpus: str, data_dir: str | None,
              device: str) -> dict[str, Any]:
    """Prune the variants ``keys`` of the plan file and add them to ``bank`` (made if absent)."""
    from ctprune.pruning.bank import Bank
    from ctprune.stages.prune import PruneArgs, prune

    bank_dir = Path(bank)
    tmp, sub = bank_dir.parent / f".pruning-{bank_dir.name}", bank_dir.parent / f".plan-{bank_dir.name}.json"
    write_json(sub, sub_plan(read_json(Path(plan), "plan"), keys))
    shutil.rmtree(tmp, ignore_errors=True)
    prune(PruneArgs(model=Path(origin), output=tmp, plan=sub, corpus=corpus, data_dir=data_dir))
    Bank.merge([(tmp, keys)], bank_dir)
    sub.unlink()
    return {"pruned": len(keys)}


def tune_job(origin: str, pruned: str, output: str, keys: list[str], epochs: int, lr: float, patience: int,
             seed: int, max_tokens: int, bf16: bool, corpus: str, data_dir: str | None,
             device: str) -> dict[str, Any]:
    """Tune the variants ``keys`` of the pruned bank into the shard ``output`` (resumed if begun)."""
    from ctprune.stages.tune_blocks import TuneArgs, tune_blocks

    out = Path(output)
    index = tune_blocks(TuneArgs(model=Path(origin), bank=Path(pruned), output=out, epochs=epochs, corpus=corpus,
                                 data_dir=data_dir, lr=lr, patience=patience, resume=out.exists(), device=device,
                                 only=tuple(keys), seed=seed, max_tokens=max_tokens,
                                 precision="bf16" if bf16 else "fp32"))
    return {"variants": len(keys), "wall_time_s": index["tuning"]["wall_time_s"]}


def merge_job(shards: list[list[Any]], bank: str, device: str) -> dict[str, Any]:
    """Move the tuned variants of every shard ([folder, keys]) into ``bank``: its single writer."""
    from ctprune.pruning.bank import Bank

    Bank.merge([(Path(p), list(k)) for p, k in shards], Path(bank))
    return {"variants": sum(len(k) for _, k in shards)}


def score_job(origin: str, bank: str, corpus: str, data_dir: str | None, bank_variants: list[str],
              device: str, latency: bool = False) -> dict[str, Any]:
    """Replace-one-block scores of every variant of ``bank`` (stored in its index; the job's key
    follows ``bank_variants``, so a grown bank is scored again, reusing the scores it has), with
    each variant's measured latency when ``latency`` (a latency budget needs it)."""
    from ctprune.stages.score import ScoreArgs, score_bank

    s = score_bank(ScoreArgs(model=Path(origin), bank=Path(bank), corpus=corpus, data_dir=data_dir, latency=latency,
                             device=device))
    return {"total_wall_time_s": float(s["total_wall_time_s"]), "subset": s["subset"],
            "digests": {k: v["digest"] for k, v in s["variants"].items()}}


def search_job(origin: str, bank: str, conf_out: str, search: dict[str, Any], corpus: str, data_dir: str | None,
               device: str) -> dict[str, Any]:
    """`ctprune search` on the scored bank: the configuration file and search.json beside it."""
    from ctprune.stages.search import RESOURCES, SearchArgs
    from ctprune.stages.search import search as solve

    _, found = solve(SearchArgs(model=Path(origin), bank=Path(bank), output=Path(conf_out),
                                **{r: search.get(r) for r in RESOURCES}, k=search["k"],
                                min_distance=search["min_distance"], objective=search["objective"],
                                time_limit=search["time_limit"], refine=search.get("refine", 0), corpus=corpus,
                                data_dir=data_dir))
    return {"found": len(found["configurations"]), "solver_s": found["solver"]["total_s"]}


def test_bleu(model: Any, tok: Any, tests: dict[str, Any]) -> dict[str, float]:
    """Test BLEU (greedy) on every test split."""
    from ctprune.task import evaluate

    return {name: round(evaluate(model, tok, t), 2) for name, t in tests.items()}


def _tests(corpus: str, data_dir: str | None, names: list[str]) -> dict[str, Any]:
    from ctprune.data.corpus import load_split

    return {name: load_split(corpus, name, data_dir) for name in names}


def finetune_job(origin: str, bank: str, conf_file: str, index: int, output: str, seed: int, target: float | None,
                 epochs: int, budget_epochs: int, lr: float, max_tokens: int, bf16: bool, corpus: str,
                 data_dir: str | None, tests: list[str], device: str,
                 eval_every: float = spec_default(FinetuningSpec, "eval_every"),
                 select: str = spec_default(FinetuningSpec, "select")) -> dict[str, Any]:
    """One side of one configuration under the protocol: finetune until the target or the cap of
    ``epochs`` (at least ``budget_epochs``, kept as epoch-K; val BLEU measured every ``eval_every``
    of an epoch), then test BLEU before finetuning, at the budget, and of the kept model (chosen by
    ``select``); the time-to-target cost from its history."""
    from ctprune.model.checkpoint import load_model_folder
    from ctprune.pruning.bank import compose
    from ctprune.pruning.configs import load_configurations, prunable_modules
    from ctprune.run.protocol import epoch_of, time_to_target
    from ctprune.stages.finetune import FinetuneArgs, finetune
    from ctprune.training.history import read_history
    from ctprune.training.loop import has_training_run

    out = Path(output)
    metrics = out / "test_metrics.json"
    if _unfinished(out, epochs):
        metrics.unlink(missing_ok=True)  # the kept model may change: its test BLEU is measured again
        finetune(FinetuneArgs(model=Path(origin), bank=Path(bank), configurations=Path(conf_file), n=index, output=out,
                              recipe_name="finetune", epochs=epochs, lr=lr, seed=seed, max_tokens=max_tokens,
                              precision="bf16" if bf16 else "fp32", eval_every=eval_every, select=select,
                              corpus=corpus, data_dir=data_dir, target_bleu=target, resume=has_training_run(out),
                              device=device, budget_epochs=budget_epochs, snapshot_epochs=(budget_epochs,)))
    if not metrics.exists() or set(read_json(metrics)["test_bleu_best"]) != set(tests):
        splits = _tests(corpus, data_dir, tests)  # read only when the metrics are (re)computed
        dev = resolve_device(device)
        model, tok, _ = load_model_folder(Path(origin), dev)
        conf = load_configurations(Path(conf_file), prunable_modules(model))[index]
        write_json_strict(metrics, {
            "test_bleu_epoch0": test_bleu(compose(model, Path(bank), conf).eval(), tok, splits),
            "test_bleu_budget": test_bleu(load_model_folder(out / f"epoch-{budget_epochs}", dev)[0], tok, splits),
            "test_bleu_best": test_bleu(load_model_folder(out, dev)[0], tok, splits)}, "test metrics")
    history = read_history(out / "history.csv")
    ttt = time_to_target(history, target, epochs)
    by_epoch = {epoch_of(r): float(r["val_bleu"]) for r in history}
    last = history[-1]
    kept = read_json(out / "train_summary.json").get("kept")  # None in summaries older than `select`
    return {**read_json(metrics), "epochs_to_target": ttt.epochs, "cost_seconds": ttt.cost.seconds,
            "cost_flops": ttt.cost.flops, "val_bleu_epoch0": by_epoch[0], "val_bleu_budget": by_epoch[budget_epochs],
            "val_bleu_best": kept["val_bleu"] if kept else max(by_epoch.values()),  # the kept model's
            "epochs_trained": max(by_epoch),
            "train_flops": float(last["train_flops"]), "train_seconds": float(last["wall_time_s"]),
            **({"kept": kept} if kept is not None else {})}


def _unfinished(out: Path, epochs: int) -> bool:
    """Whether the finetuning in ``out`` has to (go on) training to the cap ``epochs``: it never
    finished, or it finished censored (its target not reached) short of a cap raised since. A
    raised cap continues the run from its last checkpoint, not from scratch: the finetune recipe's
    lr is constant, so more epochs are the same run, longer (``loop._check_same_recipe``)."""
    summary = out / "train_summary.json"
    if not summary.exists():
        return True
    done = read_json(summary)
    return not done.get("stopped_early", False) and int(done.get("epochs_done", 0)) < epochs


def latency_job(output: str, origin: str, bank: str, configurations: list[dict[str, float]],
                flops_ratios: list[float], corpus: str, data_dir: str | None, test: str, device: str) -> dict[str, Any]:
    """Decoding latency ratio to the origin per configuration, batched (``ratio``: the first
    LATENCY_SENTENCES test sentences in batches) and one sentence at a time (``single_ratio``: the
    first LATENCY_SINGLE): median of interleaved repeats with the spread (max - min over the median,
    both models' spreads added); a ratio below the FLOPs ratio or above 1 by more than that spread
    contradicts the FLOPs and is flagged. Runs alone."""
    import torch

    from ctprune.arch import arch_of
    from ctprune.data.batching import pad
    from ctprune.data.corpus import load_split
    from ctprune.latency import batched_and_single
    from ctprune.model.checkpoint import load_model_folder
    from ctprune.pruning.bank import compose
    from ctprune.pruning.configs import validate_configurations

    dev = resolve_device(device)
    origin_model, tok, _ = load_model_folder(Path(origin), dev)
    arch = arch_of(origin_model)
    confs = validate_configurations(configurations, arch.units(origin_model), "latency job")
    sentences = load_split(corpus, test, data_dir).src[:LATENCY_SENTENCES]
    ids = [s[:arch.max_len(origin_model) - 1] + [tok.eos_id] for s in tok.encode(sentences)]
    with torch.inference_mode():
        steps = [len(h) + 1 for k in range(0, len(ids), 128)
                 for h in arch.generate(origin_model, pad(ids[k:k + 128], tok.pad_id).to(dev))]
    models = [origin_model] + [compose(origin_model, Path(bank), c).eval() for c in confs]
    rows: list[dict[str, Any]] = [{} for _ in confs]
    origin_s = {}
    measured = batched_and_single(arch, models, ids, steps, LATENCY_REPEATS, LATENCY_SINGLE, pad_id=tok.pad_id)
    for prefix, times in zip(("", "single_"), measured):
        med = [statistics.median(t) for t in times]
        spread = [(max(t) - min(t)) / m for t, m in zip(times, med)]
        origin_s[f"origin_{prefix}median_s"] = round(med[0], 4)
        for i, (row, f) in enumerate(zip(rows, flops_ratios)):
            ratio, tol = med[i + 1] / med[0], spread[i + 1] + spread[0]
            row.update({f"{prefix}median_s": round(med[i + 1], 4), f"{prefix}ratio": round(ratio, 3),
                        f"{prefix}spread": round(tol, 3), f"{prefix}flagged": ratio < f - tol or ratio > 1 + tol})
    result = {"configurations": [fingerprint(c) for c in confs], **origin_s, "repeats": LATENCY_REPEATS,
              "sentences": len(ids), "single_sentences": min(LATENCY_SINGLE, len(ids)), "rows": rows}
    write_json_strict(Path(output), result, "latency")
    return result


def mean_lengths(tok: Any, split: Any) -> tuple[int, int]:
    """(source, target) tokens of a split's mean sentence pair, end token included: where FLOPs
    per token are counted."""
    return (round(sum(map(len, tok.encode(split.src))) / len(split.src)) + 1,
            round(sum(map(len, tok.encode(split.tgt))) / len(split.tgt)) + 1)


def describe_job(origin: str, pruned: str, configurations: list[dict[str, float]], corpus: str,
                 data_dir: str | None, tests: list[str], device: str) -> dict[str, Any]:
    """The origin's val and test BLEU, parameters and FLOPs per token, and every configuration's
    parameters and FLOPs per token (at the first test split's mean sentence lengths)."""
    from ctprune.arch import arch_of
    from ctprune.model.checkpoint import load_model_folder
    from ctprune.model.decode import translate
    from ctprune.model.flops import parameter_counts
    from ctprune.pruning.bank import compose
    from ctprune.pruning.configs import validate_configurations
    from ctprune.scoring import score

    model, tok, _ = load_model_folder(Path(origin), resolve_device(device))
    arch = arch_of(model)
    confs = validate_configurations(configurations, arch.units(model), "describe job")
    splits = _tests(corpus, data_dir, tests)
    first = splits[tests[0]]
    src_len, tgt_len = mean_lengths(tok, first)
    origin_flops = arch.forward_flops(model, src_len, tgt_len) / tgt_len
    shapes = []
    for conf in confs:
        composed = compose(model, Path(pruned), conf)
        params, nonzero = parameter_counts(composed)
        flops = arch.forward_flops(composed, src_len, tgt_len) / tgt_len
        shapes.append({"configuration": conf, "fingerprint": fingerprint(conf), "params": params,
                       "nonzero_params": nonzero, "flops_per_token": round(flops),
                       "flops_ratio": round(flops / origin_flops, 3)})
    params, nonzero = parameter_counts(model)
    first_score = score(translate(model, tok, first.src), first.tgt)
    return {"origin": {"test_bleu": test_bleu(model, tok, splits), "params": params,
                       "nonzero_params": nonzero, "flops_per_token": round(origin_flops)},
            "bleu_signature": first_score.bleu_signature, "chrf_signature": first_score.chrf_signature,
            "configurations": shapes}


def val_bleu_job(origin: str, corpus: str, data_dir: str | None, device: str) -> dict[str, Any]:
    """The val BLEU (greedy) of the origin on the experiment's own val split (a given origin's
    ``train_summary.json`` speaks of the corpus it was trained on, which need not be this one)."""
    from ctprune.data.corpus import default_splits, load_split
    from ctprune.model.checkpoint import load_model_folder
    from ctprune.task import evaluate

    model, tok, _ = load_model_folder(Path(origin), resolve_device(device))
    return {"val_bleu": evaluate(model, tok, load_split(corpus, default_splits(corpus)[1], data_dir))}


def random_job(origin: str, bank: str, search: dict[str, Any], point: int, n: int, seed: int, corpus: str,
               data_dir: str | None, tests: list[str], device: str) -> dict[str, Any]:
    """The `random` competitor at budget point ``point`` of ``search`` ([search] as a dict): up to
    ``n`` distinct configurations drawn at random (one choice per slot, ``seed``) that meet it, each
    composed from the scored tuned bank ``bank`` and measured before any finetuning: val loss and
    val BLEU (greedy, the whole val split), test BLEU on every split of ``tests``."""
    from ctprune.data.batching import TokenizedSplit
    from ctprune.data.corpus import default_splits, load_split
    from ctprune.pruning.bank import compose
    from ctprune.stages.search import RESOURCES, SearchArgs, prepare
    from ctprune.stages.search_verify import random_feasible
    from ctprune.task import evaluate
    from ctprune.training.loop import evaluate_loss

    p = prepare(SearchArgs(model=Path(origin), bank=Path(bank), output=Path(bank) / "unused.json",
                           **{r: search.get(r) for r in RESOURCES}, corpus=corpus, data_dir=data_dir))
    dev = resolve_device(device)
    val = load_split(corpus, default_splits(corpus)[1], data_dir)
    val_split = TokenizedSplit(val, p.tok, p.arch.max_len(p.origin))
    splits = _tests(corpus, data_dir, tests)
    rows = []
    for taken in random_feasible(p, n, seed, point=point):
        conf = p.configuration(taken)
        model = compose(p.origin, Path(bank), conf, p.index).to(dev).eval()
        rows.append({"configuration": conf, **p.describe(taken),
                     "val_loss": round(evaluate_loss(model, val_split, dev), 4),
                     "val_bleu": round(evaluate(model, p.tok, val), 2), "test_bleu": test_bleu(model, p.tok, splits)})
    return {"asked": n, "budget": point, "seed": seed, "rows": rows}


def scratch_job(origin: str, pruned: str, configuration: dict[str, float], output: str, max_flops: float | None,
                seed: int, select: str, corpus: str, data_dir: str | None, tests: list[str],
                device: str) -> dict[str, Any]:
    """The `scratch` competitor: the architecture of ``configuration`` composed from the pruned bank
    (the same layers, fewer heads, narrower FFNs), randomly initialised by the model's own init
    (normal(0, init_std), ``seed``) and trained from scratch with the origin's recipe (as its
    hparams.json records it; the kept model by ``select``) on the origin's training split and
    tokenizer, for ``max_flops`` training FLOPs (stopping within an epoch) or, when None, for the
    origin's whole training (its epochs). Returns its FLOPs per token, val BLEU (kept, last), the
    kept model's test BLEU on every split, training FLOPs and seconds."""
    import dataclasses

    import torch

    from ctprune.arch import arch_of
    from ctprune.data.corpus import default_splits, load_split
    from ctprune.model.checkpoint import load_model_folder
    from ctprune.model.flops import parameter_counts
    from ctprune.model.transformer import Seq2SeqTransformer
    from ctprune.pruning.bank import compose
    from ctprune.pruning.configs import prunable_modules, validate_configurations
    from ctprune.training.history import read_history
    from ctprune.training.loop import Recipe, epochs_for_flops, fit, has_training_run

    out, dev = Path(output), resolve_device(device)
    origin_model, tok, hp = load_model_folder(Path(origin))
    conf = validate_configurations([configuration], prunable_modules(origin_model), "scratch job")[0]
    shape = compose(origin_model, Path(pruned), conf)
    if not isinstance(shape, Seq2SeqTransformer):
        raise CtpruneError(f"the scratch competitor needs ctprune's own Transformer, not {type(shape).__name__}")
    torch.manual_seed(seed)
    model = Seq2SeqTransformer(dataclasses.replace(shape.cfg, sparse_linears=[]))  # its own init, dense
    if "recipe" not in hp:
        raise CtpruneError(f"{origin}: hparams.json records no recipe to train the scratch competitor with")
    known = {f.name for f in dataclasses.fields(Recipe)}
    recipe = Recipe(**{**{k: v for k, v in hp["recipe"].items() if k in known}, "seed": seed, "select": select})
    train_name, val_name, _ = default_splits(corpus)
    train, val = load_split(corpus, train_name, data_dir), load_split(corpus, val_name, data_dir)
    if max_flops is not None:
        recipe = dataclasses.replace(recipe, epochs=epochs_for_flops(model, tok, train, recipe, max_flops))
    if not (out / "train_summary.json").exists():
        fit(model, tok, train, val, recipe, out, {"stage": "scratch", "configuration": conf, "max_flops": max_flops},
            resume=has_training_run(out), device=dev, max_flops=max_flops)
    kept_model = load_model_folder(out, dev)[0]
    metrics = out / "test_metrics.json"
    if not metrics.exists() or set(read_json(metrics)["test_bleu_best"]) != set(tests):
        write_json_strict(metrics, {"test_bleu_best": test_bleu(kept_model, tok, _tests(corpus, data_dir, tests))},
                          "test metrics")
    first = load_split(corpus, tests[0], data_dir)
    src_len, tgt_len = mean_lengths(tok, first)
    arch = arch_of(kept_model)
    flops = arch.forward_flops(kept_model, src_len, tgt_len) / tgt_len
    history = read_history(out / "history.csv")
    summary = read_json(out / "train_summary.json")
    last = history[-1]
    return {**read_json(metrics), "max_flops": max_flops, "epochs_cap": recipe.epochs,
            "flops_per_token": round(flops),
            "flops_ratio": round(flops / (arch.forward_flops(origin_model, src_len, tgt_len) / tgt_len), 3),
            "params": parameter_counts(kept_model)[0], "val_bleu_best": summary["kept"]["val_bleu"],
            "val_bleu_last": float(last["val_bleu"]), "epochs_trained": float(last["epoch"]),
            "train_flops": float(last["train_flops"]), "train_seconds": float(last["wall_time_s"]),
            # False when the epochs' cap ended training short of its FLOPs (then not equal compute)
            "budget_reached": max_flops is None or float(last["train_flops"]) >= 0.999 * max_flops,
            "kept": summary["kept"]}
