"""`ctprune run` end to end on a tiny experiment: files, report numbers, and resume after a kill."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
import torch

import ctprune.run.executors as executors
import ctprune.run.graph as run_stage
import ctprune.run.jobs as jobs
from ctprune.errors import CtpruneError
from ctprune.pruning.configs import variant_key
from ctprune.run.experiment import check_configurations_early, load_experiment
from ctprune.run.protocol import BankCost, Configuration, flops_at, saving, saving_curve, time_to_target
from ctprune.run.report import METHODS, Doc, FrontierRow, _clip_untuned, frontier, numeric_columns, pareto
from ctprune.run.summary import REQUIRED, Summary
from ctprune.scoring import spearman
from ctprune.training.history import read_history

from .conftest import SMALL, run_cli, write_corpus

EXPERIMENT = """
seeds = [0, 1]
[data]
corpus = "folder:de-en"
data_dir = "{data}"
[origin]
model = "{model}"
[configurations]
attention = [0.5, 0.25]
linear = [0.2, 0.5]
[tuning]
epochs = 1
lr = 2e-3
[finetuning]
epochs = 1
lr = 1e-3
target_bleu = "origin-20"
"""


class _Killed(Exception):
    pass


def _protocol_rows(run_dir: Path, run: dict, confs: list[dict[str, float]], target: float, cap: int
                   ) -> list[Configuration]:
    return [Configuration(tuple(variant_key(n, r) for n, r in conf.items() if r < 1),
                          *(time_to_target(read_history(run_dir / c[side]["dir"] / "history.csv"), target, cap)
                            for side in run_stage.SIDES))
            for conf, c in zip(confs, run["configurations"])]


# one worker builds `finished_run` and runs both tests that use it (the other worker goes on with other
# tests instead of waiting for the build); test_executors reads only resume.json, which the edits leave alone
@pytest.mark.xdist_group("finished-run")
def test_run_end_to_end_with_a_kill_and_resume(trained: Path, small_corpus: Path, finished_run: Path) -> None:
    """The tiny experiment killed in its third finetuning and resumed (``finished_run``): files,
    report numbers, the protocol's arithmetic; then the configurations edited in the same folder."""
    exp, run_dir = finished_run / "exp.toml", finished_run / "run"
    resume = json.loads((finished_run / "resume.json").read_text())
    assert len(resume["finished_when_killed"]) == 2  # baseline and composed of configuration 0
    assert resume["redone"] == []  # nothing finished was redone
    report = run_dir / "report.md"

    summary = json.loads((run_dir / "summary.json").read_text())
    confs = json.loads((run_dir / "conf.json").read_text())
    target = summary["target_bleu"]
    assert target == pytest.approx(summary["origin"]["val_bleu"] - 20, abs=0.01)
    assert [r["seed"] for r in summary["runs"]] == [0, 1] and summary["test_splits"] == ["test"]
    assert len({r["tuned_bank"] for r in summary["runs"]}) == 2  # each seed tunes its own bank
    for c in summary["configurations"]:
        assert 0 < c["nonzero_params"] < summary["origin"]["nonzero_params"]
        assert 0 < c["flops_ratio"] < 1 and c["latency"]["spread"] >= 0
    for run in summary["runs"]:
        for c in run["configurations"]:
            assert c["composed"]["val_bleu_epoch0"] > c["baseline"]["val_bleu_epoch0"]
            for side in run_stage.SIDES:  # both sides train the equal budget, whatever the target
                assert c[side]["epochs_trained"] >= 1 and set(c[side]["test_bleu_budget"]) == {"test"}
                assert (run_dir / c[side]["dir"] / "epoch-1" / "model.safetensors").is_file()
        # the summary's saving is the protocol's arithmetic on the histories and the bank's record
        rows = _protocol_rows(run_dir, run, confs, target, 1)
        tuning = json.loads((run_dir / run["tuned_bank"] / "index.json").read_text())["tuning"]
        pruned = json.loads((run_dir / run["pruned_bank"] / "index.json").read_text())
        bank = BankCost(pruned["prune_seconds"], tuning["wall_time_s"], tuning["teacher_flops"],
                        tuning["variant_flops"])
        assert saving(rows, bank).to_dict() == run["saving"]
        assert run["curve"] == [x.to_dict() for x in saving_curve(rows, bank)]
        assert run["saving"]["ratio_flops"] > 0 and run["saving"]["bank_flops"] > 0
    md = report.read_text()
    assert f"**{summary['runs'][0]['saving']['ratio_seconds']:.2f}x**" in md and "nrefs:1|case:mixed" in md
    html = (run_dir / "report.html").read_text()
    assert html.count("<table>") >= 4 and "<th>seed</th>" in html and "| seed |" not in html
    assert html.count("data:image/png;base64,") == 4
    for f in ("plot_bleu_vs_time.png", "plot_saving_curve.png", "plot_flops_vs_bleu.png", "conf.json",
              "plan.json", "experiment.toml", "latency.json"):
        assert (run_dir / f).is_file(), f
    (run_dir / "report.md").unlink()
    r = run_cli("report", str(run_dir))
    assert r.returncode == 0 and (run_dir / "report.md").read_text() == md

    # Edit the configurations: configuration 0 stays, configuration 1 moves its heads from 0.25 to 0.75.
    # Only the new variants are pruned and tuned, only configuration 1 is finetuned again.
    stamps = {p: p.stat().st_mtime_ns for p in sorted(run_dir.glob("banks/*/variants/*"))
              + sorted(run_dir.glob("finetune/*/config-*/model.safetensors"))}
    tuned_dir = run_dir / summary["runs"][0]["tuned_bank"]
    tuned_before = json.loads((tuned_dir / "index.json").read_text())
    text = EXPERIMENT.format(model=trained, data=small_corpus)
    exp.write_text(text.replace("attention = [0.5, 0.25]", "attention = [0.5, 0.75]"))
    run_stage.run_experiment(exp, run_dir)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    edited = json.loads((run_dir / "summary.json").read_text())
    assert [c["configuration"] for c in edited["configurations"]] == json.loads((run_dir / "conf.json").read_text())
    assert edited["configurations"][1]["flops_ratio"] > summary["configurations"][1]["flops_ratio"]  # 0.75 > 0.25
    assert edited["configurations"][0] == {**summary["configurations"][0], "latency": edited["configurations"][0][
        "latency"]}  # described again (the latency is measured again beside the new configuration)
    old, new = summary["runs"][0]["configurations"], edited["runs"][0]["configurations"]
    assert [new[0][s]["dir"] for s in run_stage.SIDES] == [old[0][s]["dir"] for s in run_stage.SIDES]
    assert all(new[1][s]["dir"] != old[1][s]["dir"] for s in run_stage.SIDES)
    tuned_after = json.loads((tuned_dir / "index.json").read_text())
    added = sorted(set(tuned_after["variants"]) - set(tuned_before["variants"]))
    assert added and all(k.endswith("@0.75") and "attn" in k for k in added)
    assert tuned_after["tuning"]["sessions"] == 2
    assert tuned_after["tuning"]["variants"] == len(tuned_after["variants"])
    assert set(tuned_after["tuning"]["variant_flops"]) == set(tuned_after["variants"])
    assert edited["runs"][0]["tuning"]["wall_time_s"] > summary["runs"][0]["tuning"]["wall_time_s"]
    # A third tuning session (FFN Linears 0.5 -> 0.3) merges into the same banks; the block history
    # stays one row per (variant, epoch), in epoch order.
    exp.write_text(text.replace("attention = [0.5, 0.25]", "attention = [0.5, 0.75]")
                   .replace("linear = [0.2, 0.5]", "linear = [0.2, 0.3]"))
    run_stage.run_experiment(exp, run_dir)
    third = json.loads((tuned_dir / "index.json").read_text())["tuning"]
    rows = read_history(tuned_dir / "history.csv")
    assert third["sessions"] == 3 and [int(r["epoch"]) for r in rows] == sorted(int(r["epoch"]) for r in rows)
    assert len({(r["variant"], r["epoch"]) for r in rows}) == len(rows)

    # The finetuning cap raised (1 -> 2): the same folders; a censored side trains on to the new cap,
    # a side that reached its target is left as it was.
    before = json.loads((run_dir / "summary.json").read_text())
    folders = sorted(run_dir.glob("finetune/*/config-*"))
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.glob("finetune/*/config-*/model.safetensors")}
    exp.write_text(text.replace("attention = [0.5, 0.25]", "attention = [0.5, 0.75]")
                   .replace("linear = [0.2, 0.5]", "linear = [0.2, 0.3]")
                   .replace("epochs = 1\nlr = 1e-3", "epochs = 2\nlr = 1e-3"))
    run_stage.run_experiment(exp, run_dir)
    after = json.loads((run_dir / "summary.json").read_text())
    assert sorted(run_dir.glob("finetune/*/config-*")) == folders
    for old_run, new_run in zip(before["runs"], after["runs"], strict=True):
        for old_c, new_c in zip(old_run["configurations"], new_run["configurations"], strict=True):
            for side in run_stage.SIDES:
                was, now = old_c[side], new_c[side]
                assert now["dir"] == was["dir"]
                if was["epochs_to_target"] is None:  # censored under cap 1
                    assert now["epochs_trained"] == 2 and now["train_flops"] > was["train_flops"]
                else:
                    assert now["epochs_trained"] == was["epochs_trained"]
                    assert (run_dir / was["dir"] / "model.safetensors").stat().st_mtime_ns == \
                        stamps[run_dir / was["dir"] / "model.safetensors"]


@pytest.mark.parametrize("text, message", [
    ("[data]\ncorpus = 'wmt'\n[configurations]\nattention=[0.5]", "data.corpus"),
    ("[configurations]\n", "needs exactly one of"),
    ("[configurations]\nattention=[0.5]\n[finetuning]\ntarget_bleu='best'", "origin-X"),
    ("[nonsense]\n", "unknown section"),
    ("[configurations]\nattention=[0.5]\n[tuning]\nepochs=1\nlearning_rate=1", "unknown key"),
    ("origin = 'seed'\n[configurations]\nattention=[0.5]", "must be a table"),
    ("seeds = []\n[configurations]\nattention=[0.5]", "seeds"),
    ("[configurations]\nattention=[0.5]\n[finetuning]\ntarget_bleu=nan", "target_bleu"),
    ("[configurations]\nattention=[0.5]\n[tuning]\nlr=nan", "tuning.lr"),
    ("[configurations]\nattention=[0.5]\n[finetuning]\nepochs=0", "finetuning.epochs must be at least 1"),
    ("[configurations]\nattention=[0.5]\n[search]\nflops=0.5", "not both"),
    ("[search]\nk=2", "needs a budget"),
    ("[search]\nflops='lots'", "--flops"),
    ("not toml = = 1", "not valid TOML"),
    ("[configurations]\nattention=[0.5, 0.25]\nlinear=[0.2]", "same length"),
    ("[configurations]\nattention=[0.5]\n[execution]\nexecutor='slurm'", "execution.executor must be one of"),
    # issue 25: an origin of 0 epochs (its val BLEU was -Infinity in summary.json), absurd workers
    ("[origin]\nepochs=0\n[configurations]\nattention=[0.5]", "origin.epochs must be at least 1"),
    ("[configurations]\nattention=[0.5]\n[execution]\nworkers=9223372036854775807",
     r"e.toml: execution.workers must be in \[1, 1024\], got 9223372036854775807"),
    ("[configurations]\nattention=[0.5]\n[execution]\nshards=5000", r"execution.shards must be in \[1, 1024\]"),
    ("[search]\nflops=0.5\nk=1000000", r"e.toml: search.k must be in \[1, 256\], got 1000000"),
    ("[search]\nflops=0.5\n[finetuning]\nrandom=-1", "finetuning.random must be at least 0"),
    ("[search]\nflops=0.5\n[finetuning]\nscratch_ceiling=true", "scratch_ceiling needs finetuning.scratch"),
    ("[search]\nflops=0.5\n[finetuning]\nscratch=1", "finetuning.scratch must be bool"),
])
def test_bad_experiment_files(text: str, message: str, tmp_path: Path) -> None:
    (tmp_path / "e.toml").write_text(text)
    with pytest.raises(CtpruneError, match=message):
        load_experiment(tmp_path / "e.toml")


@pytest.mark.parametrize("arch, module", [("ctprune", "decoder.layers.7.ffn"),
                                          ("marian", "decoder.layers.0.ffn"),  # ctprune's name, not Marian's
                                          ("t5", "model.encoder.layers.0.self_attn")])
def test_configurations_naming_no_module_are_refused_before_the_origin_is_trained(arch: str, module: str,
                                                                                   tmp_path: Path) -> None:
    exp = tmp_path / "e.toml"
    exp.write_text(f'[data]\ncorpus = "synthetic"\n[origin]\npreset = "tiny"\narch = "{arch}"\nepochs = 2\n'
                   f'[configurations]\ninline = [{{ "{module}" = 0.5 }}]\n')
    with pytest.raises(CtpruneError, match=module):
        run_stage.run_experiment(exp, tmp_path / "run")
    assert not (tmp_path / "run" / "origin").exists() and not (tmp_path / "run" / "jobs").exists()


@pytest.mark.parametrize("key", ["random = 2", "scratch = true"])
def test_competitors_without_a_search_are_refused_before_anything_is_written(key: str, tmp_path: Path) -> None:
    (tmp_path / "e.toml").write_text(f"[configurations]\nattention=[0.5]\n[finetuning]\n{key}\n")
    with pytest.raises(CtpruneError, match=r"finetuning.random and finetuning.scratch .* need \[search\]"):
        run_stage.run_experiment(tmp_path / "e.toml", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_second_run_in_the_same_folder_is_refused(tmp_path: Path) -> None:
    import fcntl

    exp = tmp_path / "e.toml"
    exp.write_text('[data]\ncorpus = "synthetic"\n[origin]\npreset = "tiny"\n[configurations]\nattention = [0.5]\n')
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / run_stage.MARKER).write_text("")
    with open(tmp_path / "run" / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(CtpruneError, match="another `ctprune run` is using"):
            run_stage.run_experiment(exp, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [run_stage.MARKER, ".lock"]


def test_shipped_examples_load() -> None:
    root = Path(__file__).resolve().parents[1] / "examples"
    demo, m30k = load_experiment(root / "demo.toml"), load_experiment(root / "multi30k.toml")
    assert demo.data.corpus == "synthetic" and m30k.data.corpus == "multi30k" and m30k.origin.preset == "seed"
    assert m30k.configurations is not None and len(m30k.configurations.inline or []) == 3
    # the demo is the frontier's sweep in miniature: two budgets, k = 3, uniform and scratch beside it
    assert demo.search is not None and demo.search.flops == ("0.5", "0.4") and demo.search.k == 3
    assert demo.finetuning.scratch and (demo.finetuning.eval_every, demo.finetuning.select) == (0.25, "val_loss")
    assert demo.finetuning.target_bleu == "origin-1"
    assert (demo.execution.executor, demo.execution.workers) == ("process", 2)  # two 1-thread jobs at once
    configs = load_experiment(root / "demo-configs.toml")  # the earlier demo: eight given configurations
    assert configs.configurations is not None and len(configs.configurations.inline or []) == 8
    frontier = load_experiment(root / "multi30k-frontier.toml")  # a budget sweep, the finer protocol
    assert frontier.search is not None and frontier.search.flops == ("0.75", "0.5", "0.35")
    assert (frontier.finetuning.eval_every, frontier.finetuning.select) == (0.25, "val_loss")
    f = frontier.finetuning  # the competitors beside uniform: 4 random per budget, scratch and its ceiling
    assert (f.random, f.scratch, f.scratch_ceiling) == (4, True, True)
    repeat = load_experiment(root / "multi30k-frontier-seed1.toml")  # seed 1 at 0.5: the frontier's protocol
    assert repeat.seeds == [1] and repeat.search is not None and repeat.search.flops == ("0.5",)
    assert repeat.origin_model == root / "../runs/multi30k-frontier/origin"  # the frontier run's origin
    # the search's best configuration alone (k = 1): the repeat fits one session
    assert (repeat.search.grid, repeat.search.k, repeat.tuning) == (frontier.search.grid, 1, frontier.tuning)
    assert repeat.finetuning == dataclasses.replace(f, scratch_ceiling=False)
    marian = load_experiment(root / "multi30k-marian.toml")  # its module names are those of a seed-size Marian
    assert marian.origin.arch == "marian" and marian.configurations is not None
    check_configurations_early(marian.origin.preset, marian.origin.arch, run_stage._configurations_table(marian),
                               str(marian.path))


def test_run_with_search_picks_configurations_from_a_scored_grid_bank(trained: Path, small_corpus: Path,
                                                                      tmp_path: Path) -> None:
    exp = tmp_path / "exp.toml"
    exp.write_text(f"""
seeds = [0]
[data]
corpus = "folder:de-en"
data_dir = "{small_corpus}"
[origin]
model = "{trained}"
[search]
grid = [0.5]
kinds = ["attention"]
flops = 0.9
k = 3
min_distance = 1
objective = "loss"
[tuning]
epochs = 1
lr = 2e-3
[finetuning]
epochs = 1
lr = 1e-3
target_bleu = "origin-20"
""")
    run_dir = tmp_path / "run"
    run_stage.run_experiment(exp, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    confs = json.loads((run_dir / "conf.json").read_text())
    found = json.loads((run_dir / "search.json").read_text())
    assert len(confs) == 3 and len({json.dumps(c, sort_keys=True) for c in confs}) == 3
    assert all(c["flops_fraction"] <= 0.9 for c in found["configurations"])
    assert found["objective"] == "loss"  # [search] reaches the solver
    run = summary["runs"][0]
    tuning = json.loads((run_dir / run["tuned_bank"] / "index.json").read_text())
    assert len(tuning["variants"]) == 6 and "scores" in tuning  # every attention block at 0.5, scored
    # the whole grid bank is charged for every k, however few variants the first configurations use
    assert {c["bank_flops"] for c in run["curve"]} == {tuning["tuning"]["train_flops"]}
    assert summary["search"]["scoring_seconds"] > 0
    report = (run_dir / "report.md").read_text()
    assert "Configurations found by `ctprune search`" in report
    # the estimate beside each configuration, and its rank correlation with the composed start
    estimates = [c["estimate"] for c in found["configurations"]]
    start = [c["composed"]["val_bleu_epoch0"] for c in run["configurations"]]
    assert "search estimate" in report and f"| {estimates[2]:.4f} |" in report
    rho = spearman(estimates, start)
    assert f"val BLEU at epoch 0 (mean over seeds) **{'n/a' if rho is None else rho}" in report


def test_run_with_a_budget_sweep_searches_once_and_finetunes_uniform_per_budget(
        trained: Path, small_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exp = tmp_path / "exp.toml"
    exp.write_text(f"""
seeds = [0]
[data]
corpus = "folder:de-en"
data_dir = "{small_corpus}"
[origin]
model = "{trained}"
[search]
grid = [0.5]
kinds = ["attention"]
flops = [0.95, 0.9]
k = 2
min_distance = 1
[tuning]
epochs = 1
lr = 2e-3
[finetuning]
epochs = 1
lr = 1e-3
target_bleu = "origin-20"
eval_every = 0.5
select = "val_loss"
""")
    run_dir = tmp_path / "run"
    run_stage.run_experiment(exp, run_dir)
    records = [json.loads(p.read_text())["job"] for p in (run_dir / "jobs").glob("*.json")]
    # one grid bank, tuned, scored and searched once for both budgets
    assert records.count("score") == 1
    assert records.count("search") == 1 and sum(n.startswith("merge tuned bank") for n in records) == 1
    found = json.loads((run_dir / "search.json").read_text())
    assert "budgets" not in found and [p["budgets"]["flops"]["value"] for p in found["sweep"]] == [0.95, 0.9]
    assert [c["budget"] for c in found["configurations"]] == [0, 0, 1, 1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [c["budget"] for c in summary["configurations"]] == [0, 0, 1, 1]
    run = summary["runs"][0]
    whole = json.loads((run_dir / run["tuned_bank"] / "index.json").read_text())["tuning"]["train_flops"]
    # the bank is charged once over all configurations, and whole to each budget alone
    assert run["saving"]["bank_flops"] == whole
    assert [b["budget"] for b in run["budgets"]] == [0, 1]
    assert all(b["saving"]["bank_flops"] == whole for b in run["budgets"])
    # the uniform competitor of each budget, finetuned from both banks under the same protocol
    comps = summary["competitors"]
    assert [(c["method"], c["budget"]) for c in comps] == [("uniform", 0), ("uniform", 1)]
    for c, point in zip(comps, found["sweep"]):
        assert c["configuration"] == point["uniform"]["configuration"]
        assert point["uniform"]["flops_fraction"] <= point["budgets"]["flops"]["value"]
    assert json.loads((run_dir / "competitors.json").read_text()) == [c["configuration"] for c in comps]
    for row in run["competitors"]:
        for side in run_stage.SIDES:
            assert {"epochs_to_target", "cost_flops", "test_bleu_budget"} <= set(row[side])
            assert (run_dir / row[side]["dir"] / "history.csv").is_file()
    assert run["competitors"][0]["baseline"]["dir"].startswith("finetune/baseline/")
    # the finer protocol reaches every finetuning: an evaluation within the epoch, the kept one by val loss
    assert summary["protocol"]["eval_every"] == 0.5 and summary["protocol"]["select"] == "val_loss"
    row = run["configurations"][0]["composed"]
    assert [r["epoch"] for r in read_history(run_dir / row["dir"] / "history.csv")][::2] == ["0", "1"]
    assert row["kept"]["epoch"] in {r["epoch"] for r in read_history(run_dir / row["dir"] / "history.csv")}
    report = (run_dir / "report.md").read_text()
    assert "Per budget and method" in report and "| 1 | uniform |" in report
    assert "budget 1: flops <= 0.9 of the origin" in report and "every 0.5 of an epoch" in report

    # The random and scratch competitors added to the same run folder: every finished job is reused (their
    # options change no finetuning's, tuning's or search's key); only their jobs, the description and the
    # latency (which take every configuration) are new.
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "jobs").glob("*.json")}
    exp.write_text(exp.read_text() + "random = 2\nscratch = true\nscratch_ceiling = true\n")
    real, ceilings = jobs.scratch_job, []

    def short_ceiling(**kw):  # type: ignore[no-untyped-def]
        if kw["max_flops"] is None:  # the origin's whole training (its 4 epochs): planned, trained for 1 step here
            ceilings.append(kw)
            return {**real(**{**kw, "max_flops": 1.0}), "max_flops": None}
        return real(**kw)

    monkeypatch.setattr(jobs, "scratch_job", short_ceiling)
    run_stage.run_experiment(exp, run_dir)
    after = {p.name: p.stat().st_mtime_ns for p in (run_dir / "jobs").glob("*.json")}
    assert all(after[name] == t for name, t in before.items())
    new = sorted(set(after) - set(before))
    assert all(n.startswith(("random-budget-", "scratch-", "describe-", "latency-")) for n in new), new
    assert sum(n.startswith("random-budget-") for n in new) == 2 and sum(n.startswith("scratch-") for n in new) == 4
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {x["budget"] for x in summary["random"]} == {0, 1}
    for x in summary["random"]:  # drawn under its budget, composed, measured before finetuning
        assert x["flops_fraction"] <= found["sweep"][x["budget"]]["budgets"]["flops"]["value"]
        assert set(x["test_bleu"]) == {"test"} and 0 <= x["val_bleu"] <= 100 and x["params"] > 0
    run = summary["runs"][0]
    tuning = json.loads((run_dir / run["tuned_bank"] / "index.json").read_text())["tuning"]
    scratch = {(x["method"], x["budget"]): x for x in run["scratch"]}
    assert set(scratch) == {(m, b) for m in ("scratch", "scratch ceiling") for b in (0, 1)}
    for c, row in zip(summary["competitors"], run["competitors"]):
        x = scratch["scratch", c["budget"]]
        assert x["flops_ratio"] == pytest.approx(c["flops_ratio"], rel=0.02)  # the uniform cut's FLOPs per token
        # and so it meets the budget (here counted at the test split's mean lengths, the search's at the scoring
        # subset's: within rounding)
        assert x["flops_ratio"] <= found["sweep"][c["budget"]]["budgets"]["flops"]["value"] + 0.005
        assert x["params"] == c["params"]  # its very shape, dense
        # the whole tuned bank plus one epoch (budget_epochs) of the uniform composed model's finetuning
        ft = flops_at(read_history(run_dir / row["composed"]["dir"] / "history.csv"), 1)
        budget = tuning["teacher_flops"] + sum(tuning["variant_flops"].values()) + ft
        assert x["max_flops"] == pytest.approx(budget, rel=1e-12)
        assert budget <= x["train_flops"] < 1.05 * budget  # stopped at its FLOPs budget, within an epoch
        history = read_history(run_dir / x["dir"] / "history.csv")
        assert float(history[-1]["train_flops"]) == x["train_flops"] and x["kept"]["epoch"] in {
            r["epoch"] for r in history}
        ceiling = scratch["scratch ceiling", c["budget"]]
        assert ceiling["max_flops"] is None and set(ceiling["test_bleu_best"]) == {"test"}
    assert [(k["seed"], k["configuration"]) for k in ceilings] == [(0, c["configuration"])
                                                                  for c in summary["competitors"]]
    assert {r["method"] for r in summary["frontier"]} == set(METHODS)
    report = (run_dir / "report.md").read_text()
    assert "### Frontier" in report and "scratch ceiling" in report and "whole tuned bank" in report
    latency = json.loads((run_dir / "latency.json").read_text())  # batched and one sentence at a time
    assert latency["single_sentences"] == min(jobs.LATENCY_SINGLE, latency["sentences"])
    assert all(row["single_median_s"] > 0 and row["median_s"] > 0 for row in latency["rows"])
    assert "latency (1 sentence)" in report and "Single-sentence latency: not in" not in report
    timed = any(r["latency"] is not None for r in summary["frontier"])  # a latency may be flagged, not printed
    for plot in ["plot_frontier_flops.png"] + (["plot_frontier_latency.png"] if timed else []):
        assert (run_dir / plot).is_file() and f"]({plot})" in report


# The run of the kill test trains its own origin: on 2000 training pairs (SMALL's 1000 leave the tiny
# recipe's 100 warm-up steps unfinished in 2 epochs) it reaches a val BLEU of about 5.5.
KILLED_RUN = """
seeds = [0]
[data]
corpus = "folder:de-en"
data_dir = "{data}"
[origin]
preset = "tiny"
epochs = 2
[configurations]
attention = [0.5]
ffn = [0.25]
[tuning]
epochs = 1
lr = 2e-3
[finetuning]
epochs = 1
lr = 1e-3
target_bleu = "origin-1"
"""


def _numbers(run_dir: Path) -> dict:
    """Every number of a summary that does not depend on the clock."""
    s = json.loads((run_dir / "summary.json").read_text())
    out = {"origin": {k: s["origin"][k] for k in ("val_bleu", "test_bleu", "params", "flops_per_token")},
           "target": s["target_bleu"], "shapes": [(c["params"], c["flops_per_token"]) for c in s["configurations"]]}
    for run in s["runs"]:
        out[f"flops-{run['seed']}"] = (run["tuning"]["train_flops"], run["saving"]["ratio_flops"],
                                       run["saving"]["baseline_flops"], run["saving"]["composed_flops"])
        out[f"confs-{run['seed']}"] = [{k: v for k, v in c[side].items()
                                        if k not in ("cost_seconds", "train_seconds", "dir")}
                                       for c in run["configurations"] for side in run_stage.SIDES]
    return out


@pytest.mark.slow
def test_a_run_killed_inside_every_stage_resumes_to_the_same_numbers(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """One run folder is killed at a file replace in the middle of every stage in turn (origin
    training, pruning, tuning, each finetuning, latency, report): each re-run resumes the stage that
    was cut, and the last one ends with the numbers of an uninterrupted run."""
    exp = tmp_path / "exp.toml"
    exp.write_text(KILLED_RUN.format(data=write_corpus(tmp_path / "data", **{**SMALL, "train": 2000})))
    real, real_say = os.replace, run_stage._say
    calls: dict = {"stage": "start", "stages": {}, "kill": None, "seen": 0}

    def replace(src, dst):  # type: ignore[no-untyped-def]
        calls["stages"][calls["stage"]] = calls["stages"].get(calls["stage"], 0) + 1
        if calls["kill"] and calls["kill"][0] == calls["stage"]:
            calls["seen"] += 1
            if calls["seen"] == calls["kill"][1]:
                raise _Killed
        return real(src, dst)

    def say(msg: str) -> None:
        calls["stage"] = msg.split(":")[0].split(" (")[0]
        real_say(msg)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(run_stage, "_say", say)
    monkeypatch.setattr(executors, "_say", say)
    run_stage.run_experiment(exp, tmp_path / "whole")
    expected = _numbers(tmp_path / "whole")
    stages = {k: v for k, v in calls["stages"].items() if k != "start"}
    assert {"origin model", "prune", "tune-blocks seed 0 shard 1/1", "latency", "report"} <= set(stages)
    assert sum(k.startswith("finetune") for k in stages) == 2  # baseline and composed
    for stage, replaces in stages.items():
        calls.update(kill=(stage, replaces // 2 + 1), seen=0)
        with pytest.raises(_Killed):
            run_stage.run_experiment(exp, tmp_path / "killed")
        assert calls["seen"] == replaces // 2 + 1, stage
    calls.update(kill=None)
    run_stage.run_experiment(exp, tmp_path / "killed")
    assert _numbers(tmp_path / "killed") == expected


# ------------------------------------------------------------------------------------------------
# issue 25: results keyed by the content of their inputs; `run -o` takes only its own folders;
# refusals come before any work and leave nothing behind.


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def _write_corpus(folder: Path, val_lines: int | None = None, train_lines: int | None = None) -> None:
    """The run tests' corpus (conftest's SMALL) as a folder of SPLIT.de / SPLIT.en files (``val_lines``:
    a shorter val, ``train_lines``: a shorter train)."""
    write_corpus(folder, **{**SMALL, "val": val_lines or SMALL["val"], "train": train_lines or SMALL["train"]})


FILE_CORPUS = """
[data]
corpus = "folder:de-en"
data_dir = "{data}"
[origin]
model = "{model}"
[configurations]
{configurations}
[tuning]
epochs = 1
lr = 2e-3
[finetuning]
epochs = 1
lr = 1e-3
target_bleu = {target}
"""


def _outputs(summary: dict) -> set[str]:
    run = summary["runs"][0]
    dirs = {c[side]["dir"] for c in run["configurations"] for side in run_stage.SIDES}
    return {run["pruned_bank"], run["tuned_bank"], *dirs}


@pytest.mark.slow
def test_a_changed_data_folder_or_origin_redoes_every_job_that_reads_it(trained: Path, tmp_path: Path) -> None:
    """Jobs are keyed by the content of what they read: a re-run after [data] data_dir changed, or
    after the origin was retrained in place, reuses no bank, finetuning or number of the old inputs
    (it once reused them all, mixing the new origin BLEU with old results). The origin's val BLEU
    is measured on the experiment's own val split, not read from the origin's training record; a
    relative data_dir is relative to the experiment file."""
    from shutil import copytree

    from ctprune.model.checkpoint import load_model_folder, save_model_folder
    from ctprune.run.jobs import val_bleu_job

    origin = tmp_path / "origin"
    copytree(trained, origin)
    # what is checked is which jobs run again, not what they learn: 256 training pairs are enough
    _write_corpus(tmp_path / "data1", train_lines=256)
    _write_corpus(tmp_path / "data2", val_lines=60, train_lines=256)
    exp, run_dir = tmp_path / "exp.toml", tmp_path / "run"
    text = FILE_CORPUS.format(data="data1", model=origin, configurations="attention = [0.5]", target='"none"')
    exp.write_text(text)
    run_stage.run_experiment(exp, run_dir)  # relative data_dir: from the experiment file, not the cwd
    first = json.loads((run_dir / "summary.json").read_text())
    kept = {p: p.stat().st_mtime_ns for p in sorted(run_dir.glob("finetune/*/config-*/model.safetensors"))}

    exp.write_text(text.replace('"data1"', '"data2"'))
    run_stage.run_experiment(exp, run_dir)
    second = json.loads((run_dir / "summary.json").read_text())
    assert _outputs(second).isdisjoint(_outputs(first))  # every bank and finetuning made again
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # the old results stay as they were
    val2 = val_bleu_job(str(origin), "folder:de-en", str(tmp_path / "data2"), "cpu")["val_bleu"]
    summary_bleu = json.loads((origin / "train_summary.json").read_text())["best_val_bleu"]
    assert second["origin"]["val_bleu"] == round(val2, 2) != round(summary_bleu, 2)
    assert second["inputs"]["data_fingerprint"] != first["inputs"]["data_fingerprint"]

    model, tok, hparams = load_model_folder(origin)  # the origin "retrained" in place
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    save_model_folder(origin, model, tok, hparams)
    run_stage.run_experiment(exp, run_dir)
    third = json.loads((run_dir / "summary.json").read_text())
    assert _outputs(third).isdisjoint(_outputs(second))
    assert third["inputs"]["origin_fingerprint"] != second["inputs"]["origin_fingerprint"]


@pytest.mark.parametrize("case", ["userdir", "workdir", "origin", "inside origin", "data", "old run"])
def test_run_dash_o_takes_only_a_new_or_empty_folder_or_its_own(case: str, model_folder: Path,
                                                                 tmp_path: Path) -> None:
    """`run -o` never writes into a user's folder, the working directory, the origin or the data
    folder, nor into a run folder of an older ctprune: refused in one line before writing anything."""
    from shutil import copytree

    origin = tmp_path / "origin"
    copytree(model_folder, origin)
    _write_corpus(tmp_path / "data", val_lines=20)
    (tmp_path / "userdir").mkdir()
    (tmp_path / "userdir" / "keep.txt").write_text("keep me\n")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "experiment.toml").write_text("")
    (tmp_path / "old" / "jobs").mkdir()
    exp = tmp_path / "exp.toml"
    exp.write_text(FILE_CORPUS.format(data="data", model="origin", configurations="attention = [0.5]",
                                      target='"none"'))
    (tmp_path / "conf.json").write_text("[]")
    out, message = {"userdir": (tmp_path / "userdir", "not a run folder"), "workdir": (tmp_path, "contains the origin"),
                    "origin": (origin, "is the origin model folder"),
                    "inside origin": (origin / "run", "is inside the origin model folder"),
                    "data": (tmp_path / "data", "is the data folder"),
                    "old run": (tmp_path / "old", "older ctprune")}[case]
    before = _tree(tmp_path)
    with pytest.raises(CtpruneError, match=message):
        run_stage.run_experiment(exp, out)
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("case", ["no module", "no data folder", "no origin", "min_distance", "target below 0",
                                  "--workers"])
@pytest.mark.parametrize("folder", ["new", "empty"])
def test_a_refused_run_leaves_nothing_behind_and_refuses_before_any_work(case: str, folder: str,
                                                                          model_folder: Path, tmp_path: Path) -> None:
    """Every refusal of `run` comes before anything is pruned, tuned or finetuned, names the
    experiment file's key (or the flag that was given), and leaves a new or empty -o as it was:
    no .lock, no experiment.toml, no jobs."""
    _write_corpus(tmp_path / "data", val_lines=20)
    confs = {"no module": 'inline = [{ "decoder.layers.7.ffn" = 0.5 }]'}.get(case, "attention = [0.5]")
    text = FILE_CORPUS.format(data="nowhere" if case == "no data folder" else "data",
                              model="missing" if case == "no origin" else model_folder, configurations=confs,
                              target='"origin-1000"' if case == "target below 0" else '"none"')
    if case == "min_distance":
        text = text.replace("[configurations]\nattention = [0.5]",
                            "[search]\ngrid = [0.5]\nkinds = [\"attention\"]\nflops = 0.9\nk = 2\nmin_distance = 7")
    exp = tmp_path / "exp.toml"
    exp.write_text(text)
    message = {"no module": "decoder.layers.7.ffn", "no data folder": "data folder .*nowhere does not exist",
               "no origin": "origin.model .*missing is not a folder",
               "min_distance": r"exp.toml: search.min_distance must be in \[1, 6\] .*got 7",
               "target below 0": "exp.toml: finetuning.target_bleu = 'origin-1000' is -1000.00 BLEU, below 0",
               "--workers": r"--workers must be in \[1, 1024\], got 100000"}[case]
    out = tmp_path / "runs" / "run"
    if folder == "empty":
        out.mkdir(parents=True)
    with pytest.raises(CtpruneError, match=message):
        run_stage.run_experiment(exp, out, execution={"workers": 100000} if case == "--workers" else None)
    if folder == "empty":
        assert list(out.iterdir()) == []
    else:
        assert not (tmp_path / "runs").exists()


def test_frontier_rows_and_pareto_points_from_a_summary_with_missing_numbers() -> None:
    assert pareto([(0.5, 30.0), (0.5, 31.0), (0.7, 31.0), (0.4, 20.0)]) == [False, True, False, True]
    lat = {"ratio": 0.6, "spread": 0.1, "flagged": False, "single_ratio": 0.7, "single_flagged": False}
    ft = {"val_bleu_epoch0": 10.0, "val_bleu_budget": 20.0, "val_bleu_best": 21.0, "test_bleu_epoch0": {"test": 9.0},
          "test_bleu_budget": {"test": 19.0}, "test_bleu_best": {"test": 20.0}}
    uniform = {"baseline": {**ft, "val_bleu_best": 15.0}, "composed": ft}
    s = {"configurations": [{"budget": 0, "flops_ratio": 0.5, "params": 10, "latency": {**lat, "flagged": True}}],
         "competitors": [{"method": "uniform", "budget": 0, "ratios": [0.5, 0.75], "flops_ratio": 0.52, "params": 11,
                          "latency": {**lat, "ratio": 0.62, "single_flagged": True}}],
         "random": [{"budget": 0, "flops_ratio": 0.48, "params": 9, "latency": lat, "val_bleu": 5.0,
                     "test_bleu": {"test": 4.0}}],
         "runs": [{"configurations": [{"composed": ft}], "competitors": [uniform],
                   "scratch": [{"method": "scratch", "budget": 0, "flops_ratio": 0.52, "params": 11,
                                "val_bleu_best": 12.0, "test_bleu_best": {"test": 11.0}}]},
                  {"configurations": [{"composed": {**ft, "val_bleu_best": 23.0}}], "competitors": [uniform]}]}
    rows = {r.method: r for r in frontier(Summary(**{**dict.fromkeys(REQUIRED), **s}))}
    assert list(rows) == ["searched", "uniform baseline", "uniform composed", "random", "scratch"]
    assert rows["searched"].val_bleu_best == 22.0 and rows["searched"].latency is None  # mean over seeds; flagged
    assert rows["searched"].latency_single == 0.7  # each kind of latency is flagged on its own
    assert (rows["uniform composed"].latency, rows["uniform composed"].latency_single) == (0.62, None)
    assert (rows["uniform baseline"].name, rows["uniform baseline"].val_bleu_best) == ("0.5/0.75", 15.0)
    random = rows["random"]  # measured before finetuning only
    assert (random.val_bleu_epoch0, random.val_bleu_best, random.quality("test")) == (5.0, None, 4.0)
    scratch = rows["scratch"]  # one seed has it; no epoch 0; the uniform cut's latency (the same shape)
    assert (scratch.val_bleu_epoch0, scratch.val_bleu_budget, scratch.latency) == (None, 12.0, 0.62)
    assert isinstance(scratch, FrontierRow) and scratch.test_bleu_budget == {"test": 11.0}


def test_epochs_to_target_read_in_hundredths_and_censored_runs_say_so() -> None:
    from ctprune.run.report import _epochs

    # evaluations every 0.25 of an epoch fall on batch counts (22 of 87 batches: 0.252874)
    assert [_epochs({"epochs_to_target": x}, 6) for x in (0.252874, 3.49711, 2, 0)] == ["0.25", "3.5", "2", "0"]
    assert _epochs({"epochs_to_target": None}, 6) == "> 6 (censored)"


def test_verdicts_pick_the_searched_model_on_val_and_say_where_a_competitor_is_ahead() -> None:
    from ctprune.run.report import verdicts

    def row(method: str, name: str, loss: float | None, val: float | None, test: float, equal: float) -> FrontierRow:
        return FrontierRow(0, method, name, 0.5, 10, None, None, None, None, val, test_bleu_budget={"t": equal},
                           test_bleu_best={"t": test}, val_loss_kept=loss)

    rows = [row("searched", "#0", 0.0148, 31.0, 30.0, 28.0), row("searched", "#1", 0.014767, 30.0, 29.0, 27.0),
            row("searched", "#2", None, 40.0, 40.0, 40.0),  # no kept val loss (an older summary): not picked
            row("uniform composed", "0.5", 1.45, 30.5, 29.5, 26.0),
            row("scratch", "uniform shape", 2.0, 20.0, 20.0, 20.0),
            row("scratch ceiling", "uniform shape", 1.6, 27.0, 33.0, 33.0), row("random", "r0", 3.0, 5.0, 4.0, 4.0)]
    # #1's mean val loss is lower by less than the 4 digits a seed's kept loss is written with: still the pick;
    # no ceiling (not equal compute)
    assert verdicts(rows, ["t"], "val_loss") == ["budget 0: searched #1 29.00 against uniform composed **29.50 "
                                                 "(-0.50): ahead of the search**; scratch 20.00 (+9.00)"]
    assert verdicts(rows, ["t"], "val_loss", equal=True) == ["budget 0: searched #1 27.00 against uniform composed "
                                                             "26.00 (+1.00); scratch 20.00 (+7.00)"]
    assert verdicts(rows, ["t"], "val_bleu") == ["budget 0: searched #0 30.00 against uniform composed "
                                                 "29.50 (+0.50); scratch 20.00 (+10.00)"]
    tie = [row("searched", "#0", 1.5, 30.0, 30.0, 30.0), row("searched", "#1", 1.5, 31.0, 29.0, 29.0)]
    # equal val loss: val BLEU breaks the tie
    assert verdicts(tie, ["t"], "val_loss") == ["budget 0: searched #1 29.00 against no competitor"]
    assert verdicts(tie, ["u"], "val_loss") == []  # no test BLEU on that split: nothing to say


def test_frontier_plot_zooms_on_trained_models_and_marks_untuned_random_ones_below() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(0.5, 38.0, "searched", 0), (0.5, 36.0, "uniform composed", 0), (0.5, 37.0, "random", 0),
           (0.45, 2.0, "random", 0), (0.48, 10.0, "random", 0)]
    try:
        def drawn(points: list[tuple[float, float, str, int]], origin: float | None) -> plt.Axes:
            ax = plt.subplots()[1]
            ax.scatter([t[0] for t in points], [t[1] for t in points])
            _clip_untuned(ax, points, [points[-2]], origin)
            return ax

        ax = drawn(pts, 40.0)
        assert ax.get_ylim()[0] == pytest.approx(36.0 - 1.2)  # 0.3 of the 4-BLEU span below the lowest trained
        lo = ax.get_ylim()[0]
        marks = [c for c in ax.collections if "random below" in c.get_label()]
        assert len(marks) == 1 and marks[0].get_offsets().tolist() == [[0.45, lo], [0.48, lo]]
        assert ax.collections[-1].get_offsets().tolist() == [[0.45, lo]]  # the Pareto point below is ringed
        assert ax.get_ylim()[1] > 38.0  # the top is left to matplotlib: nothing above is hidden
        assert len(drawn(pts[:3], 40.0).collections) == 1  # no random model far below: no zoom
        assert len(drawn(pts, None).collections) == 3  # without the origin, on the trained models alone
        assert len(drawn([t for t in pts if t[2] == "random"], 40.0).collections) == 1  # nothing trained
    finally:
        plt.close("all")


def test_report_html_aligns_each_column_one_way() -> None:
    rows = [["0", "#0", "0.86x ± 0.02", "n/a / 38.03", "search"],
            ["1", "0.25/0.5", "flagged: contradicts FLOPs", "**38.95 (-0.75)**", "uniform composed"],
            ["2", "#1", "0.44x ± 0.02", "-", "scratch"]]
    assert numeric_columns(rows) == [True, False, True, True, False]
    doc = Doc([])
    doc.table(["budget", "model", "latency", "test BLEU", "method"], rows)
    cells = re.findall(r"<t[hd]( class='text')?>", doc.html("t"))
    assert cells == ["", " class='text'", "", "", " class='text'"] * 4  # the header and each of the 3 rows
