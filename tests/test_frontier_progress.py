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


def test_a_folder_without_a_search_is_refused_in_one_line(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "frontier_progress.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "no search.json" in out.stderr


def test_bootstrap_compares_every_method_of_a_budget_against_the_searched_model(tmp_path: Path,
                                                                                 model_folder: Path) -> None:
    side = {"dir": str(model_folder), "kept": {"val_loss": 2.0, "val_bleu": 1.0}}
    worse = {"dir": str(tmp_path / "missing"), "kept": {"val_loss": 3.0, "val_bleu": 2.0}}  # not chosen: not read
    _write(tmp_path / "summary.json", {
        "frontier": [{"budget": 0}], "corpus": "synthetic", "test_splits": ["test"], "inputs": {},
        "protocol": {"select": "val_loss"}, "origin": {"dir": str(model_folder)},
        "configurations": [{"budget": 0}, {"budget": 0}],
        "runs": [{"configurations": [{"composed": worse}, {"composed": side}],
                  "competitors": [{"method": "uniform", "budget": 0, "composed": side, "baseline": side}],
                  "scratch": [{"method": "scratch", "budget": 0, "dir": str(model_folder)}]}]})
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "frontier_bootstrap.py"), str(tmp_path),
                          "--output", str(tmp_path / "bootstrap"), "--limit", "24"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "bootstrap.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["origin", "searched", "uniform composed", "uniform baseline", "scratch"]
    searched = rows[1]
    assert searched["p_vs_searched"] is None and searched["dir"] == str(model_folder)  # lowest kept val loss
    for r in rows:  # the same model under every name: the same BLEU and interval
        assert (r["bleu"], r["ci95"]) == (searched["bleu"], searched["ci95"])
        assert r["p_vs_searched"] is None or 0 < r["p_vs_searched"] <= 1
