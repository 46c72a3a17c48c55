"""The one typed specification: the CLI's defaults are the spec's, its lists match the code's
registries, and a TOML table is checked by type and range with file, section and key named."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from ctprune.cli import build_parser
from ctprune.errors import CtpruneError
from ctprune.spec import (
    ARCHS,
    CRITERIA,
    EXECUTORS,
    KINDS,
    LATENCY_REPEATS,
    MAX_TOKENS,
    PRESETS,
    RECIPES,
    SCORE_BATCHES,
    DataSpec,
    ExecutionSpec,
    FinetuningSpec,
    OriginSpec,
    SearchSpec,
    TuningSpec,
    add_option,
    from_table,
    parse_target,
)


def _defaults(*argv: str) -> dict:
    return vars(build_parser().parse_args(list(argv)))


def test_cli_defaults_are_the_specs() -> None:
    train = _defaults("train", "-o", "x")
    assert (train["epochs"], train["preset"], train["corpus"]) == (OriginSpec.epochs, OriginSpec.preset,
                                                                   DataSpec.corpus)
    tune = _defaults("tune-blocks", "m", "--bank", "b", "-o", "x")
    assert (tune["epochs"], tune["lr"], tune["patience"]) == (TuningSpec.epochs, TuningSpec.lr, TuningSpec.patience)
    assert tuple(_defaults("prune", "m", "--grid", "0.5", "-o", "x")["kinds"]) == SearchSpec.kinds
    assert _defaults("prune", "m", "--grid", "0.5", "--kinds", "ffn", "linear", "-o", "x")["kinds"] == ["ffn", "linear"]
    ft = _defaults("finetune", "m", "--bank", "b", "-c", "c", "-n", "0", "-o", "x")
    assert (ft["epochs"], ft["lr"], ft["target_bleu"], ft["budget_epochs"]) == (
        FinetuningSpec.epochs, FinetuningSpec.lr, FinetuningSpec.target_bleu, FinetuningSpec.budget_epochs)
    assert _defaults("evaluate", "m")["device"] == ExecutionSpec.device
    run = _defaults("run", "e.toml")  # None: the experiment file's [execution], else the spec's
    assert all(run[k] is None for k in ("executor", "workers", "address", "device", "shards"))
    assert train["arch"] == OriginSpec.arch
    score = _defaults("score", "m", "--bank", "b")
    assert (score["batches"], score["max_tokens"], score["latency_repeats"]) == (SCORE_BATCHES, MAX_TOKENS,
                                                                                 LATENCY_REPEATS)
    assert (train["recipe_name"], ft["recipe_name"]) == (RECIPES[0], "finetune")


def test_spec_lists_match_the_code() -> None:
    from ctprune.arch import _REGISTRY as archs
    from ctprune.model.transformer import PRESETS as presets
    from ctprune.pruning.configs import KINDS as kinds
    from ctprune.run.executors import EXECUTORS as executors

    assert set(EXECUTORS) == set(executors) and set(PRESETS) == set(presets) and set(KINDS) == set(kinds)
    assert set(ARCHS) == set(archs)
    from ctprune.pruning.importance import HEAD_CRITERIA
    from ctprune.training.loop import Recipe, preset_recipe

    assert CRITERIA == HEAD_CRITERIA
    assert all(isinstance(preset_recipe("seed", name), Recipe) for name in RECIPES)
    assert preset_recipe("seed", "finetune").max_tokens == Recipe().max_tokens == MAX_TOKENS


@pytest.mark.parametrize("cls, table, message", [
    (TuningSpec, {"epochs": 1, "rate": 2}, "unknown key(s) ['rate'] in [tuning]"),
    (TuningSpec, {"epochs": "two"}, "tuning.epochs must be int"),
    (TuningSpec, {"epochs": True}, "tuning.epochs must be int"),
    (TuningSpec, {"lr": -1.0}, "tuning.lr must be a positive number"),
    (TuningSpec, {"patience": -1}, "tuning.patience must be at least 0"),
    (FinetuningSpec, {"epochs": 2, "budget_epochs": 3}, "budget_epochs must be in [1, finetuning.epochs]"),
    (FinetuningSpec, {"target_bleu": "best"}, "finetuning.target_bleu must be a number"),
    (SearchSpec, {"kinds": ["attention", "mlp"], "flops": 0.5}, "search.kinds must be one of"),
    (SearchSpec, {"grid": [1.5], "flops": 0.5}, "keep ratio must be in (0, 1]"),
    (ExecutionSpec, {"workers": 0}, "execution.workers must be at least 1"),
    (ExecutionSpec, {"shards": 0}, "execution.shards must be at least 1"),
    (OriginSpec, {"arch": "bart"}, "origin.arch must be one of"),
    (ExecutionSpec, {"device": "cuda:x"}, "execution.device must be auto, cpu, cuda or cuda:N"),
    (DataSpec, {"corpus": "wmt"}, "data.corpus: unknown corpus 'wmt'"),
])
def test_tables_are_checked_with_file_section_and_key(cls: type, table: dict, message: str) -> None:
    with pytest.raises(CtpruneError, match=r"^exp\.toml: .*") as e:
        from_table(cls, table, "exp.toml", cls.__name__.removesuffix("Spec").lower())
    assert message in str(e.value)


def test_tables_convert_and_keep_defaults() -> None:
    s = from_table(SearchSpec, {"grid": [0.5, 1], "flops": 0.6, "k": 4}, "e.toml", "search")
    assert s.grid == (0.5, 1.0) and s.flops == "0.6" and s.k == 4 and s.budgets == (("flops", "0.6"),)
    assert s.min_distance == dataclasses.replace(SearchSpec()).min_distance
    ft = from_table(FinetuningSpec, {"target_bleu": 30}, "e.toml", "finetuning")
    assert parse_target(ft.target_bleu, "t") == 30.0 and parse_target("origin - 1.5", "t") == "origin-1.5"
    assert parse_target("none", "t") is None


def test_tuning_is_one_shard_on_one_machine_and_one_per_worker_on_a_cluster() -> None:
    assert ExecutionSpec(executor="process", workers=2).tuning_shards(2) == 1
    assert ExecutionSpec(executor="ray", workers=4, address="head:6379").tuning_shards(4) == 4
    assert ExecutionSpec(executor="process", workers=2, shards=3).tuning_shards(2) == 3


def test_add_option_takes_a_tuple_field_as_several_values_and_an_optional_as_its_type() -> None:
    ap = argparse.ArgumentParser()
    add_option(ap, SearchSpec, "grid")
    add_option(ap, SearchSpec, "kinds")
    add_option(ap, SearchSpec, "k", "-k")
    add_option(ap, ExecutionSpec, "shards")
    a = ap.parse_args(["--grid", "0.5", "0.25", "--kinds", "ffn", "-k", "3", "--shards", "2"])
    assert (a.grid, a.kinds, a.k, a.shards) == ([0.5, 0.25], ["ffn"], 3, 2)
    d = ap.parse_args([])
    assert (tuple(d.grid), tuple(d.kinds), d.k, d.shards) == (SearchSpec.grid, SearchSpec.kinds, SearchSpec.k, None)
    with pytest.raises(SystemExit):
        ap.parse_args(["--kinds", "mlp"])


@pytest.mark.parametrize("build, message", [
    (lambda: SearchSpec(k=0), "search.k must be at least 1, got 0"),
    (lambda: dataclasses.replace(SearchSpec(), k=0), "search.k must be at least 1, got 0"),
    (lambda: SearchSpec(kinds=("mlp",)), "search.kinds must be one of attention, ffn, linear, got 'mlp'"),
    (lambda: SearchSpec(grid=(1.5,)), "search.grid: keep ratio must be in (0, 1], got 1.5"),
    (lambda: SearchSpec(flops="lots"), "[search]: --flops 'lots': give a fraction of the origin"),
    (lambda: TuningSpec(lr=-1.0), "tuning.lr must be a positive number, got -1.0"),
    (lambda: TuningSpec(epochs="2"), "tuning.epochs must be int, got '2'"),
    (lambda: OriginSpec(preset="huge"), "origin.preset must be one of seed, tiny, got 'huge'"),
    (lambda: FinetuningSpec(epochs=2, budget_epochs=3), "finetuning.budget_epochs must be in [1, finetuning.epochs]"),
    (lambda: ExecutionSpec(workers=0), "execution.workers must be at least 1, got 0"),
    (lambda: ExecutionSpec(address="head:6379"), "execution.address is for executor = \"ray\", not 'local'"),
    (lambda: DataSpec(corpus="wmt"), "data.corpus: unknown corpus 'wmt'"),
])
def test_specs_built_in_code_check_themselves(build: object, message: str) -> None:
    with pytest.raises(CtpruneError) as e:
        build()  # type: ignore[operator]
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_specs_built_in_code_are_converted_as_the_experiment_file_is() -> None:
    from ctprune.run.experiment import SECTIONS

    assert all(cls.__name__.removesuffix("Spec").lower() == name for name, cls in SECTIONS.items())  # keys named so
    s = SearchSpec(grid=[0.5, 1], flops=(0.75, "50%"), kinds=["ffn"])
    assert s == from_table(SearchSpec, {"grid": [0.5, 1], "flops": [0.75, "50%"], "kinds": ["ffn"]}, "e.toml", "search")
    assert (s.grid, s.flops, s.kinds) == ((0.5, 1.0), ("0.75", "50%"), ("ffn",))
    assert SearchSpec() == dataclasses.replace(SearchSpec()) and SearchSpec().budgets == ()
