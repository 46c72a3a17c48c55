"""The block bank: a folder with ``index.json`` and one safetensors file per block variant.

A variant is a pruned copy of one prunable module at one keep ratio. The index records, per
variant, its module, kind, ratio, shape (kept heads/neurons or non-zero weights), what was
removed, and provenance (pruned or tuned, criterion, epochs, block loss).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ctprune.arch import arch_of
from ctprune.errors import CtpruneError, first_line
from ctprune.fileio import atomic_write, brief, contained, file_record, read_json, verify_file, write_json
from ctprune.pruning.configs import KINDS, Configuration, check_ratio, variant_key
from ctprune.pruning.surgery import mask_linear

INDEX_FILE = "index.json"
BANK_FORMAT = "ctprune-bank/1"
# A module name as ctprune writes it: dotted identifiers, so a variant key can never be a path.
MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


def empty_index(model_fp: str, plan_fp: str) -> dict[str, Any]:
    return {"format": BANK_FORMAT, "model_fingerprint": model_fp, "plan_fingerprint": plan_fp,
            "variants": {}}


def variant_file(key: str) -> str:
    module, _, ratio = key.partition("@")
    if not MODULE_NAME.fullmatch(module) or not re.fullmatch(r"[0-9.e+-]+", ratio):
        raise CtpruneError(f"variant key {brief(key)} is not MODULE@RATIO with a dotted module name")
    return "variants/" + key.replace("@", "__") + ".safetensors"


def save_variant(bank: Path, index: dict[str, Any], key: str, module: nn.Module,
                 entry: dict[str, Any], write_index: bool = True) -> None:
    """Write one variant's weights, then its entry in ``index`` with the file's size and SHA-256,
    and (unless the caller writes the index once after many variants) the index, atomically."""
    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    path = Path(bank) / variant_file(key)
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))
    index["variants"][key] = {**entry, "file": variant_file(key), "checksum": file_record(path)}
    if write_index:
        write_json(Path(bank) / INDEX_FILE, index)


def load_index(bank: Path) -> dict[str, Any]:
    bank = Path(bank)
    if not (bank / INDEX_FILE).is_file():
        raise CtpruneError(f"{bank} is not a block bank (no {INDEX_FILE}); make one with `ctprune prune`")
    return check_index(read_json(bank / INDEX_FILE, "bank index"), bank)


def check_index(index: Any, bank: Path) -> dict[str, Any]:
    """Schema of a bank index: format, fingerprints, and per variant a module name, a kind, a
    ratio, its key ``MODULE@RATIO`` and a file inside the bank."""
    src = Path(bank) / INDEX_FILE
    if not isinstance(index, dict) or index.get("format") != BANK_FORMAT:
        raise CtpruneError(f"{src} is not a ctprune bank index (no \"format\": \"{BANK_FORMAT}\")")
    if not isinstance(index.get("model_fingerprint"), str):
        raise CtpruneError(f"{src}: \"model_fingerprint\" is missing or not a string")
    if not isinstance(index.get("variants"), dict):
        raise CtpruneError(f"{src}: \"variants\" is missing or not an object")
    for key, e in index["variants"].items():
        where = f"{src}, variant {brief(key)}"
        if not isinstance(e, dict):
            raise CtpruneError(f"{where} must be an object")
        if not isinstance(e.get("module"), str) or not MODULE_NAME.fullmatch(e["module"]):
            raise CtpruneError(f"{where}: \"module\" must be a dotted module name, got {brief(e.get('module'))}")
        if e.get("kind") not in KINDS:
            raise CtpruneError(f"{where}: \"kind\" must be one of {', '.join(KINDS)}, got {brief(e.get('kind'))}")
        ratio = check_ratio(e.get("ratio"), where, e["kind"] != "linear")
        if key != variant_key(e["module"], ratio):
            raise CtpruneError(f"{where}: the key does not match its module and ratio "
                               f"({brief(variant_key(e['module'], ratio))})")
        if e["kind"] != "linear" and (not isinstance(e.get("kept"), list) or not e["kept"] and ratio > 0
                                      or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                 for i in e["kept"])):
            raise CtpruneError(f"{where}: \"kept\" must be a list of head/neuron indices, empty only at ratio 0")
        if not isinstance(e.get("provenance"), dict):
            raise CtpruneError(f"{where}: \"provenance\" is missing or not an object")
        contained(bank, e.get("file"), where)
    return index


def check_bank_model(index: dict[str, Any], model_fp: str, bank: Path) -> None:
    """Refuse a bank pruned from another model, or one that holds no variant (every keep ratio of
    its plan or grid was 1, or a grid of keep 0 over Linears): nothing to tune, score or compose."""
    if index["model_fingerprint"] != model_fp:
        raise CtpruneError(f"bank {bank} was pruned from another model (fingerprint "
                           f"{brief(index['model_fingerprint'])}, this model is {model_fp})")
    if not index["variants"]:
        raise CtpruneError(f"bank {bank} holds no block variants (its plan or grid prunes nothing); prune one "
                           "with keep ratios below 1, e.g. `ctprune prune MODEL --grid 0.25 0.5 0.75 -o BANK`")


def build_variant(origin: nn.Module, entry: dict[str, Any]) -> nn.Module:
    """A module of the variant's shape for model ``origin`` (its weights are loaded afterwards):
    the origin's block cut to the recorded heads/neurons, or its Linear with a mask."""
    arch, name, kind = arch_of(origin), entry["module"], entry["kind"]
    unit = arch.units(origin).get(name)
    if unit is None:
        raise CtpruneError(f"variant of {brief(name)}: the model ({arch.model_class}) has no such module; "
                           "was the bank pruned from a model of another architecture?")
    if unit.kind != kind:
        raise CtpruneError(f"variant of {brief(name)} says kind {brief(kind)}, but that module is a {unit.kind} module")
    block = arch.block(origin, name)
    if kind == "linear":
        return mask_linear(block, torch.ones_like(block.weight))
    if max(entry["kept"], default=-1) >= unit.size:  # a keep-0 variant keeps none
        raise CtpruneError(f"variant of {brief(name)} keeps index {max(entry['kept'])}, beyond the module")
    return arch.cut(block, torch.tensor(entry["kept"], dtype=torch.long))


def load_variant(bank: Path, index: dict[str, Any], key: str, origin: nn.Module) -> nn.Module:
    """Variant ``key`` of model ``origin``'s module, with its weights, after checking the file
    against the index (inside the bank; size and SHA-256 as recorded; every tensor present with
    its shape)."""
    entry = index["variants"][key]
    module = build_variant(origin, entry)
    path = contained(bank, entry["file"], f"bank {bank}, variant {brief(key)}")
    if path.exists() and not path.is_file():  # a FIFO would block the read for ever
        raise CtpruneError(f"variant file {path} is not a plain file")
    if "checksum" in entry:  # banks written before checksums have none
        verify_file(path, entry["checksum"], f"variant file of {brief(key)}", str(Path(bank) / INDEX_FILE))
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        raise CtpruneError(f"variant file {path} is unreadable: {first_line(e)}") from None
    for name, t in state.items():  # load_state_dict would cast integers silently and keep NaN
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise CtpruneError(f"variant file {path}: tensor {brief(name)} is {t.dtype} with "
                               f"{'NaN or infinite values' if t.is_floating_point() else 'integer values'}; "
                               "a variant holds finite floating-point weights")
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise CtpruneError(f"variant file {path} does not fit variant {brief(key)}: {detail}") from None
    return module


def compose(origin: nn.Module, bank: Path, conf: Configuration, index: dict[str, Any] | None = None) -> Any:
    """A new model: ``origin`` with each module of ``conf`` (ratio < 1) replaced by its variant."""
    index = index or load_index(bank)
    model = copy.deepcopy(origin)
    missing = [variant_key(n, r) for n, r in conf.items()
               if r < 1 and variant_key(n, r) not in index["variants"]]
    if missing:
        raise CtpruneError(f"bank {bank} has no variant {missing[0]}"
                           f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                           "was it pruned from a plan of this configuration file?")
    for name, ratio in conf.items():
        if ratio < 1:
            key = variant_key(name, ratio)
            device = next(origin.parameters()).device  # variants load on the CPU; the model may not be
            arch_of(model).set_block(model, name, load_variant(bank, index, key, origin).to(device))
    return model.train(origin.training)  # new variant modules would otherwise be in training mode
