"""The block bank: a folder with ``index.json`` and one safetensors file per block variant.

A variant is a pruned copy of one prunable module at one keep ratio. The index records, per
variant, its module, kind, ratio, shape (kept heads/neurons or non-zero weights), what was
removed, and provenance (pruned or tuned, criterion, epochs, block loss); beside the variants,
the bank's cost (``prune_seconds``, ``tuning``) and its variants' ``scores``.

``Bank`` is the one writer of ``index.json``: every stage adds variants, provenance, scores and
cost through it, and ``Bank.merge`` moves tuned or pruned shards into one bank. The functions
below it read a bank (``load_index``, ``load_variant``, ``compose``) for callers that hold an
index dict.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ctprune.arch import arch_of
from ctprune.errors import CtpruneError, first_line
from ctprune.fileio import atomic_write, brief, contained, file_record, read_json, verify_file, write_json
from ctprune.model.weights import plain_state_dict
from ctprune.pruning.block_history import plot_block_losses, write_block_history
from ctprune.pruning.configs import KINDS, Configuration, check_ratio, variant_ids, variant_key
from ctprune.pruning.surgery import mask_linear
from ctprune.training.history import read_history

INDEX_FILE = "index.json"
BANK_FORMAT = "ctprune-bank/1"
# A module name as ctprune writes it: dotted identifiers, so a variant key can never be a path.
MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
# Tuning cost that adds up over the shards of one tuning (each shard pays its own teacher pass).
_SUMMED_COST = ("train_tokens", "teacher_flops", "train_flops")


def variant_file(key: str) -> str:
    module, _, ratio = key.partition("@")
    if not MODULE_NAME.fullmatch(module) or not re.fullmatch(r"[0-9.e+-]+", ratio):
        raise CtpruneError(f"variant key {brief(key)} is not MODULE@RATIO with a dotted module name")
    return "variants/" + key.replace("@", "__") + ".safetensors"


class Bank:
    """A bank folder and its index, held in memory: ``add`` writes a variant's weights file at
    once and its entry in memory, the ``set_*`` / ``update_*`` methods change the index in memory,
    and ``write`` stores the index atomically (once for many variants). For example::

        bank = Bank.create(folder, model_fp, plan_fp, criterion="original")
        bank.add("encoder.layers.0.self_attn@0.5", variant, entry)
        bank.write()
    """

    def __init__(self, path: Path, index: dict[str, Any]) -> None:
        self.path = Path(path)
        self.index = index

    # ---- opening ---------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, model_fp: str, plan_fp: str, **fields: Any) -> Bank:
        """An empty bank at ``path`` (nothing written until ``add`` / ``write``)."""
        return cls(path, {"format": BANK_FORMAT, "model_fingerprint": model_fp, "plan_fingerprint": plan_fp,
                          "variants": {}, **fields})

    @classmethod
    def open(cls, path: Path) -> Bank:
        """The bank at ``path``, its index checked (see ``check_index``)."""
        return cls(path, load_index(path))

    @classmethod
    def open_copy(cls, path: Path, copy_file: Path, what: str) -> Bank:
        """The bank at ``path`` with the index kept in ``copy_file`` (a tuning state's copy)."""
        return cls(path, check_index(read_json(copy_file, what), path))

    @staticmethod
    def exists(path: Path) -> bool:
        return (Path(path) / INDEX_FILE).is_file()

    # ---- reading ---------------------------------------------------------------------------
    @property
    def variants(self) -> dict[str, dict[str, Any]]:
        """Variant key -> its index entry."""
        return self.index["variants"]

    @property
    def tuning(self) -> dict[str, Any]:
        """What tuning this bank's variants cost (a tuned bank only)."""
        return self.index["tuning"]

    @property
    def prune_seconds(self) -> float:
        """Seconds spent pruning this bank's variants (0 when not recorded)."""
        return float(self.index.get("prune_seconds", 0.0))

    def select(self, keys: list[str] | None) -> list[str]:
        """``keys`` (all of the bank's when None), each checked to be in the bank."""
        chosen = list(self.variants) if keys is None else list(keys)
        unknown = [k for k in chosen if k not in self.variants]
        if unknown:
            raise CtpruneError(f"bank {self.path} has no variant {unknown[0]}")
        return chosen

    def check_model(self, model_fp: str) -> None:
        check_bank_model(self.index, model_fp, self.path)

    def load_variant(self, key: str, origin: nn.Module) -> nn.Module:
        return load_variant(self.path, self.index, key, origin)

    def compose(self, origin: nn.Module, conf: Configuration) -> Any:
        return compose(origin, self.path, conf, self.index)

    # ---- writing ---------------------------------------------------------------------------
    def add(self, key: str, module: nn.Module, entry: dict[str, Any]) -> None:
        """Write variant ``key``'s weights (a parametrized module as its plain, masked state),
        then record ``entry`` with the file's size and SHA-256. The index is written by ``write``."""
        state = {k: v.detach().contiguous().clone() for k, v in plain_state_dict(module).items()}
        path = self.path / variant_file(key)
        atomic_write(path, lambda tmp: save_file(state, str(tmp)))
        self.variants[key] = {**entry, "file": variant_file(key), "checksum": file_record(path)}

    def update_provenance(self, key: str, **fields: Any) -> None:
        self.variants[key]["provenance"].update(fields)

    def set_prune_seconds(self, seconds: float) -> None:
        self.index["prune_seconds"] = round(seconds, 3)

    def set_scores(self, scores: dict[str, Any]) -> None:
        self.index["scores"] = scores

    def set_tuning(self, tuned_from: Path, tuning: dict[str, Any]) -> None:
        self.index["tuned_from"] = str(tuned_from)
        self.index["tuning"] = tuning

    def write(self) -> None:
        """Store the index as ``index.json``, atomically."""
        write_json(self.path / INDEX_FILE, self.index)

    def write_copy(self, path: Path) -> None:
        """Store the index under another name (a tuning state keeps its output's index so)."""
        write_json(path, self.index)

    # ---- merging shards --------------------------------------------------------------------
    @classmethod
    def merge(cls, shards: list[tuple[Path, list[str]]], dst: Path) -> Bank:
        """Move the variants ``keys`` of every shard bank into bank ``dst`` (made if absent), adding
        up the shards' pruning or tuning cost and history, then delete the shards. ``dst``'s index
        is written once, last, so a crash loses nothing and a re-run finishes the move."""
        dst = Path(dst)
        (dst / "variants").mkdir(parents=True, exist_ok=True)
        merged = cls.open(dst) if cls.exists(dst) else None
        rows = {(r["variant"], r["epoch"]): r for r in read_history(dst / "history.csv")}
        for src, keys in shards:
            if merged is not None and merged._holds(Path(src), keys):
                continue  # merged before a kill stopped the clean-up: never count its cost twice
            shard = cls.open(src)
            if merged is None:
                merged = cls(dst, {**{k: v for k, v in shard.index.items() if k != "tuning"}, "variants": {}})
            elif "prune_seconds" in shard.index:
                merged.set_prune_seconds(merged.index.get("prune_seconds", 0.0) + shard.index["prune_seconds"])
            merged._move_variants(shard, keys)
            if "tuning" in shard.index:
                merged.index["tuning"] = added_tuning(merged.index.get("tuning"), shard.index["tuning"])
                rows.update({(r["variant"], r["epoch"]): r for r in read_history(shard.path / "history.csv")})
        if merged is None:
            raise CtpruneError(f"nothing to merge into {dst}")
        if "tuning" in merged.index:
            merged.index["tuning"]["variants"] = len(merged.variants)
            merged._write_history(list(rows.values()))
        merged.write()
        for src, _ in shards:
            shutil.rmtree(src, ignore_errors=True)
        return merged

    def _holds(self, src: Path, keys: list[str]) -> bool:
        """Whether shard ``src``'s variants ``keys`` are here already, as the shard has them."""
        if not all(k in self.variants for k in keys):
            return False
        if not self.exists(src):
            return True
        theirs = load_index(src)["variants"]
        return all(self.variants[k]["checksum"] == theirs[k].get("checksum") for k in keys)

    def _move_variants(self, shard: Bank, keys: list[str]) -> None:
        for key in keys:
            entry = shard.variants[key]
            if (shard.path / entry["file"]).exists():  # absent only if an earlier merge moved it already
                os.replace(shard.path / entry["file"], self.path / entry["file"])
            self.variants[key] = entry

    def _write_history(self, rows: list[dict[str, Any]]) -> None:
        """One row per (variant, epoch) of this bank's variants, epochs in order (a merge redone
        after a kill sees its rows twice), and the plot of it."""
        history = sorted((r for r in rows if r["variant"] in self.variants), key=lambda r: int(r["epoch"]))
        write_block_history(self.path / "history.csv", history)
        plot_block_losses(history, self.path / "block_loss.png")


def added_tuning(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """The ``tuning`` record of a bank holding the variants of tuning ``old`` and shard ``new``:
    costs added up, epochs the longest, one more session."""
    t = {**new, "sessions": 1}
    if old:
        t.update({k: old[k] + t[k] for k in _SUMMED_COST},
                 wall_time_s=round(old["wall_time_s"] + t["wall_time_s"], 2),
                 variant_flops={**old["variant_flops"], **t["variant_flops"]},
                 epochs_done=max(old["epochs_done"], t["epochs_done"]), sessions=old["sessions"] + 1)
        t["achieved_gflops"] = round(t["train_flops"] / max(t["wall_time_s"], 1e-9) / 1e9, 2)
    return t


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
    arch = arch_of(origin)
    device = next(origin.parameters()).device  # variants load on the CPU; the model may not be
    for name, ratio in conf.items():
        if ratio < 1:
            arch.set_block(model, name, load_variant(bank, index, variant_key(name, ratio), origin).to(device))
    return model.train(origin.training)  # new variant modules would otherwise be in training mode


def missing_variants(plan: dict[str, Any], bank: Path) -> list[str]:
    """The plan's variant keys that ``bank`` does not hold (all of them when it does not exist)."""
    have = Bank.open(bank).variants if Bank.exists(bank) else {}
    return [variant_key(n, r) for n, r in variant_ids(plan) if variant_key(n, r) not in have]
