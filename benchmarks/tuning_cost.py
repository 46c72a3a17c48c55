"""One teacher pass for all block variants vs tuning the variants one at a time.

ctprune's `tune-blocks` runs the frozen origin model once per batch and trains every variant on
the recorded activations. The prototype's `finetune_single` tuned one variant at a time, so every
variant paid for its own teacher pass. This benchmark prunes the configurations of an experiment
file (default: examples/multi30k.toml) into a temporary bank and times the same training batches
both ways: all variants together, and each variant alone (summed). Usage:
    python benchmarks/tuning_cost.py MODEL [--data-dir DIR] [--batches 40] [--experiment FILE]
The per-epoch numbers are the measured seconds per batch times the batches of one epoch.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from ctprune.arch import Architecture, arch_of
from ctprune.data.batching import Batch, TokenizedSplit
from ctprune.data.corpus import load_split
from ctprune.fileio import write_json
from ctprune.model.checkpoint import load_model_folder
from ctprune.model.transformer import Seq2SeqTransformer
from ctprune.pruning.bank import load_index, load_variant
from ctprune.pruning.configs import make_plan, model_fingerprint, prunable_modules, validate_configurations
from ctprune.run.experiment import load_experiment
from ctprune.spec import MAX_TOKENS
from ctprune.stages.prune import PruneArgs, prune
from ctprune.stages.tune_blocks import Recorder, block_losses


def seconds_per_batch(arch: Architecture, origin: Seq2SeqTransformer, variants: dict[str, nn.Module],
                      modules: dict[str, str], batches: list[Batch], lr: float) -> float:
    """Train ``variants`` (all at once) on ``batches``; the first batch is a warm-up, not timed."""
    params = [p for v in variants.values() for p in v.parameters()]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.98), eps=1e-9)
    rec = Recorder(arch, origin, sorted({modules[k] for k in variants}))
    try:
        for i, batch in enumerate(batches):
            if i == 1:
                t0 = time.perf_counter()
            losses = block_losses(arch, origin, variants, modules, rec, batch)
            opt.zero_grad(set_to_none=True)
            torch.stack(list(losses.values())).sum().backward()
            opt.step()
    finally:
        rec.remove()
    return (time.perf_counter() - t0) / (len(batches) - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--experiment", default=str(Path(__file__).parents[1] / "examples" / "multi30k.toml"))
    ap.add_argument("--batches", type=int, default=40, help="training batches timed per way (after 1 warm-up)")
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    a = ap.parse_args()
    torch.manual_seed(0)
    origin, tok, _ = load_model_folder(a.model)
    arch = arch_of(origin)
    origin.requires_grad_(False)
    exp = load_experiment(Path(a.experiment))
    if exp.configurations is None or exp.configurations.inline is None:
        raise SystemExit(f"{a.experiment}: needs [configurations] inline = [...]")
    confs = validate_configurations(list(exp.configurations.inline), prunable_modules(origin), a.experiment)
    train = TokenizedSplit(load_split("multi30k", "train", a.data_dir), tok, origin.cfg.max_len)
    all_batches = train.batches(a.max_tokens, shuffle_seed=0)
    batches = all_batches[:a.batches + 1]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_json(d / "plan.json", make_plan(confs, prunable_modules(origin), model_fingerprint(Path(a.model))))
        prune(PruneArgs(model=Path(a.model), output=d / "bank", plan=d / "plan.json"))
        index = load_index(d / "bank")

        def fresh(keys: list[str]) -> dict[str, nn.Module]:
            out = {}
            for k in keys:
                v = load_variant(d / "bank", index, k, origin)
                out[k] = v.eval().requires_grad_(True)
            return out

        keys = list(index["variants"])
        modules = {k: index["variants"][k]["module"] for k in keys}
        joint = seconds_per_batch(arch, origin, fresh(keys), modules, batches, exp.tuning.lr)
        single = {k: seconds_per_batch(arch, origin, fresh([k]), modules, batches, exp.tuning.lr) for k in keys}
    n = len(all_batches)
    result = {"variants": len(keys), "timed_batches": a.batches, "epoch_batches": n,
              "joint_s_per_batch": round(joint, 4), "one_at_a_time_s_per_batch": round(sum(single.values()), 4),
              "joint_epoch_s": round(joint * n, 1), "one_at_a_time_epoch_s": round(sum(single.values()) * n, 1),
              "saving": round(sum(single.values()) / joint, 2),
              "per_variant_epoch_s": {k: round(s * n, 1) for k, s in single.items()},
              "threads": torch.get_num_threads()}
    print(json.dumps(result))
    print(f"{len(keys)} variants, one block-tuning epoch ({n} batches of <= {a.max_tokens} tokens): "
          f"all together {result['joint_epoch_s']:.0f}s vs one at a time {result['one_at_a_time_epoch_s']:.0f}s "
          f"({result['saving']:.2f}x)")


if __name__ == "__main__":
    main()
