"""Stage `prune`: origin model + plan -> block bank (one variant per (module, keep ratio))."""

from __future__ import annotations

import shutil
import time
from typing import Any

import torch

from ctprune.arch import Architecture, arch_of
from ctprune.data.batching import TokenizedSplit
from ctprune.data.corpus import default_splits, load_split
from ctprune.errors import CtpruneError
from ctprune.fileio import check_output, read_json, temp_dir_beside
from ctprune.model.checkpoint import load_model_folder
from ctprune.progress import progress
from ctprune.pruning import importance
from ctprune.pruning.bank import Bank
from ctprune.pruning.configs import (
    KINDS,
    Prunable,
    check_plan,
    check_ratio,
    fingerprint,
    model_fingerprint,
    variant_ids,
    variant_key,
)
from ctprune.pruning.surgery import l1_mask, mask_linear, n_keep
from ctprune.spec import MAX_TOKENS
from ctprune.stages.args import PruneArgs


def make_variant(arch: Architecture, model: torch.nn.Module, name: str, kind: str, ratio: float, criterion: str,
                 stats: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """One pruned copy of module ``name`` of ``model`` (of architecture ``arch``) and its index entry."""
    module = arch.block(model, name)
    entry: dict[str, Any] = {"module": name, "kind": kind, "ratio": ratio,
                             "provenance": {"stage": "pruned", "criterion": criterion,
                                            "epochs": 0, "block_loss": None}}
    if kind == "linear":
        mask = l1_mask(module.weight, ratio)
        variant = mask_linear(module, mask)
        entry.update(nonzero=int(mask.sum()), weights=mask.numel(),
                     sparsity=round(1 - float(mask.mean()), 6))
        entry["provenance"]["criterion"] = "l1-magnitude"
        return variant, entry
    scores = stats[name] if criterion == "activation" else arch.scores(module, criterion)
    keep = scores.topk(n_keep(ratio, len(scores))).indices.sort().values
    removed = sorted(set(range(len(scores))) - set(keep.tolist()))
    variant = arch.cut(module, keep)
    entry.update(kept=keep.tolist(), removed=removed, size=len(keep), of=len(scores),
                 scores=[round(float(s), 6) for s in scores])
    return variant, entry


def grid_plan(modules: dict[str, Prunable], grid: list[float], kinds: tuple[str, ...]
              ) -> tuple[dict[str, Any], str]:
    """(plan, plan fingerprint) of a grid bank: every module of ``kinds`` at every ratio < 1."""
    ratios = sorted({check_ratio(r, "--grid") for r in grid} - {1.0})
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise CtpruneError(f"--kinds: choose from {', '.join(KINDS)}, got {', '.join(kinds) or 'none'}")
    if not ratios:
        raise CtpruneError(f"--grid {' '.join(f'{r:g}' for r in grid)} keeps every module whole, so the grid bank "
                           "would be empty; give keep ratios in [0, 1), e.g. --grid 0.25 0.5 0.75")
    # keep 0 removes attention / FFN blocks; a Linear keeps at least one weight
    plan = {"modules": {n: {"kind": m.kind, "ratios": [r for r in ratios if r > 0 or m.kind != "linear"]}
                        for n, m in modules.items() if m.kind in kinds}}
    plan["modules"] = {n: e for n, e in plan["modules"].items() if e["ratios"]}
    if not plan["modules"]:
        raise CtpruneError(f"--grid {' '.join(f'{r:g}' for r in grid)} with --kinds {' '.join(kinds)} gives no block "
                           "variant (this model has no module of those kinds, or keep 0 was asked of Linears, which "
                           "keep at least one weight); give keep ratios in (0, 1) or other kinds")
    return plan, f"grid-{'-'.join(f'{r:g}' for r in ratios)}-{'-'.join(sorted(kinds))}"


def prune(args: PruneArgs) -> dict[str, Any]:
    """Write the bank ``args.output`` with every variant of the plan (or every prunable module at
    ``ratio``, or a grid bank: every prunable module of ``kinds`` at every ratio of ``grid``) and
    return its index.

    The bank is built in a temporary folder and renamed into place when complete."""
    model_dir, plan_path, ratio, grid, criterion = args.model, args.plan, args.ratio, args.grid, args.criterion
    output = check_output(args.output, {"model folder": model_dir, "plan": plan_path, "data folder": args.data_dir})
    if output.exists() or output.is_symlink():
        raise CtpruneError(f"{output} already exists; choose another -o or remove it")
    model, tok, _ = load_model_folder(model_dir, tokenizer=criterion == "activation")
    arch = arch_of(model)
    modules = arch.units(model)
    model_fp = model_fingerprint(model_dir)
    if plan_path is not None:
        plan = check_plan(read_json(plan_path, "plan"), modules, str(plan_path))
        if plan["model_fingerprint"] != model_fp:
            raise CtpruneError(f"plan {plan_path} was made for another model (fingerprint "
                               f"{plan['model_fingerprint']}, {model_dir} is {model_fp})")
        plan_fp = fingerprint(plan)
    elif grid is not None:
        plan, plan_fp = grid_plan(modules, list(grid), args.kinds)
    else:
        r = check_ratio(ratio, "--ratio", zero=False)
        if r == 1:
            raise CtpruneError("--ratio 1 keeps every module whole, so the bank would be empty")
        plan = {"modules": {n: {"kind": m.kind, "ratios": [r] if r < 1 else []}
                            for n, m in modules.items()}}
        plan_fp = f"ratio-{r:g}"
    if arch.name != "ctprune" and any(0 in e["ratios"] for e in plan["modules"].values()):
        raise CtpruneError(f"keep ratio 0 (the block removed) is supported for ctprune's own Transformer, "
                           f"not yet for {arch.model_class}; use ratios in (0, 1]")
    stats: dict[str, torch.Tensor] = {}
    if criterion == "activation":
        train = load_split(args.corpus, default_splits(args.corpus)[0], args.data_dir)
        batches = TokenizedSplit(train, tok, arch.max_len(model)).batches(MAX_TOKENS, shuffle_seed=0)
        stats = importance.activation_stats(arch, model, batches[:args.calibration_batches])
    tmp = temp_dir_beside(output)
    try:
        bank = Bank.create(tmp, model_fp, plan_fp, criterion=criterion)
        t0 = time.perf_counter()
        for name, r in progress(variant_ids(plan), desc="prune", unit="variant", leave=False):
            variant, entry = make_variant(arch, model, name, modules[name].kind, r, criterion, stats)
            bank.add(variant_key(name, r), variant, entry)
        bank.set_prune_seconds(time.perf_counter() - t0)
        bank.write()
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return bank.index
