"""`ctprune run`: the whole composability experiment, resumable, calling the stage functions.

RUN_DIR/
  origin/                 origin model (unless the experiment names one)
  conf.json, plan.json    configurations and plan
  banks/pruned            merely pruned variants (every variant any plan of this run asked for)
  banks/tuned-SCHED_FP    the same variants tuned with one tuning schedule
  finetune/{baseline,composed}/config-FP   one model folder per configuration, bank and schedule
  summary.json            every number of the report; report.md / report.html
Each step is skipped when its output is complete, resumed when it is partial. The banks grow
with the plan: after the configurations are edited only the variants no bank has yet are pruned
and tuned, and only configurations whose fingerprint changed are finetuned again.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ctprune import __version__
from ctprune.data.batching import pad
from ctprune.data.corpus import default_splits, load_split
from ctprune.data.tokenizer import EOS_ID
from ctprune.experiment import Experiment, load_experiment
from ctprune.fileio import read_json, write_json
from ctprune.model.checkpoint import is_model_folder, load_model_folder
from ctprune.model.decode import greedy, translate
from ctprune.model.flops import forward_flops, parameter_counts
from ctprune.model.transformer import Seq2SeqTransformer
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
from ctprune.training.loop import Recipe, read_history

SIDES = ("baseline", "composed")


def _say(msg: str) -> None:
    print(f"[ctprune run] {msg}", flush=True)


def _origin(exp: Experiment, run_dir: Path) -> Path:
    if exp.origin_model is not None:
        return exp.origin_model
    out = run_dir / "origin"
    if is_model_folder(out) and (out / "train_summary.json").exists():
        _say(f"origin model: done ({out})")
        return out
    resume = (out / "last" / "trainer_state.pt").exists()
    _say(f"origin model: {'resuming' if resume else 'training'} {exp.preset} on {exp.corpus}")
    from ctprune.cli import TINY_RECIPE

    recipe = Recipe(epochs=exp.origin_epochs, seed=exp.seed, bf16=exp.preset != "tiny",
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
    if (dst / INDEX_FILE).exists():
        index = load_index(dst)
    else:
        index = {**{k: v for k, v in new.items() if k != "tuning"}, "variants": {}}
    for key in keys:
        entry = new["variants"][key]
        if (src / entry["file"]).exists():  # absent only if an earlier merge moved it already
            os.replace(src / entry["file"], dst / entry["file"])
        index["variants"][key] = entry
    if "tuning" in new:
        t, old = {**new["tuning"], "sessions": 1}, index.get("tuning")
        if old:
            t.update(wall_time_s=round(old["wall_time_s"] + t["wall_time_s"], 2),
                     train_tokens=old["train_tokens"] + t["train_tokens"],
                     epochs_done=max(old["epochs_done"], t["epochs_done"]), sessions=old["sessions"] + 1)
        index["tuning"] = {**t, "variants": len(index["variants"])}
        rows = [r for f in (dst / "history.csv", src / "history.csv")
                for r in read_history(f) if r["variant"] in index["variants"]]
        write_block_history(dst / "history.csv", rows)
        plot_block_losses(rows, dst / "block_loss.png")
    write_json(dst / INDEX_FILE, index)
    shutil.rmtree(src)


def _sub_plan(plan: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    modules = {n: {**e, "ratios": [r for r in e["ratios"] if variant_key(n, r) in keys]}
               for n, e in plan["modules"].items()}
    body = {k: v for k, v in plan.items() if k != "modules_fingerprint"}  # a sub-plan is no edit
    return {**body, "modules": {n: e for n, e in modules.items() if e["ratios"]}}


def _banks(exp: Experiment, origin_dir: Path, plan: dict[str, Any], banks: Path) -> tuple[Path, Path]:
    """Prune and tune the variants of ``plan`` that the run's banks lack; returns (pruned, tuned)."""
    pruned = banks / "pruned"
    missing = _missing(plan, pruned)
    if missing:
        _say(f"prune: {len(missing)} block variants")
        write_json(banks / ".plan-missing.json", _sub_plan(plan, missing))
        tmp = banks / ".pruning"
        shutil.rmtree(tmp, ignore_errors=True)
        prune(origin_dir, tmp, plan_path=banks / ".plan-missing.json", corpus=exp.corpus, data_dir=exp.data_dir)
        _merge(tmp, pruned, missing)
    else:
        _say("prune: done")
    schedule = {"epochs": exp.tune_epochs, "lr": exp.tune_lr, "seed": exp.seed}
    tuned = banks / f"tuned-{fingerprint(schedule)[:8]}"
    missing = _missing(plan, tuned)
    if missing:
        tmp = banks / f".tuning-{fingerprint([tuned.name, missing])[:8]}"
        _say(f"tune-blocks: {len(missing)} variants, {exp.tune_epochs} epochs{' (resuming)' if tmp.exists() else ''}")
        tune_blocks(origin_dir, pruned, tmp, epochs=exp.tune_epochs, corpus=exp.corpus, data_dir=exp.data_dir,
                    lr=exp.tune_lr, resume=tmp.exists(), device="cpu", only=missing, seed=exp.seed,
                    max_tokens=exp.max_tokens)
        _merge(tmp, tuned, missing)
    else:
        _say("tune-blocks: done")
    return pruned, tuned


def _steps_and_ids(model: Seq2SeqTransformer, tok: Any, sentences: list[str]) -> tuple[list[list[int]], list[int]]:
    ids = [s + [EOS_ID] for s in tok.encode(sentences)]
    with torch.inference_mode():
        hyps = [h for k in range(0, len(ids), 128) for h in greedy(model, pad(ids[k:k + 128]))]
    return ids, [len(h) + 1 for h in hyps]


def latency(model: Seq2SeqTransformer, ids: list[list[int]], steps: list[int], batch_size: int = 64) -> float:
    """Seconds of batched greedy decoding with fixed step counts (same work for every model)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        with torch.inference_mode():
            for k in range(0, len(order), batch_size):
                chunk = order[k:k + batch_size]
                greedy(model, pad([ids[i] for i in chunk]), steps=max(steps[i] for i in chunk))
        best = min(best, time.perf_counter() - t0)
    return best


def _time_to_target(rows: list[dict[str, str]], target: float | None) -> tuple[int | None, float | None]:
    for r in rows:
        if target is not None and float(r["val_bleu"]) >= target:
            return int(r["epoch"]), float(r["wall_time_s"])
    return None, None


def run_experiment(exp_path: Path, run_dir: Path | None = None) -> Path:
    """Run (or finish) the experiment of ``exp_path`` in ``run_dir``; returns the report path."""
    from ctprune.stages.report import write_report

    exp = load_experiment(exp_path)
    run_dir = Path(run_dir or Path("runs") / Path(exp_path).stem)
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(exp_path, run_dir / "experiment.toml")
    origin_dir = _origin(exp, run_dir)
    origin, tok, _ = load_model_folder(origin_dir)
    modules = prunable_modules(origin)
    confs = experiment_configurations(exp, origin)
    write_json(run_dir / "conf.json", confs)
    plan = make_plan(confs, modules, model_fingerprint(origin_dir))
    write_json(run_dir / "plan.json", plan)
    pruned, tuned = _banks(exp, origin_dir, plan, run_dir / "banks")
    origin_bleu = read_json(origin_dir / "train_summary.json")["best_val_bleu"] \
        if (origin_dir / "train_summary.json").exists() else None
    _, val_name, test_name = default_splits(exp.corpus)
    if origin_bleu is None:
        val = load_split(exp.corpus, val_name, exp.data_dir)
        origin_bleu = score(translate(origin, tok, val.src), val.tgt).bleu
    target = exp.target_bleu(origin_bleu)
    test = load_split(exp.corpus, test_name, exp.data_dir)
    ids, steps = _steps_and_ids(origin, tok, test.src)
    origin_latency = latency(origin, ids, steps)
    origin_params, origin_nonzero = parameter_counts(origin)
    src_len = round(sum(map(len, ids)) / len(ids))
    tgt_len = round(sum(steps) / len(steps))
    origin_flops = forward_flops(origin.cfg, src_len, tgt_len) / tgt_len
    origin_test = score(translate(origin, tok, test.src), test.tgt)
    recipe = Recipe.finetune(epochs=exp.finetune_epochs, lr=exp.finetune_lr, seed=exp.seed,
                             bf16=exp.preset != "tiny", max_tokens=exp.max_tokens)
    rows = []
    for i, conf in enumerate(confs):
        row: dict[str, Any] = {"index": i, "configuration": conf, "fingerprint": fingerprint(conf)}
        for side, bank in zip(SIDES, (pruned, tuned)):
            key = {"configuration": conf, "bank": bank.name, "seed": exp.seed,
                   "target_bleu": None if target is None else round(target, 2),
                   "epochs": exp.finetune_epochs, "lr": exp.finetune_lr, "max_tokens": recipe.max_tokens}
            out = run_dir / "finetune" / side / f"config-{fingerprint(key)}"
            if not (out / "train_summary.json").exists():
                _say(f"finetune {side} configuration {i}")
                finetune(origin_dir, bank, run_dir / "conf.json", i, out, recipe, corpus=exp.corpus,
                         data_dir=exp.data_dir, target_bleu=target, resume=(out / "history.csv").exists(),
                         device="cpu")
            metrics = out / "test_metrics.json"
            if not metrics.exists():
                start = compose(origin, bank, conf).eval()
                best, _, _ = load_model_folder(out)
                s0 = score(translate(start, tok, test.src), test.tgt)
                s1 = score(translate(best, tok, test.src), test.tgt)
                params, nonzero = parameter_counts(best)
                write_json(metrics, {
                    "test_bleu_epoch0": round(s0.bleu, 2), "test_bleu_best": round(s1.bleu, 2),
                    "params": params, "nonzero_params": nonzero,
                    "flops_per_token": round(forward_flops(best.cfg, src_len, tgt_len) / tgt_len),
                    "latency_ratio": round(latency(best, ids, steps) / origin_latency, 3)})
            history = read_history(out / "history.csv")
            epoch, seconds = _time_to_target(history, target)
            row[side] = {**read_json(metrics), "dir": str(out.relative_to(run_dir)),
                         "epochs_to_target": epoch, "seconds_to_target": seconds,
                         "finetune_seconds": float(history[-1]["wall_time_s"]),
                         "val_bleu_epoch0": float(history[0]["val_bleu"]),
                         "val_bleu_best": max(float(r["val_bleu"]) for r in history)}
        rows.append(row)
    tuning = load_index(tuned)["tuning"]
    summary = {
        "experiment": str(exp_path), "seed": exp.seed, "corpus": exp.corpus, "target_bleu": target,
        "origin": {"dir": str(origin_dir), "val_bleu": round(origin_bleu, 2), "test_bleu": round(origin_test.bleu, 2),
                   "params": origin_params, "nonzero_params": origin_nonzero,
                   "flops_per_token": round(origin_flops), "latency_s": round(origin_latency, 3)},
        "bleu_signature": origin_test.bleu_signature, "chrf_signature": origin_test.chrf_signature,
        "tuning": tuning, "tuned_bank": str(tuned.relative_to(run_dir)), "configurations": rows,
        "versions": {"ctprune": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads()},
    }
    write_json(run_dir / "summary.json", summary)
    report = write_report(run_dir)
    _say(f"report: {report} (and report.html)")
    return report
