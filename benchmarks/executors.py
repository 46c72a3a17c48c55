"""Executors on this machine's cores: the same experiment with local (1 worker x all threads),
process (W workers x 1 thread) and ray (W x 1), from one shared origin model.

Per executor: wall time of the finetuning phase (first finetune job started -> last one ended,
from the job records) and of block tuning; the numbers of the run must agree (BLEU, epochs to
target). Also: tokens/s of one training process of the experiment's preset with 1 and with 2
threads (interleaved repeats), and the job graph's critical path, which bounds what N workers
could give: max(critical path, total job seconds / N). Prints one JSON object and a readable
line; writes the JSON to --output. Usage (about 10 minutes for the earlier demo on 2 cores; run alone):
    python benchmarks/executors.py examples/demo-configs.toml --work runs/executors-bench \
        --output benchmarks/results/executors/demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ctprune.fileio import write_json
from ctprune.run.experiment import load_experiment
from ctprune.run.graph import run_experiment


def records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "jobs").glob("*.json"))]


def phase_seconds(recs: list[dict[str, Any]], prefix: str) -> float:
    """Wall time from the first job named ``prefix``... starting to the last one ending."""
    rs = [r for r in recs if r["job"].startswith(prefix)]
    return round(max(r["started"] + r["seconds"] for r in rs) - min(r["started"] for r in rs), 2) if rs else 0.0


def critical_path(recs: list[dict[str, Any]]) -> float:
    """Longest chain of job seconds through the dependencies (jobs of one graph run)."""
    by_name = {r["job"]: r for r in recs}
    memo: dict[str, float] = {}

    def longest(name: str) -> float:
        if name not in memo:
            r = by_name[name]
            memo[name] = r["seconds"] + max((longest(d) for d in r["deps"] if d in by_name), default=0.0)
        return memo[name]

    return round(max(longest(n) for n in by_name), 2)


def tokens_per_second(preset: str, threads: int, steps: int, repeats: int) -> list[float]:
    """Training tokens/s of the preset's model on the demo corpus batches, ``threads`` threads."""
    from ctprune.data.batching import TokenizedSplit
    from ctprune.data.corpus import load_split
    from ctprune.data.tokenizer import Tokenizer
    from ctprune.model.transformer import ModelConfig, Seq2SeqTransformer
    from ctprune.training.loop import make_optimizer, preset_recipe, train_step

    train = load_split("synthetic", "train")
    tok = Tokenizer.train(train.src[:2000] + train.tgt[:2000], 1000)
    recipe = preset_recipe(preset)
    model = Seq2SeqTransformer(ModelConfig.preset(preset, tok.vocab_size)).train()
    opt = make_optimizer(model.parameters(), recipe)
    batches = TokenizedSplit(train, tok, model.cfg.max_len).batches(recipe.max_tokens, shuffle_seed=0)
    torch.set_num_threads(threads)
    out = []
    for _ in range(repeats):
        train_step(model, opt, batches[0], recipe, recipe.lr)  # warm-up
        t0, n = time.perf_counter(), 0
        for b in batches[1:steps + 1]:
            train_step(model, opt, b, recipe, recipe.lr)
            n += b.n_src_tokens + b.n_tgt_tokens
        out.append(round(n / (time.perf_counter() - t0), 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment")
    ap.add_argument("--work", required=True, help="folder of the runs (one per executor)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--executors", nargs="+", default=["local", "process", "ray"])
    ap.add_argument("--steps", type=int, default=30, help="training steps per throughput repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    work, exp_path = Path(a.work), Path(a.experiment)
    exp = load_experiment(exp_path)
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    runs: dict[str, Any] = {}
    origin: Path | None = exp.origin_model  # given by the experiment, or trained once by the first run
    for name in a.executors:
        run_dir = work / name
        path = exp_path
        if origin is not None and exp.origin_model is None:  # the first run's origin for every executor
            path = work / f"{name}.toml"
            text = exp_path.read_text().replace("[origin]\n", f"[origin]\nmodel = \"{origin.resolve()}\"\n", 1)
            path.write_text(text)
        workers = 1 if name == "local" else a.workers
        t0 = time.perf_counter()
        run_experiment(path, run_dir, execution={"executor": name, "workers": workers, "device": "cpu"})
        total = time.perf_counter() - t0
        origin = origin or run_dir / "origin"
        recs = [r for r in records(run_dir) if r["job"] != "origin model"]
        summary = json.loads((run_dir / "summary.json").read_text())
        runs[name] = {
            "workers": workers, "threads_per_finetune": sorted({r["threads"] for r in recs if r["job"].startswith(
                "finetune")}), "run_s": round(total, 1),
            "finetune_phase_s": phase_seconds(recs, "finetune"), "tuning_phase_s": phase_seconds(recs, "tune-blocks"),
            "job_seconds": round(sum(r["seconds"] for r in recs), 1), "critical_path_s": critical_path(recs),
            "numbers": [[c[s]["epochs_to_target"], c[s]["val_bleu_best"], c[s]["test_bleu_best"]]
                        for r in summary["runs"] for c in r["configurations"] for s in ("baseline", "composed")],
        }
    base = runs.get("local")
    for r in runs.values():
        r["same_numbers_as_local"] = base is not None and r["numbers"] == base["numbers"]
        if base:
            r["finetune_speedup_vs_local"] = round(base["finetune_phase_s"] / max(r["finetune_phase_s"], 1e-9), 3)
    preset = exp.origin.preset
    one, two = [], []
    for _ in range(a.repeats):  # interleaved, so drifts hit both alike
        one += tokens_per_second(preset, 1, a.steps, 1)
        two += tokens_per_second(preset, 2, a.steps, 1)
    result = {"experiment": str(exp_path), "cores": cores, "runs": runs,
              "train_tokens_per_s": {"preset": preset, "threads_1": one, "threads_2": two,
                                     "median_1": statistics.median(one), "median_2": statistics.median(two),
                                     "ratio_2_over_1": round(statistics.median(two) / statistics.median(one), 3)}}
    if base:
        n = base["job_seconds"]
        result["bound_with_n_workers_s"] = {str(k): round(max(base["critical_path_s"], n / k), 1) for k in (1, 2, 4, 8)}
    print(json.dumps(result))
    print("executors: " + "; ".join(
        f"{k} {r['workers']} worker(s) x {r['threads_per_finetune']} thread(s) finetuning {r['finetune_phase_s']:.1f}s "
        f"({r.get('finetune_speedup_vs_local', 1):.2f}x local), tuning {r['tuning_phase_s']:.1f}s, "
        f"same numbers {r['same_numbers_as_local']}" for k, r in runs.items())
        + f"; training {preset}: {result['train_tokens_per_s']['median_1']:.0f} tok/s with 1 thread, "
          f"{result['train_tokens_per_s']['median_2']:.0f} with 2")
    if a.output:
        write_json(Path(a.output), result)


if __name__ == "__main__":
    main()
