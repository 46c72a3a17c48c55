"""`ctprune run` end to end on a tiny experiment: files, report numbers, and resume after a kill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ctprune.stages.run as run_stage
from ctprune.errors import CtpruneError
from ctprune.experiment import load_experiment
from ctprune.stages.report import saving

from .conftest import run_cli

EXPERIMENT = """
seed = 0
[data]
corpus = "synthetic"
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


def test_run_end_to_end_with_a_kill_and_resume(trained: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    exp = tmp_path / "exp.toml"
    exp.write_text(EXPERIMENT.format(model=trained))
    run_dir = tmp_path / "run"
    real = run_stage.finetune
    calls = {"n": 0}

    def killed_on_third(*a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Killed
        return real(*a, **k)

    monkeypatch.setattr(run_stage, "finetune", killed_on_third)
    with pytest.raises(_Killed):
        run_stage.run_experiment(exp, run_dir)
    finished = sorted((run_dir / "finetune").glob("*/config-*/model.safetensors"))
    assert len(finished) == 2  # baseline and composed of configuration 0
    stamps = {p: p.stat().st_mtime_ns for p in
              finished + sorted(run_dir.glob("banks/*/index.json")) + sorted(run_dir.glob("banks/*/variants/*"))}
    monkeypatch.setattr(run_stage, "finetune", real)
    report = run_stage.run_experiment(exp, run_dir)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # nothing finished was redone

    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["configurations"]) == 2 and summary["target_bleu"] == pytest.approx(
        summary["origin"]["val_bleu"] - 20, abs=0.01)
    for c in summary["configurations"]:
        assert c["composed"]["val_bleu_epoch0"] > c["baseline"]["val_bleu_epoch0"]
        assert 0 < c["composed"]["nonzero_params"] < summary["origin"]["nonzero_params"]
        assert c["composed"]["flops_per_token"] < summary["origin"]["flops_per_token"]
    md = report.read_text()
    sv = saving(summary)
    assert f"**Saving: {sv['ratio']:.2f}x**" in md and "nrefs:1|case:mixed" in md
    html = (run_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    for f in ("plot_bleu_vs_time.png", "plot_size_vs_bleu.png", "conf.json", "plan.json", "experiment.toml"):
        assert (run_dir / f).is_file(), f
    (run_dir / "report.md").unlink()
    r = run_cli("report", str(run_dir))
    assert r.returncode == 0 and (run_dir / "report.md").read_text() == md

    # Edit the configurations: configuration 0 stays, configuration 1 moves its heads from 0.25 to 0.75.
    # Only the new variants are pruned and tuned, only configuration 1 is finetuned again.
    stamps = {p: p.stat().st_mtime_ns for p in sorted(run_dir.glob("banks/*/variants/*"))
              + sorted(run_dir.glob("finetune/*/config-*/model.safetensors"))}
    tuned_dir = run_dir / summary["tuned_bank"]
    tuned_before = json.loads((tuned_dir / "index.json").read_text())
    exp.write_text(EXPERIMENT.format(model=trained).replace("attention = [0.5, 0.25]", "attention = [0.5, 0.75]"))
    run_stage.run_experiment(exp, run_dir)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    edited = json.loads((run_dir / "summary.json").read_text())
    old, new = summary["configurations"], edited["configurations"]
    assert [new[0][s]["dir"] for s in run_stage.SIDES] == [old[0][s]["dir"] for s in run_stage.SIDES]
    assert all(new[1][s]["dir"] != old[1][s]["dir"] for s in run_stage.SIDES)
    tuned_after = json.loads((tuned_dir / "index.json").read_text())
    added = sorted(set(tuned_after["variants"]) - set(tuned_before["variants"]))
    assert added and all(k.endswith("@0.75") and "attn" in k for k in added)
    assert tuned_after["tuning"]["sessions"] == 2
    assert tuned_after["tuning"]["variants"] == len(tuned_after["variants"])
    assert edited["tuning"]["wall_time_s"] > summary["tuning"]["wall_time_s"]


@pytest.mark.parametrize("text, message", [
    ("[data]\ncorpus = 'wmt'\n[configurations]\nattention=[0.5]", "data.corpus"),
    ("[configurations]\n", "needs exactly one of"),
    ("[configurations]\nattention=[0.5]\n[finetuning]\ntarget_bleu='best'", "origin-X"),
    ("[nonsense]\n", "unknown section"),
    ("not toml = = 1", "not valid TOML"),
])
def test_bad_experiment_files(text: str, message: str, tmp_path: Path) -> None:
    (tmp_path / "e.toml").write_text(text)
    with pytest.raises(CtpruneError, match=message):
        load_experiment(tmp_path / "e.toml")


def test_shipped_examples_load() -> None:
    root = Path(__file__).resolve().parents[1] / "examples"
    demo, m30k = load_experiment(root / "demo.toml"), load_experiment(root / "multi30k.toml")
    assert demo.corpus == "synthetic" and m30k.corpus == "multi30k" and m30k.preset == "seed"
    assert len(m30k.conf_inline or []) == 3
