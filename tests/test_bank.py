"""The bank as the one writer of its index, shard merging, scores, and masks as a parametrization."""

from __future__ import annotations

import ast
import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, load_model, save_model

from ctprune.arch import arch_of
from ctprune.model.weights import enforce_masks, plain_state_dict, save_weights
from ctprune.pruning.bank import INDEX_FILE, Bank, load_index
from ctprune.pruning.block_history import write_block_history
from ctprune.pruning.surgery import l1_mask, mask_linear
from ctprune.stages.prune import make_variant
from ctprune.training.history import read_history

PACKAGE = Path(__file__).resolve().parents[1] / "ctprune"
WRITERS = {"write_json", "write_json_strict", "write_text", "write_bytes", "atomic_write", "open", "save_file",
           "replace", "rename", "copyfile", "dump"}
VARIANTS = {"encoder.layers.0.self_attn@0.5": ("attention", 0.5), "decoder.layers.1.ffn@0.25": ("ffn", 0.25),
            "decoder.layers.0.ffn.linear1@0.2": ("linear", 0.2), "encoder.layers.1.self_attn@0.25": ("attention", 0.25)}


def index_writes(source: str) -> list[str]:
    """The calls in ``source`` that write a file whose name is a bank index (``INDEX_FILE``,
    ``OUTPUT_INDEX``, or a literal ``...index.json``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name not in WRITERS:
            continue
        args = " ".join(ast.get_source_segment(source, a) or "" for a in [*node.args, *node.keywords])
        if "INDEX" in args or "index.json" in args:
            found.append(ast.get_source_segment(source, node) or name)
    return found


def test_no_module_but_the_bank_writes_an_index() -> None:
    # the detector finds the writes the stages made before the Bank took them over
    assert index_writes("write_json(tmp / INDEX_FILE, index)\nwrite_json(f / 'output_index.json', index)\n"
                        "write_json(bank / 'index.json', index)") != []
    assert len(index_writes("write_json(tmp / INDEX_FILE, index)\nwrite_json(f / 'output_index.json', i)")) == 2
    writes = {str(p.relative_to(PACKAGE)): index_writes(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}
    assert writes.pop("pruning/bank.py")  # the writer itself is found
    assert {p: w for p, w in writes.items() if w} == {}
    # nor does block tuning or training re-apply a mask by hand: the parametrization holds it
    for path in ("stages/tune_blocks.py", "stages/finetune.py", "training/loop.py"):
        assert "weight_mask" not in (PACKAGE / path).read_text() and "apply_masks" not in (PACKAGE / path).read_text()


def _bank(path: Path, origin: torch.nn.Module, keys: list[str], seconds: float | None = None) -> Bank:
    bank = Bank.create(path, "model-fp", "plan-fp", criterion="original")
    for key in keys:
        name = key.partition("@")[0]
        kind, ratio = VARIANTS[key]
        variant, entry = make_variant(arch_of(origin), origin, name, kind, ratio, "original", {})
        bank.add(key, variant, entry)
    if seconds is not None:
        bank.set_prune_seconds(seconds)
    bank.write()
    return bank


def _tuned_shard(path: Path, origin: torch.nn.Module, keys: list[str], tokens: int) -> Bank:
    """A shard as tune-blocks leaves it: variants, their history, the tuning's cost."""
    shard = _bank(path, origin, keys)
    shard.set_tuning(Path("pruned"), {
        "epochs_done": 2, "wall_time_s": 1.5, "train_tokens": tokens, "lr": 1e-3, "variants": len(keys),
        "corpus": "synthetic", "bf16": False, "train_flops": 10 * tokens, "teacher_flops": 4 * tokens,
        "variant_flops": {k: 6 * tokens // len(keys) for k in keys}, "achieved_gflops": 0.0})
    shard.write()
    write_block_history(path / "history.csv", [
        {"epoch": e, "variant": k, "train_loss": "" if e == 0 else "0.5", "val_loss": f"{1 / (e + 1):.6g}",
         "wall_time_s": e} for e in range(3) for k in keys])
    return shard


def test_merged_shards_equal_the_bank_written_whole(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    keys = list(VARIANTS)
    whole = _bank(tmp_path / "whole", tiny_model, keys)
    shards = [(tmp_path / f"shard-{i}", keys[i::2]) for i in range(2)]
    for i, (path, part) in enumerate(shards):
        _tuned_shard(path, tiny_model, part, tokens=100 * (i + 1))
    merged = Bank.merge(shards, tmp_path / "merged")
    again = load_index(tmp_path / "merged")
    assert again == merged.index and list(again["variants"]) == keys[0::2] + keys[1::2]
    assert {k: again["variants"][k] for k in keys} == whole.variants  # entries, files and checksums alike
    for k in keys:
        f = whole.variants[k]["file"]
        assert (tmp_path / "merged" / f).read_bytes() == (tmp_path / "whole" / f).read_bytes()
    t = again["tuning"]
    assert (t["train_tokens"], t["teacher_flops"], t["train_flops"]) == (300, 1200, 3000)
    assert (t["sessions"], t["variants"], t["wall_time_s"], sorted(t["variant_flops"])) == (2, 4, 3.0, sorted(keys))
    rows = read_history(tmp_path / "merged" / "history.csv")
    assert len(rows) == 12 and [int(r["epoch"]) for r in rows] == sorted(int(r["epoch"]) for r in rows)
    assert not any(p.exists() for p, _ in shards) and (tmp_path / "merged" / "block_loss.png").is_file()


def test_a_merge_redone_after_a_kill_counts_each_shard_once(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    keys = list(VARIANTS)
    shards = [(tmp_path / f"shard-{i}", keys[i::2]) for i in range(2)]
    for path, part in shards:
        _tuned_shard(path, tiny_model, part, tokens=100)
        shutil.copytree(path, tmp_path / f"copy-{path.name}")
    first = Bank.merge(shards, tmp_path / "merged").index
    for path, _ in shards:  # a kill after the index was written, before the shards were removed
        shutil.copytree(tmp_path / f"copy-{path.name}", path)
    assert Bank.merge(shards, tmp_path / "merged").index == first == load_index(tmp_path / "merged")
    assert first["tuning"]["sessions"] == 2 and first["tuning"]["train_tokens"] == 200
    assert len(read_history(tmp_path / "merged" / "history.csv")) == 12 and not shards[0][0].exists()


def test_pruned_shards_add_up_their_pruning_seconds(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    keys = list(VARIANTS)
    _bank(tmp_path / "bank", tiny_model, keys[:1], seconds=1.25)
    _bank(tmp_path / "more", tiny_model, keys[1:], seconds=2.5)
    merged = Bank.merge([(tmp_path / "more", keys[1:])], tmp_path / "bank")
    assert merged.prune_seconds == 3.75 and list(load_index(tmp_path / "bank")["variants"]) == keys
    assert "tuning" not in merged.index and not (tmp_path / "bank" / "history.csv").exists()


def test_scores_round_trip_and_leave_the_variants_alone(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _bank(tmp_path / "bank", tiny_model, list(VARIANTS))
    before = (tmp_path / "bank" / INDEX_FILE).read_text()
    bank = Bank.open(tmp_path / "bank")
    scores = {"format": "ctprune-scores/1", "model_fingerprint": "model-fp", "subset": {"fingerprint": "ab"},
              "variants": {k: {"kl": 0.125 * i, "loss": 1.5, "digest": f"d{i}"} for i, k in enumerate(VARIANTS)}}
    bank.set_scores(scores)
    bank.write()
    again = Bank.open(tmp_path / "bank")
    assert again.index["scores"] == scores
    assert {k: v for k, v in again.index.items() if k != "scores"} == json.loads(before)
    assert not list((tmp_path / "bank").glob(f".{INDEX_FILE}*"))  # written atomically: no temp file left


def _train(linear: torch.nn.Module, steps: int = 3) -> None:
    """Adam steps towards a random target: every weight gets a gradient."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(linear.parameters(), lr=0.1)
    x, y = torch.randn(16, 32), torch.randn(16, linear.weight.shape[0])
    for _ in range(steps):
        opt.zero_grad()
        ((linear(x) - y) ** 2).mean().backward()
        opt.step()


@pytest.mark.parametrize("enforced", [True, False])
def test_a_masked_variant_stays_masked_through_optimizer_steps(tiny_model, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                               enforced: bool) -> None:
    linear = tiny_model.encoder.layers[0].ffn.linear1
    start = mask_linear(linear, l1_mask(linear.weight, 0.3))
    variant = enforce_masks(copy.deepcopy(start)) if enforced else copy.deepcopy(start)
    _train(variant)  # no caller re-applies the mask
    removed = variant.weight_mask == 0
    assert not torch.equal(variant.weight[~removed], start.weight[~removed])  # it trained
    if not enforced:  # the control: without the parametrization a step revives removed weights
        assert bool((variant.weight[removed] != 0).any())
        return
    assert bool((variant.weight[removed] == 0).all())
    # stored as before masks were parametrizations: weight (masked), bias, weight_mask
    assert sorted(plain_state_dict(variant)) == ["bias", "weight", "weight_mask"]
    bank = Bank.create(tmp_path / "bank", "m", "p")
    bank.add("encoder.layers.0.ffn.linear1@0.3", variant, {"module": "encoder.layers.0.ffn.linear1",
                                                            "kind": "linear", "ratio": 0.3, "provenance": {}})
    other = Bank.create(tmp_path / "other", "m", "p")
    other.add("encoder.layers.0.ffn.linear1@0.3", _unparametrized(variant), {"module": "x", "kind": "linear",
                                                                            "ratio": 0.3, "provenance": {}})
    f = "variants/encoder.layers.0.ffn.linear1__0.3.safetensors"
    assert (tmp_path / "bank" / f).read_bytes() == (tmp_path / "other" / f).read_bytes()
    saved = load_file(str(tmp_path / "bank" / f))
    assert torch.equal(saved["weight"], variant.weight.detach()) and bool((saved["weight"][removed] == 0).all())


def test_a_model_is_saved_as_before_masks_were_parametrizations(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``save_weights`` stores the tensors safetensors' ``save_model`` stored of the unparametrized
    model (tied embeddings once, under the name it keeps; a masked weight under its own name beside
    its mask), byte for byte the same file each time (``save_model``'s tied-name metadata came out
    in a random order, so the same model had two fingerprints), and ``load_model`` reads it."""
    name = "encoder.layers.0.ffn.linear1"
    model = copy.deepcopy(tiny_model)
    arch = arch_of(model)
    linear = arch.block(model, name)
    arch.set_block(model, name, mask_linear(linear, l1_mask(linear.weight, 0.3)))
    save_model(model, str(tmp_path / "before.safetensors"))
    for i in range(5):
        save_weights(model, str(tmp_path / f"plain{i}.safetensors"))
    save_weights(enforce_masks(model), str(tmp_path / "enforced.safetensors"))
    before = load_file(str(tmp_path / "before.safetensors"))
    plain = load_file(str(tmp_path / "plain0.safetensors"))
    assert list(plain) == sorted(before) and all(torch.equal(plain[k], before[k]) for k in before)
    assert f"{name}.weight_mask" in plain and "src_embed.weight" not in plain  # tied: stored once
    files = {(tmp_path / f"plain{i}.safetensors").read_bytes() for i in range(5)}
    assert files == {(tmp_path / "enforced.safetensors").read_bytes()}
    fresh = copy.deepcopy(tiny_model)
    arch.set_block(fresh, name, mask_linear(arch.block(fresh, name), l1_mask(linear.weight, 0.3)))
    load_model(fresh, str(tmp_path / "plain0.safetensors"), strict=True)
    stored = plain_state_dict(model)
    assert fresh.state_dict().keys() == stored.keys()
    assert all(torch.equal(v, stored[k]) for k, v in fresh.state_dict().items())


def _header_and_data(path: Path) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's header (parsed: safetensors writes the metadata of tied names in a
    random order, ``save_model`` too) and its data bytes."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _unparametrized(linear: torch.nn.Module) -> torch.nn.Linear:
    """A plain Linear with ``linear``'s computed weight, bias and mask."""
    plain = torch.nn.Linear(linear.weight.shape[1], linear.weight.shape[0])
    with torch.no_grad():
        plain.weight.copy_(linear.weight)
        plain.bias.copy_(linear.bias)
    plain.register_buffer("weight_mask", linear.weight_mask.clone())
    return plain
