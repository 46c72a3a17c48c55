"""Size, FLOPs and measured CPU latency of composed (pruned) models vs the origin model.

For keep ratios 0.75 / 0.5 / 0.25 of every attention block (heads) and every FFN (neurons),
and one unstructured case (every FFN Linear at 0.5), composed through the real pipeline
(configs -> plan -> prune -> compose). Latency: batched greedy translation of the test set and
single-sentence translation, each with the same number of decoding steps for every model
(the origin's output lengths), so only the model's speed differs. Usage:
    python benchmarks/pruned_speed.py MODEL [--data-dir DIR] [--single 100]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ctprune.data.batching import pad
from ctprune.data.corpus import load_split
from ctprune.data.tokenizer import EOS_ID
from ctprune.model.checkpoint import load_model_folder
from ctprune.model.decode import greedy
from ctprune.model.flops import forward_flops, parameter_counts
from ctprune.model.transformer import Seq2SeqTransformer
from ctprune.pruning.configs import prunable_modules
from ctprune.stages.compose import compose_configuration
from ctprune.stages.configs import write_configs, write_plan
from ctprune.stages.prune import prune


def timed_translation(model: Seq2SeqTransformer, ids: list[list[int]], steps: list[int],
                      batch_size: int) -> float:
    """Seconds to greedy-decode ``ids`` in length-sorted batches, ``steps[i]`` steps per sentence."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for k in range(0, len(order), batch_size):
            chunk = order[k:k + batch_size]
            greedy(model, pad([ids[i] for i in chunk]), steps=max(steps[i] for i in chunk))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--split", default="test_2016_flickr")
    ap.add_argument("--single", type=int, default=100, help="sentences for single-sentence latency")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    origin, tok, _ = load_model_folder(a.model)
    data = load_split("multi30k", a.split, a.data_dir)
    ids = [s + [EOS_ID] for s in tok.encode(data.src)]
    with torch.inference_mode():
        hyps = [h for k in range(0, len(ids), 128) for h in greedy(origin, pad(ids[k:k + 128]))]
    steps = [len(h) + 1 for h in hyps]
    src_len = sum(map(len, ids)) / len(ids)
    tgt_len = sum(steps) / len(steps)
    modules = prunable_modules(origin)
    variants: dict[str, Seq2SeqTransformer] = {"origin": origin}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_configs(Path(a.model), 3, d / "structured.json", attention=[0.75, 0.5, 0.25], ffn=[0.75, 0.5, 0.25])
        write_configs(Path(a.model), 1, d / "linear.json", attention=[1.0], linear=[0.5])
        for name in ("structured", "linear"):
            write_plan(d / f"{name}.json", Path(a.model), d / f"{name}-plan.json")
            prune(Path(a.model), d / f"{name}-bank", plan_path=d / f"{name}-plan.json")
        for i, r in enumerate((0.75, 0.5, 0.25)):
            variants[f"heads+ffn {r}"] = compose_configuration(
                Path(a.model), d / "structured-bank", d / "structured.json", i)[0].eval()
        variants["linear 0.5 (unstructured)"] = compose_configuration(
            Path(a.model), d / "linear-bank", d / "linear.json", 0)[0].eval()
    results = []
    base: dict[str, float] = {}
    for name, model in variants.items():
        params, nonzero = parameter_counts(model)
        flops = forward_flops(model.cfg, round(src_len), round(tgt_len)) / round(tgt_len)
        batched = min(timed_translation(model, ids, steps, 128) for _ in range(a.repeats))
        single = min(timed_translation(model, ids[:a.single], steps[:a.single], 1) for _ in range(a.repeats))
        r = {"model": name, "params": params, "nonzero_params": nonzero, "flops_per_token": round(flops),
             "batched_s": round(batched, 3), "single_s": round(single, 3)}
        if name == "origin":
            base = {"params": params, "flops": flops, "batched": batched, "single": single}
        r.update(flops_ratio=round(flops / base["flops"], 3),
                 batched_speedup=round(base["batched"] / batched, 3),
                 single_speedup=round(base["single"] / single, 3),
                 params_ratio=round(params / base["params"], 3))
        results.append(r)
        print(json.dumps(r))
        print(f"{name:<28} params {params / 1e6:6.2f}M (non-zero {nonzero / 1e6:6.2f}M)  "
              f"FLOPs/token {flops / 1e6:6.1f}M ({r['flops_ratio']:.2f}x)  batched {batched:6.2f}s "
              f"(speedup {r['batched_speedup']:.2f}x, FLOPs bound {1 / r['flops_ratio']:.2f}x)  "
              f"single {single:6.2f}s (speedup {r['single_speedup']:.2f}x)", flush=True)
    print(json.dumps({"modules": len(modules), "results": results}))


if __name__ == "__main__":
    main()
