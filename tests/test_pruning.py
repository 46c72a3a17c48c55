"""Pruning is exact: removing heads/neurons equals zeroing them; banks and compose round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ctprune.arch import arch_of
from ctprune.errors import CtpruneError
from ctprune.model.checkpoint import load_model_folder, save_model_folder
from ctprune.pruning import importance
from ctprune.pruning.bank import compose, load_index
from ctprune.pruning.configs import default_configurations, prunable_modules
from ctprune.pruning.surgery import cut_heads, cut_neurons, l1_mask, mask_linear, n_keep, replace_module
from ctprune.stages.compose import ComposeArgs, compose_to_folder
from ctprune.stages.configs import ConfigsArgs, PlanArgs, write_configs, write_plan
from ctprune.stages.prune import PruneArgs, prune

from .conftest import random_batch, run_cli


@torch.no_grad()
def test_removed_heads_equal_zeroed_heads(tiny_model) -> None:  # type: ignore[no-untyped-def]
    src, tgt = random_batch()
    name, keep = "decoder.layers.1.cross_attn", torch.tensor([0, 2])
    zeroed = type(tiny_model)(tiny_model.cfg).eval()
    zeroed.load_state_dict(tiny_model.state_dict())
    out = zeroed.get_submodule(name).out_proj
    hd = tiny_model.cfg.head_dim
    for h in (1, 3):  # removed heads contribute nothing
        out.weight[:, h * hd:(h + 1) * hd] = 0
    cut = type(tiny_model)(tiny_model.cfg).eval()
    cut.load_state_dict(tiny_model.state_dict())
    replace_module(cut, name, cut_heads(cut.get_submodule(name), keep))
    assert cut.cfg.decoder_cross_heads == [4, 2]
    assert cut.get_submodule(name).q_proj.weight.shape == (2 * hd, tiny_model.cfg.d_model)
    torch.testing.assert_close(cut(src, tgt), zeroed(src, tgt), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_removed_neurons_equal_zeroed_neurons(tiny_model) -> None:  # type: ignore[no-untyped-def]
    src, tgt = random_batch()
    name = "encoder.layers.0.ffn"
    keep = torch.arange(0, 48, 3)
    zeroed = type(tiny_model)(tiny_model.cfg).eval()
    zeroed.load_state_dict(tiny_model.state_dict())
    drop = torch.tensor(sorted(set(range(48)) - set(keep.tolist())))
    zeroed.get_submodule(name).linear2.weight[:, drop] = 0
    cut = type(tiny_model)(tiny_model.cfg).eval()
    cut.load_state_dict(tiny_model.state_dict())
    replace_module(cut, name, cut_neurons(cut.get_submodule(name), keep))
    assert cut.cfg.encoder_ffn == [16, 48]
    torch.testing.assert_close(cut(src, tgt), zeroed(src, tgt), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_keeping_everything_is_the_identity(tiny_model) -> None:  # type: ignore[no-untyped-def]
    src, tgt = random_batch()
    before = tiny_model(src, tgt)
    model = type(tiny_model)(tiny_model.cfg).eval()
    model.load_state_dict(tiny_model.state_dict())
    replace_module(model, "encoder.layers.1.self_attn",
                   cut_heads(model.encoder.layers[1].self_attn, torch.arange(4)))
    replace_module(model, "decoder.layers.0.ffn", cut_neurons(model.decoder.layers[0].ffn, torch.arange(48)))
    torch.testing.assert_close(model(src, tgt), before, atol=0, rtol=0)


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.73, 1.0])
def test_unstructured_mask_has_exactly_the_requested_sparsity(tiny_model, ratio: float) -> None:  # type: ignore[no-untyped-def]
    w = tiny_model.encoder.layers[0].ffn.linear1.weight
    mask = l1_mask(w, ratio)
    assert int(mask.sum()) == n_keep(ratio, w.numel()) == round(ratio * w.numel())
    kept_min = w.abs()[mask.bool()].min()
    assert bool((w.abs()[~mask.bool()] <= kept_min).all())  # the largest magnitudes are kept
    masked = mask_linear(tiny_model.encoder.layers[0].ffn.linear1, mask)
    assert int((masked.weight != 0).sum()) == int(mask.sum())


def test_head_count_rounds_and_keeps_at_least_one() -> None:
    assert [n_keep(r, 8) for r in (0.01, 0.2, 0.25, 0.5, 0.75, 1.0)] == [1, 2, 2, 4, 6, 8]


def test_importance_criteria_give_one_score_per_head_or_neuron(tiny_model) -> None:  # type: ignore[no-untyped-def]
    attn, ffn = tiny_model.encoder.layers[0].self_attn, tiny_model.encoder.layers[0].ffn
    assert importance.head_original(attn).shape == (4,)
    assert importance.head_l1(attn).shape == (4,)
    assert importance.neuron_l1(ffn).shape == (48,)
    from ctprune.data.batching import Batch
    src, tgt = random_batch()
    stats = importance.activation_stats(arch_of(tiny_model), tiny_model, [Batch(src, tgt, tgt, torch.arange(3))])
    assert stats["decoder.layers.1.cross_attn"].shape == (4,) and stats["encoder.layers.1.ffn"].shape == (48,)
    assert bool((stats["encoder.layers.0.self_attn"] > 0).all())


@pytest.fixture(scope="module")
def pipeline(model_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("prune")
    confs = [
        {"encoder.layers.0.self_attn": 0.5, "decoder.layers.1.ffn": 0.25,
         "decoder.layers.0.ffn.linear1": 0.2},
        {"encoder.layers.0.self_attn": 0.25, "decoder.layers.1.ffn": 0.25,
         "decoder.layers.1.cross_attn": 0.75, "encoder.layers.1.self_attn.q_proj": 0.5},
        {"encoder.layers.0.self_attn": 1.0},
    ]
    (d / "conf.json").write_text(json.dumps(confs))
    write_plan(PlanArgs(configurations=d / "conf.json", model=model_folder, output=d / "plan.json"))
    prune(PruneArgs(model=model_folder, output=d / "bank", plan=d / "plan.json"))
    return {"dir": d, "conf": d / "conf.json", "plan": d / "plan.json", "bank": d / "bank"}


def test_plan_has_distinct_ratios_below_one(pipeline: dict[str, Path]) -> None:
    plan = json.loads(pipeline["plan"].read_text())
    assert plan["modules"]["encoder.layers.0.self_attn"] == {"kind": "attention", "ratios": [0.25, 0.5]}
    assert plan["modules"]["decoder.layers.1.ffn"]["ratios"] == [0.25]
    assert len(plan["model_fingerprint"]) == 16 and len(plan["configurations_fingerprint"]) == 16
    index = load_index(pipeline["bank"])
    assert len(index["variants"]) == 6
    v = index["variants"]["encoder.layers.0.self_attn@0.5"]
    assert v["size"] == 2 and len(v["kept"]) + len(v["removed"]) == 4
    assert v["provenance"]["stage"] == "pruned"
    assert index["variants"]["decoder.layers.0.ffn.linear1@0.2"]["sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_compose_save_load_gives_identical_outputs(pipeline: dict[str, Path], model_folder: Path,
                                                   tmp_path: Path) -> None:
    out = compose_to_folder(ComposeArgs(model=model_folder, bank=pipeline["bank"], configurations=pipeline["conf"], n=1,
                                        output=tmp_path / "c1"))
    model, _, hp = load_model_folder(out)
    assert model.cfg.encoder_heads == [1, 4] and model.cfg.decoder_cross_heads == [4, 3]
    assert model.cfg.decoder_ffn == [48, 12]
    assert model.cfg.sparse_linears == ["encoder.layers.1.self_attn.q_proj"]
    q = model.encoder.layers[1].self_attn.q_proj.weight
    assert int((q != 0).sum()) == q.numel() // 2
    origin, _, _ = load_model_folder(model_folder)
    direct = compose(origin, pipeline["bank"], hp["configuration"])
    assert not any(m.training for m in direct.modules())  # the origin's mode, variants included
    src, tgt = random_batch(vocab=origin.cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(src, tgt), direct(src, tgt), atol=0, rtol=0)
    params = sum(p.numel() for p in model.parameters())
    assert params < sum(p.numel() for p in origin.parameters())


def test_configuration_of_ratio_one_composes_the_origin(pipeline: dict[str, Path], model_folder: Path,
                                                        tmp_path: Path) -> None:
    out = compose_to_folder(ComposeArgs(model=model_folder, bank=pipeline["bank"], configurations=pipeline["conf"], n=2,
                                        output=tmp_path / "c2"))
    a, _, _ = load_model_folder(out)
    b, _, _ = load_model_folder(model_folder)
    src, tgt = random_batch(vocab=a.cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(a(src, tgt), b(src, tgt), atol=0, rtol=0)


def test_default_configurations_follow_the_template(model_folder: Path, tmp_path: Path) -> None:
    confs = write_configs(ConfigsArgs(model=model_folder, n=2, output=tmp_path / "c.json", attention=[0.5, 0.25],
                                      linear=[0.2, 0.5]))
    assert json.loads((tmp_path / "c.json").read_text()) == confs
    assert confs[1]["encoder.layers.0.self_attn"] == 0.25 and confs[0]["decoder.layers.1.ffn.linear2"] == 0.2
    assert "encoder.layers.0.ffn" not in confs[0]
    origin, _, _ = load_model_folder(model_folder)
    structured = default_configurations(prunable_modules(origin), 1, None, None, [0.5])
    assert structured[0]["decoder.layers.0.ffn"] == 0.5 and "decoder.layers.0.ffn.linear1" not in structured[0]


@pytest.mark.parametrize("conf, message", [
    ([{"encoder.layers.0.self_atn": 0.5}], "did you mean 'encoder.layers.0.self_attn'"),
    ([{"encoder.layers.0.self_attn": 1.5}], "keep ratio must be in [0, 1] (0: the block removed), got 1.5"),
    ([{"encoder.layers.0.ffn.linear1": 0}], "keep ratio of a Linear must be in (0, 1]"),
    ([{"encoder.layers.0.self_attn": "half"}], "must be a number"),
    ([], "non-empty JSON list"),
    ([{}], "non-empty object"),
    ([{"encoder.layers.0.ffn": 0.5, "encoder.layers.0.ffn.linear1": 0.5}], "not both"),
])
def test_bad_configurations_are_refused(conf: object, message: str, model_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps(conf))
    with pytest.raises(CtpruneError) as e:
        write_plan(PlanArgs(configurations=tmp_path / "c.json", model=model_folder, output=tmp_path / "plan.json"))
    assert message in str(e.value)
    assert not (tmp_path / "plan.json").exists()


def test_not_json_and_mismatches_are_refused(pipeline: dict[str, Path], model_folder: Path,
                                             tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(CtpruneError, match="is not valid JSON"):
        write_plan(PlanArgs(configurations=tmp_path / "c.json", model=model_folder, output=tmp_path / "p.json"))
    # A different model: same architecture, other weights.
    other, tok, _ = load_model_folder(model_folder)
    with torch.no_grad():
        other.generator.bias.add_(1.0)
    save_model_folder(tmp_path / "other", other, tok, {})
    with pytest.raises(CtpruneError, match="plan .* was made for another model"):
        prune(PruneArgs(model=tmp_path / "other", output=tmp_path / "bank", plan=pipeline["plan"]))
    assert not (tmp_path / "bank").exists()
    with pytest.raises(CtpruneError, match="was pruned from another model"):
        compose_to_folder(ComposeArgs(model=tmp_path / "other", bank=pipeline["bank"], configurations=pipeline["conf"],
                                      n=0, output=tmp_path / "x"))
    (tmp_path / "c2.json").write_text(json.dumps([{"encoder.layers.1.self_attn": 0.5}]))
    with pytest.raises(CtpruneError, match="has no variant encoder.layers.1.self_attn@0.5"):
        compose_to_folder(ComposeArgs(model=model_folder, bank=pipeline["bank"], configurations=tmp_path / "c2.json",
                                      n=0, output=tmp_path / "x"))
    with pytest.raises(CtpruneError, match="out of range"):
        compose_to_folder(ComposeArgs(model=model_folder, bank=pipeline["bank"], configurations=pipeline["conf"], n=7,
                                      output=tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_prune_cli_ratio_and_criteria(model_folder: Path, tmp_path: Path) -> None:
    for crit in ("original", "l1"):
        r = run_cli("prune", str(model_folder), "--ratio", "0.5", "--criterion", crit, "-o", str(tmp_path / crit))
        assert r.returncode == 0, r.stderr
    a, b = load_index(tmp_path / "original"), load_index(tmp_path / "l1")
    assert len(a["variants"]) == len(b["variants"]) == len(prunable_modules(load_model_folder(model_folder)[0]))
    assert a["variants"]["encoder.layers.0.self_attn@0.5"]["size"] == 2
    r = run_cli("prune", str(model_folder), "--ratio", "0.5", "-o", str(tmp_path / "original"))
    assert r.returncode == 2 and "already exists" in r.stderr
    r = run_cli("inspect", str(model_folder))
    assert r.returncode == 0 and "decoder.layers.1.cross_attn" in r.stdout and "4 heads" in r.stdout


# --- keep 0: the block removed altogether ------------------------------------------------------

class _Zero(torch.nn.Module):
    """A block whose output is zero, whatever it is given: what a removed block must equal."""

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return torch.zeros_like(x)


@torch.no_grad()
def test_a_removed_block_round_trips_and_equals_a_zero_block(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from ctprune.data.tokenizer import Tokenizer
    from ctprune.model.decode import greedy
    from ctprune.model.flops import forward_flops, module_flops, parameter_counts

    src, tgt = random_batch()
    removed = ("encoder.layers.0.self_attn", "decoder.layers.1.cross_attn", "decoder.layers.0.ffn")
    pruned = type(tiny_model)(tiny_model.cfg).eval()
    pruned.load_state_dict(tiny_model.state_dict())
    zero = type(tiny_model)(tiny_model.cfg).eval()
    zero.load_state_dict(tiny_model.state_dict())
    none = torch.zeros(0, dtype=torch.long)
    for name in removed:
        block = pruned.get_submodule(name)
        replace_module(pruned, name, cut_neurons(block, none) if name.endswith("ffn") else cut_heads(block, none))
        parent, _, attr = name.rpartition(".")
        setattr(zero.get_submodule(parent), attr, _Zero())
    cfg = pruned.cfg
    assert (cfg.encoder_heads, cfg.decoder_cross_heads, cfg.decoder_ffn) == ([0, 4], [4, 0], [0, 48])
    torch.testing.assert_close(pruned(src, tgt), zero(src, tgt))
    # FLOPs and parameters of a removed block are 0
    for name in removed:
        assert module_flops(name, pruned.get_submodule(name), 7, 5) == 0
    assert forward_flops(cfg, 7, 5) == forward_flops(tiny_model.cfg, 7, 5) - sum(
        module_flops(n, tiny_model.get_submodule(n), 7, 5) for n in removed)
    assert parameter_counts(pruned)[1] == parameter_counts(tiny_model)[1] - sum(
        sum(int((p != 0).sum()) for p in tiny_model.get_submodule(n).parameters()) for n in removed)
    # config.json + safetensors rebuild it; decoding with the cache runs through it
    words = "der die das mann frau hund katze sieht".split()
    tok = Tokenizer.train([" ".join(words[(i + j) % 8] for j in range(5)) for i in range(100)], 40)
    save_model_folder(tmp_path / "m", pruned, tok, {"stage": "test"})
    loaded, _, _ = load_model_folder(tmp_path / "m")
    assert loaded.cfg.encoder_heads == [0, 4] and loaded.cfg.decoder_ffn == [0, 48]
    torch.testing.assert_close(loaded.eval()(src, tgt), pruned(src, tgt))
    assert greedy(loaded, src, 4) == greedy(zero, src, 4)


def test_keep_0_is_for_blocks_only(model_folder: Path, tmp_path: Path) -> None:
    assert n_keep(0, 4) == 0 and n_keep(0.125, 4) == 1
    with pytest.raises(CtpruneError, match="--ratio: keep ratio of a Linear must be in"):
        prune(PruneArgs(model=model_folder, output=tmp_path / "b", ratio=0))
    index = prune(PruneArgs(model=model_folder, output=tmp_path / "g", grid=[0, 0.125], kinds=("ffn", "linear")))
    assert "encoder.layers.0.ffn@0" in index["variants"] and "encoder.layers.0.ffn.linear1@0" not in index["variants"]
    assert index["variants"]["encoder.layers.0.ffn@0"]["kept"] == []
    origin, _, _ = load_model_folder(model_folder)
    model = compose(origin, tmp_path / "g", {"encoder.layers.0.ffn": 0.0})
    assert model.cfg.encoder_ffn == [0, 48]
