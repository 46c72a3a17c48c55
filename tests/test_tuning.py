"""Block tuning and model finetuning on the tiny model: tuned variants beat merely pruned ones."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ctprune.model.checkpoint import load_model_folder
from ctprune.pruning.bank import load_index
from ctprune.stages.configs import PlanArgs, write_plan
from ctprune.stages.finetune import FinetuneArgs, finetune, finetune_all
from ctprune.stages.prune import PruneArgs, prune
from ctprune.stages.tune_blocks import TuneArgs, tune_blocks
from ctprune.training.history import read_history
from ctprune.training.loop import Recipe

CONFS = [
    {"encoder.layers.0.self_attn": 0.5, "decoder.layers.1.cross_attn": 0.25, "encoder.layers.1.ffn": 0.25,
     "decoder.layers.0.ffn.linear1": 0.2, "decoder.layers.1.ffn.linear2": 0.5},
    {"encoder.layers.0.self_attn": 0.25, "decoder.layers.1.cross_attn": 0.25, "decoder.layers.0.ffn": 0.25,
     "encoder.layers.1.ffn.linear1": 0.2},
]


@pytest.fixture(scope="module")
def banks(trained: Path, small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The pruned and tuned banks of CONFS; tuning and finetuning read ``small_corpus`` ("data": the
    corpus and data_dir arguments)."""
    d, data = tmp_path_factory.mktemp("tune"), {"corpus": "folder:de-en", "data_dir": str(small_corpus)}
    (d / "conf.json").write_text(json.dumps(CONFS))
    write_plan(PlanArgs(configurations=d / "conf.json", model=trained, output=d / "plan.json"))
    prune(PruneArgs(model=trained, output=d / "pruned", plan=d / "plan.json"))
    tune_blocks(TuneArgs(model=trained, bank=d / "pruned", output=d / "tuned", epochs=2, **data, lr=2e-3,
                         max_tokens=1024, device="cpu"))
    return {"dir": d, "conf": d / "conf.json", "pruned": d / "pruned", "tuned": d / "tuned", "data": data}


def test_every_variant_has_a_lower_block_loss_after_tuning(banks: dict[str, Any]) -> None:
    rows = read_history(banks["tuned"] / "history.csv")
    index = load_index(banks["tuned"])
    assert len(index["variants"]) == 8
    for key, v in index["variants"].items():
        losses = {int(r["epoch"]): float(r["val_loss"]) for r in rows if r["variant"] == key}
        assert min(losses[e] for e in losses if e > 0) < losses[0], key
        assert v["provenance"]["stage"] == "tuned" and v["provenance"]["block_loss"] < v["provenance"][
            "block_loss_pruned"]
    assert index["tuning"]["train_tokens"] > 0 and index["tuning"]["wall_time_s"] > 0
    assert (banks["tuned"] / "block_loss.png").stat().st_size > 1000


def test_structure_and_masks_survive_tuning(banks: dict[str, Any]) -> None:
    pruned, tuned = load_index(banks["pruned"]), load_index(banks["tuned"])
    for key in pruned["variants"]:
        a = load_file(str(banks["pruned"] / pruned["variants"][key]["file"]))
        b = load_file(str(banks["tuned"] / tuned["variants"][key]["file"]))
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}, key
        if "weight_mask" in b:
            assert torch.equal(a["weight_mask"], b["weight_mask"])
            assert bool((b["weight"][b["weight_mask"] == 0] == 0).all())
        assert any(not torch.equal(a[k], b[k]) for k in a if k != "weight_mask"), f"{key} did not train"


def test_composed_starts_higher_than_baseline_and_finetuning_keeps_masks(
        trained: Path, banks: dict[str, Any]) -> None:
    recipe = Recipe.original(epochs=1, lr=1e-3)
    d = banks["dir"]
    for which in ("pruned", "tuned"):
        finetune(FinetuneArgs(model=trained, bank=banks[which], configurations=banks["conf"], n=0,
                              output=d / f"ft-{which}", recipe=recipe, target_bleu=None, **banks["data"],
                              device="cpu"))
    base = read_history(d / "ft-pruned/history.csv")
    comp = read_history(d / "ft-tuned/history.csv")
    assert [r["epoch"] for r in comp] == ["0", "1"]
    assert float(comp[0]["val_bleu"]) > float(base[0]["val_bleu"]), (comp[0], base[0])
    model, _, hp = load_model_folder(d / "ft-tuned/last")
    lin = model.decoder.layers[0].ffn.linear1
    assert int((lin.weight != 0).sum()) == round(0.2 * lin.weight.numel())
    # stored as before masks were parametrizations (masked weight, its mask), the optimizer state in
    # the unparametrized module order: a checkpoint written before them resumes
    for folder in ("ft-tuned", "ft-tuned/last"):
        stored = load_file(str(d / folder / "model.safetensors"))
        assert "decoder.layers.0.ffn.linear1.weight_mask" in stored and not any("parametrizations" in k for k in stored)
    state = torch.load(d / "ft-tuned/last/trainer_state.pt", weights_only=True)["optimizer"]["state"]
    assert [state[i]["exp_avg"].shape for i in sorted(state)] == [p.shape for p in model.parameters()]
    assert model.cfg.encoder_heads[0] == 2 and model.cfg.decoder_cross_heads[1] == 1
    assert model.cfg.encoder_ffn[1] == 32
    assert (d / "ft-tuned/history.png").is_file()


def test_tune_blocks_resumes(trained: Path, banks: dict[str, Any]) -> None:
    d = banks["dir"]
    only = ["encoder.layers.0.self_attn@0.5", "decoder.layers.0.ffn.linear1@0.2"]
    tune_blocks(TuneArgs(model=trained, bank=banks["pruned"], output=d / "r", epochs=1, **banks["data"], lr=2e-3,
                         max_tokens=1024, device="cpu", only=only))
    with pytest.raises(Exception, match="--resume"):
        tune_blocks(TuneArgs(model=trained, bank=banks["pruned"], output=d / "r", epochs=2, **banks["data"],
                             only=only))
    tune_blocks(TuneArgs(model=trained, bank=banks["pruned"], output=d / "r", epochs=2, **banks["data"], lr=2e-3,
                         max_tokens=1024, device="cpu", only=only, resume=True))
    rows = read_history(d / "r/history.csv")
    assert sorted({int(r["epoch"]) for r in rows}) == [0, 1, 2]
    assert len([r for r in rows if r["epoch"] == "1"]) == 2  # epoch 1 not repeated
    # the resumed run is the uninterrupted one: the optimizer state of the masked (parametrized)
    # Linear and of the heads comes back in order, the files are those of a straight run
    tune_blocks(TuneArgs(model=trained, bank=banks["pruned"], output=d / "straight", epochs=2, **banks["data"],
                         lr=2e-3, max_tokens=1024, device="cpu", only=only))
    resumed, straight = load_index(d / "r"), load_index(d / "straight")
    assert [r["val_loss"] for r in rows] == [r["val_loss"] for r in read_history(d / "straight/history.csv")]
    for key in only:
        assert resumed["variants"][key] == straight["variants"][key], key  # provenance, file and checksum
        assert (d / "r" / resumed["variants"][key]["file"]).read_bytes() == \
            (d / "straight" / straight["variants"][key]["file"]).read_bytes(), key


def test_finetune_all_resumes_and_skips_finished(trained: Path, banks: dict[str, Any]) -> None:
    d = banks["dir"]
    recipe = Recipe.original(epochs=1, lr=1e-3)
    every = FinetuneArgs(model=trained, bank=banks["tuned"], configurations=banks["conf"], all=True, output=d / "all",
                         recipe=recipe, target_bleu=None, **banks["data"], device="cpu")
    first = finetune_all(every)
    assert len(first) == 2
    stamp = (d / "all/config-0/model.safetensors").stat().st_mtime_ns
    again = finetune_all(every)
    assert (d / "all/config-0/model.safetensors").stat().st_mtime_ns == stamp
    assert [r.best_bleu for r in again] == [r.best_bleu for r in first]
    # One more epoch on an existing run resumes it instead of starting over.
    longer = dataclasses.replace(every, all=False, n=1, recipe=Recipe.original(epochs=2, lr=1e-3))
    finetune(dataclasses.replace(longer, output=d / "all/config-1", resume=True))
    resumed = read_history(d / "all/config-1/history.csv")
    assert [r["epoch"] for r in resumed] == ["0", "1", "2"]
    # ... and equals the uninterrupted run, masked Linear (encoder.layers.1.ffn.linear1) included
    finetune(dataclasses.replace(longer, output=d / "straight-1"))
    straight = read_history(d / "straight-1/history.csv")
    assert [(r["train_loss"], r["val_loss"], r["val_bleu"]) for r in resumed] == \
        [(r["train_loss"], r["val_loss"], r["val_bleu"]) for r in straight]
    for f in ("last/model.safetensors", "model.safetensors"):
        a, b = load_file(str(d / "all/config-1" / f)), load_file(str(d / "straight-1" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_tuning_counts_teacher_and_student_flops(banks: dict[str, Any]) -> None:
    t = load_index(banks["tuned"])["tuning"]
    assert set(t["variant_flops"]) == set(load_index(banks["tuned"])["variants"])
    assert t["train_flops"] == t["teacher_flops"] + sum(t["variant_flops"].values())
    assert all(f > 0 for f in t["variant_flops"].values()) and t["achieved_gflops"] > 0


def test_bf16_tuning_keeps_masks_and_lowers_block_loss(trained: Path, banks: dict[str, Any],
                                                       tmp_path: Path) -> None:
    index = tune_blocks(TuneArgs(model=trained, bank=banks["pruned"], output=tmp_path / "bf16", epochs=1,
                                 **banks["data"], lr=2e-3, max_tokens=1024, device="cpu", precision="bf16",
                                 only=["decoder.layers.0.ffn.linear1@0.2", "encoder.layers.0.self_attn@0.5"]))
    assert index["tuning"]["bf16"] is True
    for key in ("decoder.layers.0.ffn.linear1@0.2", "encoder.layers.0.self_attn@0.5"):
        prov = index["variants"][key]["provenance"]
        assert prov["stage"] == "tuned" and prov["block_loss"] < prov["block_loss_pruned"], key
    w = load_file(str(tmp_path / "bf16" / index["variants"]["decoder.layers.0.ffn.linear1@0.2"]["file"]))
    assert w["weight"].dtype == torch.float32 and bool((w["weight"][w["weight_mask"] == 0] == 0).all())


def test_a_raised_cap_continues_a_censored_finetuning_and_leaves_a_finished_one(trained: Path,
                                                                                 banks: dict[str, Any]) -> None:
    """``ctprune run``'s finetuning job with its cap raised: a side that missed its target (censored)
    trains on from its last checkpoint to the new cap, its cost counted on; a side that reached its
    target is left as it is."""
    from ctprune.run.jobs import finetune_job

    d = banks["dir"]
    common = dict(origin=str(trained), bank=str(banks["tuned"]), conf_file=str(banks["conf"]), index=0, seed=0,
                  budget_epochs=1, lr=1e-3, max_tokens=1024, bf16=False, tests=["test"], device="cpu",
                  eval_every=1.0, select="val_loss", **banks["data"])
    first = finetune_job(output=str(d / "censored"), target=100.0, epochs=1, **common)
    assert first["epochs_trained"] == 1 and first["epochs_to_target"] is None  # censored at the cap
    longer = finetune_job(output=str(d / "censored"), target=100.0, epochs=2, **common)
    assert [r["epoch"] for r in read_history(d / "censored/history.csv")] == ["0", "1", "2"]
    assert longer["epochs_trained"] == 2 and longer["epochs_to_target"] is None
    assert longer["train_flops"] == pytest.approx(2 * first["train_flops"], rel=0.05)  # counted on, not anew
    assert longer["cost_flops"] == pytest.approx(2 * first["cost_flops"], rel=0.05)  # censored: charged the cap
    assert longer["val_bleu_budget"] == first["val_bleu_budget"]  # epoch 1 is the same run's
    reached = finetune_job(output=str(d / "reached"), target=0.0, epochs=1, **common)
    stamp = (d / "reached/model.safetensors").stat().st_mtime_ns
    again = finetune_job(output=str(d / "reached"), target=0.0, epochs=2, **common)
    assert again["epochs_trained"] == reached["epochs_trained"] == 1
    assert (d / "reached/model.safetensors").stat().st_mtime_ns == stamp
