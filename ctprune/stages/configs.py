"""Stages `inspect`, `configs` and `plan`: prunable modules -> configurations -> plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ctprune.errors import CtpruneError
from ctprune.fileio import check_existing, check_output, read_json, write_json
from ctprune.model.checkpoint import load_model_folder
from ctprune.pruning.configs import (
    Configuration,
    default_configurations,
    load_configurations,
    make_plan,
    model_fingerprint,
    prunable_modules,
)
from ctprune.stages.args import ConfigsArgs, InspectArgs, PlanArgs


def inspect_model(args: InspectArgs) -> list[str]:
    """One line per prunable module: name, kind, parameters, heads/neurons/weights."""
    model_dir = args.model
    model, _, _ = load_model_folder(model_dir, tokenizer=False)
    mods = prunable_modules(model)
    total = sum(p.numel() for p in model.parameters())
    lines = [f"{model_dir}: {total:,} parameters, {len(mods)} prunable modules",
             f"{'module':<40} {'kind':<10} {'params':>10}  size"]
    lines += [f"{m.name:<40} {m.kind:<10} {m.params:>10,}  {m.size} {m.unit}" for m in mods.values()]
    return lines


def _is_json_of(kind: type, fmt: str | None = None) -> Any:
    """Predicate: an existing output may be replaced only if it is a file of the same kind."""
    def own(path: Path) -> bool:
        try:
            obj = read_json(path) if path.is_file() else None
        except CtpruneError:
            return False
        return isinstance(obj, kind) and (fmt is None or obj.get("format") == fmt)
    return own


def write_configs(args: ConfigsArgs) -> list[Configuration]:
    """``args.n`` configurations of the prototype's template (or the ratios given) -> ``args.output``."""
    check_output(args.output, {"model folder": args.model})
    check_existing(args.output, _is_json_of(list), "a configuration file")
    model, _, _ = load_model_folder(args.model, tokenizer=False)
    confs = default_configurations(prunable_modules(model), args.n, *(None if r is None else list(r) for r in
                                                                       (args.attention, args.linear, args.ffn)))
    write_json(args.output, confs)
    return confs


def write_plan(args: PlanArgs) -> dict[str, Any]:
    """The plan of a configuration file, checked against the origin model whose fingerprint it
    records, so that a bank or configuration from another model is refused later."""
    conf_path, model_dir, output = args.configurations, args.model, args.output
    check_output(output, {"configuration file": conf_path, "model folder": model_dir})
    check_existing(output, _is_json_of(dict, "ctprune-plan/1"), "a plan")
    model, _, _ = load_model_folder(model_dir, tokenizer=False)
    modules = prunable_modules(model)
    confs = load_configurations(conf_path, modules)
    plan = make_plan(confs, modules, model_fingerprint(model_dir))
    if not plan["modules"]:
        raise CtpruneError(f"{conf_path}: every keep ratio is 1, so there is nothing to prune")
    write_json(output, plan)
    return plan
