"""Size, FLOPs and measured CPU latency of composed (pruned) models vs the origin model.

For keep ratios 0.75 / 0.5 / 0.25 of every attention block (heads) and every FFN (neurons),
and one unstructured case (every FFN Linear at 0.5), composed through the real pipeline
(configs -> plan -> prune -> compose), for any architecture ctprune takes (its own Transformer,
MarianMT, T5). Latency: greedy translation of the test set's first sentences, batched and one
sentence at a time, with the same number of decoding steps for every model (the origin's output
lengths), so only the model's speed differs; every model runs once per round, rounds
interleaved after a warm-up, median and spread ((max - min) / median) over the rounds. Usage:
    python benchmarks/pruned_speed.py MODEL [--data-dir DIR] [--output results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from ctprune.arch import arch_of
from ctprune.data.batching import pad
from ctprune.data.corpus import load_split
from ctprune.fileio import write_json
from ctprune.latency import batched_and_single
from ctprune.model.checkpoint import load_model_folder
from ctprune.model.flops import parameter_counts
from ctprune.spec import LATENCY_REPEATS
from ctprune.stages.compose import compose_configuration
from ctprune.stages.configs import ConfigsArgs, PlanArgs, write_configs, write_plan
from ctprune.stages.prune import PruneArgs, prune

RATIOS = (0.75, 0.5, 0.25)


def composed_models(model_dir: Path, tmp: Path) -> dict[str, torch.nn.Module]:
    """Every structured keep ratio (heads + FFN neurons of every layer) and FFN Linears at 0.5."""
    write_configs(ConfigsArgs(model=model_dir, n=len(RATIOS), output=tmp / "structured.json", attention=RATIOS,
                              ffn=RATIOS))
    write_configs(ConfigsArgs(model=model_dir, n=1, output=tmp / "linear.json", attention=[1.0], linear=[0.5]))
    for name in ("structured", "linear"):
        write_plan(PlanArgs(configurations=tmp / f"{name}.json", model=model_dir, output=tmp / f"{name}-plan.json"))
        prune(PruneArgs(model=model_dir, output=tmp / f"{name}-bank", plan=tmp / f"{name}-plan.json"))
    models = {f"heads+ffn {r}": compose_configuration(model_dir, tmp / "structured-bank", tmp / "structured.json",
                                                      i)[0].eval() for i, r in enumerate(RATIOS)}
    models["linear 0.5 (unstructured)"] = compose_configuration(
        model_dir, tmp / "linear-bank", tmp / "linear.json", 0)[0].eval()
    return models


def spread(seconds: list[float]) -> float:
    """(max - min) / median of repeated timings."""
    return round((max(seconds) - min(seconds)) / statistics.median(seconds), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--split", default="test_2016_flickr")
    ap.add_argument("--sentences", type=int, default=512, help="first sentences of the split, batched (64)")
    ap.add_argument("--single", type=int, default=64, help="of those, decoded one at a time")
    ap.add_argument("--repeats", type=int, default=LATENCY_REPEATS, help="interleaved rounds after one warm-up")
    ap.add_argument("--output", type=Path, default=None, help="write the results here as JSON")
    a = ap.parse_args()
    origin, tok, _ = load_model_folder(a.model)
    arch = arch_of(origin)
    src = load_split("multi30k", a.split, a.data_dir).src[:a.sentences]
    ids = [s[:arch.max_len(origin) - 1] + [tok.eos_id] for s in tok.encode(src)]
    with torch.inference_mode():
        steps = [len(h) + 1 for k in range(0, len(ids), 128)
                 for h in arch.generate(origin, pad(ids[k:k + 128], tok.pad_id))]
    src_len = round(sum(map(len, ids)) / len(ids))
    tgt_len = round(sum(steps) / len(steps))
    with tempfile.TemporaryDirectory() as tmp:
        models = {"origin": origin, **composed_models(a.model, Path(tmp))}
    batched, single = batched_and_single(arch, list(models.values()), ids, steps, a.repeats, a.single,
                                         pad_id=tok.pad_id)
    results = []
    for (name, model), b, s in zip(models.items(), batched, single):
        params, nonzero = parameter_counts(model)
        flops = arch.forward_flops(model, src_len, tgt_len) / tgt_len
        r = {"model": name, "params": params, "nonzero_params": nonzero, "flops_per_token": round(flops),
             "batched_s": round(statistics.median(b), 3), "batched_spread": spread(b),
             "single_s": round(statistics.median(s), 3), "single_spread": spread(s)}
        base = results[0] if results else r
        r.update(params_ratio=round(params / base["params"], 3),
                 flops_ratio=round(flops / base["flops_per_token"], 3),
                 batched_speedup=round(base["batched_s"] / r["batched_s"], 3),
                 single_speedup=round(base["single_s"] / r["single_s"], 3))
        results.append(r)
        print(f"{name:<26} params {params / 1e6:6.2f}M (non-zero {nonzero / 1e6:6.2f}M)  FLOPs/token "
              f"{flops / 1e6:6.1f}M ({r['flops_ratio']:.2f}x)  batched {r['batched_s']:6.2f}s "
              f"±{r['batched_spread']:.0%} "
              f"(speedup {r['batched_speedup']:.2f}x, FLOPs bound {1 / r['flops_ratio']:.2f}x)  single "
              f"{r['single_s']:6.2f}s ±{r['single_spread']:.0%} (speedup {r['single_speedup']:.2f}x)", flush=True)
    out = {"model": str(a.model), "arch": arch.name, "split": a.split, "sentences": len(ids), "single": a.single,
           "repeats": a.repeats, "threads": torch.get_num_threads(), "src_len": src_len, "tgt_len": tgt_len,
           "results": results}
    print(json.dumps(out))
    if a.output:
        write_json(a.output, out)


if __name__ == "__main__":
    main()
