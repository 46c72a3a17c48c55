"""Prunable modules, configuration files, plans, and the fingerprints that tie them together.

Module names are those of the model's architecture (``ctprune inspect MODEL`` lists them; see
``ctprune.arch``). For ctprune's own Transformer: ``encoder.layers.I.self_attn``,
``decoder.layers.I.self_attn``, ``decoder.layers.I.cross_attn`` (attention, pruned by heads);
``encoder|decoder.layers.I.ffn`` (FFN, pruned by hidden neurons); and every Linear inside them,
e.g. ``decoder.layers.2.ffn.linear1`` or ``encoder.layers.0.self_attn.q_proj`` (linear, pruned
unstructured by L1 magnitude).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from pathlib import Path
from typing import Any

from torch import nn

from ctprune.arch import KINDS as KINDS  # re-exported: stages import it from here
from ctprune.arch import Prunable, arch_of, detect
from ctprune.errors import CtpruneError
from ctprune.fileio import brief, read_json

Configuration = dict[str, float]


def prunable_modules(model: nn.Module) -> dict[str, Prunable]:
    """Every prunable module of ``model`` by name, in model order: ``arch.units(model)`` for a
    caller that has no architecture at hand (one that has calls ``units`` itself)."""
    return arch_of(model).units(model)


def _parent(name: str, modules: dict[str, Prunable]) -> str | None:
    """The attention/ffn block that contains Linear ``name``, if any."""
    return modules[name].parent


# More default configurations than this in one file is a typo (-n 1000000000 ran for ever).
MAX_CONFIGURATIONS = 10_000


def check_ratio(value: Any, where: str, zero: bool = True) -> float:
    """A keep ratio in [0, 1]; 0 removes a block altogether (its residual branch skipped), so
    ``zero=False`` for a Linear (unstructured), which keeps at least one weight."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CtpruneError(f"{where}: keep ratio must be a number in [0, 1], got {brief(value)}")
    if not 0 <= value <= 1:
        raise CtpruneError(f"{where}: keep ratio must be in [0, 1] (0: the block removed), got {brief(value)}")
    if value == 0 and not zero:
        raise CtpruneError(f"{where}: keep ratio of a Linear must be in (0, 1] (keep 0 removes attention "
                           f"and FFN blocks only), got {brief(value)}")
    return float(value) + 0.0  # -0.0 -> 0.0: a variant key (MODULE@-0) and file name of its own


def check_module(name: Any, modules: dict[str, Prunable], where: str) -> str:
    if name not in modules:
        # (a hint only for a name of a plausible length: matching a 10 MB key would take minutes)
        close = difflib.get_close_matches(str(name), list(modules), n=1, cutoff=0.5) if len(str(name)) < 300 else []
        hint = f"; did you mean {brief(close[0])}?" if close else "; `ctprune inspect MODEL` lists them"
        raise CtpruneError(f"{where}: unknown module {brief(name)}{hint}")
    return name


def validate_configurations(raw: Any, modules: dict[str, Prunable], source: str) -> list[Configuration]:
    """A JSON list of ``{module name: keep ratio}`` objects, checked against ``modules``."""
    if not isinstance(raw, list) or not raw:
        raise CtpruneError(f"{source}: a configuration file must be a non-empty JSON list of "
                           "{module name: keep ratio} objects")
    confs: list[Configuration] = []
    for i, conf in enumerate(raw):
        where = f"{source}: configuration {i}"
        if not isinstance(conf, dict) or not conf:
            raise CtpruneError(f"{where} must be a non-empty object {{module name: keep ratio}}")
        clean = {check_module(k, modules, where): check_ratio(v, f"{where}, {k}", modules[k].kind != "linear")
                 for k, v in conf.items()}
        for name, ratio in clean.items():
            parent = _parent(name, modules)
            if ratio < 1 and parent is not None and clean.get(parent, 1.0) < 1:
                raise CtpruneError(f"{where}: prunes both {brief(parent)} and its Linear {brief(name)}; "
                                   "prune a block or its Linears, not both")
        confs.append(clean)
    return confs


def load_configurations(path: Path, modules: dict[str, Prunable]) -> list[Configuration]:
    return validate_configurations(read_json(path, "configuration file"), modules, str(path))


def default_configurations(modules: dict[str, Prunable], n: int, attention: list[float] | None,
                           linear: list[float] | None, ffn: list[float] | None, label: str = "--"
                           ) -> list[Configuration]:
    """The prototype's template: every attention block and every FFN Linear at a ratio per
    configuration (0.5 unless given). With ``ffn``, FFNs are pruned structured instead. Errors
    name the options as ``label`` + attention (the CLI's --attention, an experiment file's key)."""
    for name, values in (("attention", attention), ("linear", linear), ("ffn", ffn)):
        if values is not None and len(values) != n:
            raise CtpruneError(f"{label}{name} needs {n} ratios (one per configuration), got {len(values)}")
        for v in values or []:
            check_ratio(v, f"{label}{name}", name != "linear")
    if not 1 <= n <= MAX_CONFIGURATIONS:
        raise CtpruneError(f"-n must be in [1, {MAX_CONFIGURATIONS}], got {n}")
    confs: list[Configuration] = []
    for i in range(n):
        conf: Configuration = {}
        for name, m in modules.items():
            if m.kind == "attention":
                conf[name] = attention[i] if attention else 0.5
            elif m.kind == "ffn" and ffn is not None:
                conf[name] = ffn[i]
            elif m.kind == "linear" and ffn is None and m.parent and modules[m.parent].kind == "ffn":
                conf[name] = linear[i] if linear else 0.5
        confs.append(conf)
    return confs


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def model_fingerprint(folder: Path) -> str:
    """Hash of a model folder's architecture (config, per-layer sizes) and weights."""
    return detect(folder).fingerprint(Path(folder))


def make_plan(confs: list[Configuration], modules: dict[str, Prunable], model_fp: str) -> dict[str, Any]:
    """Per module, the sorted distinct keep ratios < 1 used by any configuration."""
    ratios: dict[str, set[float]] = {}
    for conf in confs:
        for name, r in conf.items():
            if r < 1:
                ratios.setdefault(name, set()).add(r)
    order = list(modules)
    body = {name: {"kind": modules[name].kind, "ratios": sorted(ratios[name])}
            for name in sorted(ratios, key=order.index)}
    return {
        "format": "ctprune-plan/1",
        "model_fingerprint": model_fp,
        "configurations_fingerprint": fingerprint(confs),
        "modules_fingerprint": fingerprint(body),  # a hand-edited plan no longer matches it
        "modules": body,
    }


def check_plan(plan: Any, modules: dict[str, Prunable], source: str) -> dict[str, Any]:
    """Schema of a plan: format, model fingerprint, and per module its kind and a non-empty list
    of distinct keep ratios < 1; a plan edited after planning fails its own fingerprint."""
    if not isinstance(plan, dict) or plan.get("format") != "ctprune-plan/1":
        raise CtpruneError(f"{source} is not a ctprune plan (no \"format\": \"ctprune-plan/1\")")
    if not isinstance(plan.get("model_fingerprint"), str):
        raise CtpruneError(f"{source}: \"model_fingerprint\" is missing or not a string")
    if not isinstance(plan.get("modules"), dict):
        raise CtpruneError(f"{source}: \"modules\" must be an object {{module name: {{kind, ratios}}}}")
    if not plan["modules"]:
        raise CtpruneError(f"{source}: the plan has no modules, so there is nothing to prune")
    for name, entry in plan["modules"].items():
        check_module(name, modules, source)
        if not isinstance(entry, dict) or not isinstance(entry.get("ratios"), list) or not entry["ratios"]:
            raise CtpruneError(f"{source}, {name}: must be an object with a non-empty list \"ratios\"")
        if entry.get("kind") != modules[name].kind:
            raise CtpruneError(f"{source}, {name}: kind {brief(entry.get('kind'))} contradicts the module, "
                               f"which is {brief(modules[name].kind)}")
        rs = [check_ratio(r, f"{source}, {name}", modules[name].kind != "linear") for r in entry["ratios"]]
        if any(r >= 1 for r in rs) or len(set(rs)) != len(rs):
            raise CtpruneError(f"{source}, {name}: ratios must be distinct and below 1, got {brief(rs)}")
    if "modules_fingerprint" in plan and plan["modules_fingerprint"] != fingerprint(plan["modules"]):
        raise CtpruneError(f"{source} was edited after `ctprune plan` wrote it (its modules no longer "
                           "match its fingerprint); make a new plan from the configuration file")
    return plan


def variant_ids(plan: dict[str, Any]) -> list[tuple[str, float]]:
    return [(name, r) for name, e in plan["modules"].items() for r in e["ratios"]]


def variant_key(module: str, ratio: float) -> str:
    return f"{module}@{ratio:g}"
