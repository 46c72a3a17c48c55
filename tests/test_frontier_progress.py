"""benchmarks/frontier_progress.py on a hand-made run folder: finished finetunings are read from
the job records and the partial saving follows the protocol's arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from .conftest import REPO


def _side(ett: float | None, flops: float) -> dict[str, Any]:
    return {"epochs_to_target": ett, "epochs_trained": 2, "cost_flops": flops, "val_bleu_epoch0": 30.0,
            "val_bleu_budget": 31.0, "val_bleu_best": 32.0, "test_bleu_epoch0": {"t": 29.0},
            "test_bleu_budget": {"t": 30.0}, "test_bleu_best": {"t": 31.0}, "kept": {"epoch": "1"}}


def _write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_progress_reads_finished_jobs_and_charges_the_whole_bank(tmp_path: Path) -> None:
    conf = {"encoder.layers.0.ffn": 0.5}
    _write(tmp_path / "search.json", {
        "configurations": [{"budget": 0, "flops_fraction": 0.7, "configuration": conf},
                           {"budget": 0, "flops_fraction": 0.69, "configuration": {"encoder.layers.1.ffn": 0.5}}],
        "sweep": [{"uniform": {"flops_fraction": 0.72, "configuration": conf}}]})
    jobs = {"finetune baseline 0 (seed 0)": _side(None, 100.0), "finetune composed 0 (seed 0)": _side(0, 0.0),
            "finetune baseline uniform budget 0 (seed 0)": _side(1.5, 40.0),
            "random budget 0": {"budget": 0, "rows": [{"flops_fraction": 0.6, "val_loss": 2.0, "val_bleu": 20.0,
                                                        "test_bleu": {"t": 19.0}}]}}
    for i, (name, result) in enumerate(jobs.items()):
        _write(tmp_path / "jobs" / f"{i}.json", {"job": name, "result": result})
    _write(tmp_path / "banks" / "pruned-a" / "index.json",
           {"variants": {"encoder.layers.0.ffn@0.5": {}, "encoder.layers.1.ffn@0.5": {}}})
    _write(tmp_path / "banks" / "tuned-a" / "index.json", {"tuning": {
        "wall_time_s": 9.0, "teacher_flops": 10.0,
        "variant_flops": {"encoder.layers.0.ffn@0.5": 3.0, "encoder.layers.1.ffn@0.5": 2.0}}})
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "frontier_progress.py"), str(tmp_path),
                          "--output", str(tmp_path / "progress")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "3 of 6 finetunings done" in out.stdout
    report = json.loads((tmp_path / "progress.json").read_text())
    assert [(r["method"], r["side"]) for r in report["finetunings"]] == [
        ("searched", "baseline"), ("searched", "composed"), ("uniform", "baseline")]
    s = report["saving_so_far"]
    assert report["pairs_done"] == 1 and s["bound"] == "lower bound"  # the baseline is censored
    assert s["ratio_flops"] == round(100.0 / (10.0 + 3.0 + 2.0), 3)  # every variant of the grid charged
    assert report["random"] == [{"budget": 0, "flops_fraction": 0.6, "val_loss": 2.0, "val_bleu": 20.0,
                                 "test_bleu": {"t": 19.0}}]
    assert report["partial"] and "partial" in (tmp_path / "progress.md").read_text().splitlines()[0]
    (tmp_path / "summary.json").write_text("{}")  # the run has written its report: no longer partial
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "frontier_progress.py"), str(tmp_path),
                           "--output", str(tmp_path / "progress")], capture_output=True, check=True, text=True,
                          timeout=120)
    assert "saving over 1 searched" in done.stdout and '"partial": false' in done.stdout
    assert not json.loads((tmp_path / "progress.json").read_text())["partial"]
    assert "every job done" in (tmp_path / "progress.md").read_text().splitlines()[0]


def test_a_folder_without_a_search_is_refused_in_one_line(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "frontier_progress.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "no search.json" in out.stderr


def test_bootstrap_compares_every_method_of_a_budget_against_the_searched_model(tmp_path: Path,
                                                                                 model_folder: Path) -> None:
    # the committed demo's summary (a complete one), its first seed, every model folder the test's tiny model
    summary = json.loads((REPO / "benchmarks" / "results" / "demo-sweep" / "summary.json").read_text())
    summary = {**summary, "seeds": [0], "runs": summary["runs"][:1], "origin": {**summary["origin"],
                                                                                "dir": str(model_folder)}}
    run = summary["runs"][0]
    for i, c in enumerate(run["configurations"]):  # at budget 0 (#0-#2) the report's pick is #2: lowest val loss
        best = i == 2 or i >= 3
        c["composed"] = {**c["composed"], "dir": str(model_folder if best else tmp_path / "missing"),  # not read
                         "kept": {**c["composed"]["kept"], "val_loss": 0.001 if i == 2 else 3.0}}
    for c in run["competitors"]:
        for side in ("composed", "baseline"):
            c[side] = {**c[side], "dir": str(model_folder)}
    for x in run["scratch"]:
        x["dir"] = str(model_folder)
    _write(tmp_path / "summary.json", summary)
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "frontier_bootstrap.py"), str(tmp_path),
                          "--output", str(tmp_path / "bootstrap"), "--limit", "24"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "bootstrap.json").read_text())["rows"]
    methods = ["origin", "searched", "uniform composed", "uniform baseline", "scratch"]  # per budget
    assert [(r["budget"], r["method"]) for r in rows] == [(b, m) for b in (0, 1) for m in methods]
    searched = rows[1]
    assert searched["p_vs_searched"] is None and searched["dir"] == str(model_folder)  # lowest kept val loss
    for r in rows:  # the same model under every name: the same BLEU and interval
        assert (r["bleu"], r["ci95"]) == (searched["bleu"], searched["ci95"])
        assert r["p_vs_searched"] is None or 0 < r["p_vs_searched"] <= 1


def _history(path: Path, bleus: list[float], flops_per_eval: float) -> None:
    """A finished finetuning's history: an evaluation every 0.25 of an epoch from epoch 0."""
    lines = ["epoch,train_loss,val_loss,val_bleu,lr,epoch_time_s,wall_time_s,train_tokens,train_flops"]
    for i, b in enumerate(bleus):
        e = i / 4
        lines.append(f"{int(e) if e.is_integer() else e},1.0,2.0,{b},0.0001,1.0,{i},{i * 10},{i * flops_per_eval}")
    path.mkdir(parents=True)
    (path / "history.csv").write_text("\n".join(lines) + "\n")
    (path / "train_summary.json").write_text("{}")


def test_targets_reread_the_histories_at_looser_targets_and_refuse_stricter_ones(tmp_path: Path) -> None:
    confs = [{"budget": 0, "configuration": {"encoder.layers.0.ffn": 0.5}},
             {"budget": 1, "configuration": {"encoder.layers.1.ffn": 0.5}},
             {"budget": 1, "configuration": {"encoder.layers.1.ffn": 0.25}}]
    _write(tmp_path / "search.json", {"configurations": confs, "sweep": [{}, {}]})
    (tmp_path / "experiment.toml").write_text('seeds = [0]\n[search]\nflops = [0.5, 0.4]\n'
                                              '[finetuning]\nepochs = 1\ntarget_bleu = "origin-1"\n')
    _write(tmp_path / "jobs" / "o.json", {"job": "origin val BLEU", "result": {"val_bleu": 30.0}})
    _write(tmp_path / "banks" / "pruned-a" / "index.json", {"variants": {"a": {}, "b": {}}})
    _write(tmp_path / "banks" / "tuned-a" / "index.json", {"tuning": {
        "wall_time_s": 9.0, "teacher_flops": 10.0, "variant_flops": {"a": 3.0, "b": 2.0}}})
    # configuration 0: the baseline reaches 29 (origin-1) at 0.75, 28 at 0.25; composed at 0 for both.
    # configuration 1: the baseline never reaches 29 (censored at the cap of 1 epoch) and reaches 28 at 0.75;
    # its composed side reaches 29 at 0.5. Configuration 2: its composed side stopped at 0.5 short of the
    # target (finished under a lower cap, not trained on yet): unfinished, left out, as is the uniform cut's
    sides = {("baseline", 0, "conf"): [10.0, 28.0, 28.5, 29.0, 29.2],
             ("composed", 0, "conf"): [29.5, 29.6, 29.7, 29.8, 29.9],
             ("baseline", 1, "conf"): [5.0, 27.0, 27.5, 28.0, 28.4], ("composed", 1, "conf"): [20.0, 28.0, 29.1],
             ("baseline", 2, "conf"): [5.0, 27.0, 27.5, 28.0, 28.4], ("composed", 2, "conf"): [20.0, 27.0, 27.5],
             ("baseline", 0, "competitors"): [10.0, 28.0, 28.5, 29.0, 29.2]}
    for (side, i, file), bleus in sides.items():
        folder = tmp_path / "finetune" / side / f"config-{file}-{i}"
        _history(folder, bleus, 100.0)
        _write(folder / "hparams.json", {"configurations": str(tmp_path / f"{file}.json"), "configuration_index": i,
                                         "recipe": {"seed": 0}})
    script = [sys.executable, str(REPO / "benchmarks" / "frontier_targets.py"), str(tmp_path)]
    out = subprocess.run(script + ["--deltas", "1", "2", "--output", str(tmp_path / "targets")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "targets.json").read_text())
    assert (report["pairs"], report["partial"], report["cap_epochs"]) == (2, True, 1)
    rows = {(r["delta"], r["budget"]): r for r in report["rows"]}
    assert set(rows) == {(d, b) for d in (1.0, 2.0) for b in (0, 1, "all")}
    bank = 10.0 + 3.0 + 2.0  # every grid variant charged, whatever the finished pairs use
    assert rows[1.0, 0]["epochs"] == [[0.75, 0]] and rows[1.0, 0]["ratio_flops"] == round(300.0 / bank, 3)
    assert rows[2.0, 0]["epochs"] == [[0.25, 0]] and rows[2.0, 0]["ratio_flops"] == round(100.0 / bank, 3)
    # the censored baseline counts its whole capped run and makes the saving a lower bound
    assert rows[1.0, 1]["epochs"] == [[None, 0.5]] and rows[1.0, 1]["bound"] == "lower bound"
    assert rows[1.0, 1]["ratio_flops"] == round(400.0 / (bank + 200.0), 3)
    assert rows[2.0, 1]["epochs"] == [[0.75, 0.25]] and rows[2.0, 1]["bound"] == ""
    assert rows[1.0, "all"]["configurations"] == 2 and rows[1.0, "all"]["censored_baselines"] == 1
    assert "partial" in out.stdout and "origin-2 (28.00)" in out.stdout
    stricter = subprocess.run(script + ["--deltas", "0.5"], capture_output=True, text=True, timeout=120)
    assert stricter.returncode == 2 and stricter.stderr.count("\n") == 1 and "stricter" in stricter.stderr
