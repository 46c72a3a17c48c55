"""The block bank: a folder with ``index.json`` and one safetensors file per block variant.

A variant is a pruned copy of one prunable module at one keep ratio. The index records, per
variant, its module, kind, ratio, shape (kept heads/neurons or non-zero weights), what was
removed, and provenance (pruned or tuned, criterion, epochs, block loss).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ctprune.errors import CtpruneError
from ctprune.fileio import atomic_write, read_json, write_json
from ctprune.model.transformer import Attention, FeedForward, Seq2SeqTransformer
from ctprune.pruning.configs import Configuration, variant_key
from ctprune.pruning.surgery import replace_module

INDEX_FILE = "index.json"
BANK_FORMAT = "ctprune-bank/1"


def empty_index(model_fp: str, plan_fp: str) -> dict[str, Any]:
    return {"format": BANK_FORMAT, "model_fingerprint": model_fp, "plan_fingerprint": plan_fp,
            "variants": {}}


def variant_file(key: str) -> str:
    return "variants/" + key.replace("@", "__") + ".safetensors"


def save_variant(bank: Path, index: dict[str, Any], key: str, module: nn.Module,
                 entry: dict[str, Any]) -> None:
    """Write one variant's weights, then its index entry (both atomically)."""
    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    path = Path(bank) / variant_file(key)
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))
    index["variants"][key] = {**entry, "file": variant_file(key)}
    write_json(Path(bank) / INDEX_FILE, index)


def load_index(bank: Path) -> dict[str, Any]:
    bank = Path(bank)
    if not (bank / INDEX_FILE).is_file():
        raise CtpruneError(f"{bank} is not a block bank (no {INDEX_FILE}); make one with `ctprune prune`")
    index = read_json(bank / INDEX_FILE, "bank index")
    if not isinstance(index, dict) or index.get("format") != BANK_FORMAT:
        raise CtpruneError(f"{bank / INDEX_FILE} is not a ctprune bank index")
    return index


def check_bank_model(index: dict[str, Any], model_fp: str, bank: Path) -> None:
    if index["model_fingerprint"] != model_fp:
        raise CtpruneError(f"bank {bank} was pruned from another model (fingerprint "
                           f"{index['model_fingerprint']}, this model is {model_fp})")


def build_variant(origin_module: nn.Module, entry: dict[str, Any]) -> nn.Module:
    """An empty module of the variant's shape (weights are loaded afterwards)."""
    kind = entry["kind"]
    if kind == "attention":
        assert isinstance(origin_module, Attention)
        return Attention(origin_module.q_proj.in_features, len(entry["kept"]), origin_module.head_dim,
                         origin_module.dropout)
    if kind == "ffn":
        assert isinstance(origin_module, FeedForward)
        return FeedForward(origin_module.linear1.in_features, len(entry["kept"]),
                           origin_module.dropout.p)
    new = copy.deepcopy(origin_module)
    new.register_buffer("weight_mask", torch.ones_like(new.weight))
    return new


def load_variant(bank: Path, index: dict[str, Any], key: str, origin_module: nn.Module) -> nn.Module:
    entry = index["variants"][key]
    module = build_variant(origin_module, entry)
    module.load_state_dict(load_file(str(Path(bank) / entry["file"])))
    return module


def compose(origin: Seq2SeqTransformer, bank: Path, conf: Configuration,
            index: dict[str, Any] | None = None) -> Seq2SeqTransformer:
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
            replace_module(model, name, load_variant(bank, index, key, origin.get_submodule(name)))
    return model
