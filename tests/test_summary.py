"""The typed run summary (summary.json): round trip, old summaries read, incomplete ones refused."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from ctprune.errors import CtpruneError
from ctprune.run.summary import SCHEMA_VERSION, Summary

SIDE = {"dir": "finetune/composed/config-a", "epochs_to_target": 1, "val_bleu_epoch0": 10.0,
        "test_bleu_budget": {"test": 11.0}, "test_bleu_best": {"test": 12.0}}

TUNING = {"variants": 2, "epochs_done": 1, "wall_time_s": 3.0, "train_tokens": 1000, "achieved_gflops": 1.0}
SAVING = {"ratio_seconds": 1.2, "ratio_flops": 1.5, "bound": "", "baseline_seconds": 10.0, "baseline_flops": 1e12,
          "bank_seconds": 3.0, "bank_flops": 2e11, "composed_seconds": 5.0, "composed_flops": 4e11,
          "censored_baselines": 0, "censored_composed": 0}


def _old() -> dict[str, Any]:
    """A summary as ctprune wrote it before schema_version (and before execution and inputs)."""
    return {
        "experiment": "demo.toml", "seeds": [0], "corpus": "synthetic", "target_bleu": 20.0, "search": None,
        "protocol": {"target": "origin-5", "cap_epochs": 2, "budget_epochs": 1, "tuning_epochs": 1,
                     "latency_repeats": 5},
        "test_splits": ["test"],
        "origin": {"dir": "o", "test_bleu": {"test": 30.0}, "params": 100, "nonzero_params": 100,
                   "flops_per_token": 1000, "val_bleu": 25.0},
        "bleu_signature": "nrefs:1|case:mixed", "chrf_signature": "chrF2",
        "configurations": [{"configuration": {"a": 0.5}, "params": 50, "nonzero_params": 50, "flops_ratio": 0.5,
                            "latency": {"ratio": 0.6, "spread": 0.1, "flagged": False}}],
        "runs": [{"seed": 0, "tuned_bank": "banks/tuned-x", "tuning": TUNING, "saving": SAVING,
                  "curve": [{"ratio_seconds": 1.2, "ratio_flops": 1.5}],
                  "configurations": [{"index": 0, "baseline": SIDE, "composed": SIDE}]}],
        "finetune_achieved_gflops": 1.5, "versions": {"ctprune": "0.1.0"}, "machine": {"threads": 2},
    }


def test_a_summary_round_trips_through_json() -> None:
    new = {**_old(), "execution": {"executor": "local"}, "inputs": {"origin_fingerprint": "f"},
           "competitors": [{"method": "uniform", "budget": 0}], "unknown_future_key": [1]}
    s = Summary.from_json(json.loads(json.dumps(new)), "summary.json")
    assert s.schema_version == 1 and s.execution == {"executor": "local"}
    out = s.to_json()
    assert out == {**new, "schema_version": 1}  # unknown keys are kept
    current = dataclasses.replace(s, schema_version=SCHEMA_VERSION)  # as `ctprune run` writes it now
    again = Summary.from_json(json.loads(json.dumps(current.to_json())), "summary.json")
    assert again == current and again.to_json() == current.to_json()
    assert list(again.to_json())[0] == "schema_version" and again.to_json()["schema_version"] == SCHEMA_VERSION


def test_an_old_summary_without_schema_version_reads_as_version_1() -> None:
    s = Summary.from_json(_old(), "runs/demo/summary.json")
    assert s.schema_version == 1
    assert (s.execution, s.inputs, s.competitors, s.random, s.frontier, s.search) == (None,) * 6
    assert "execution" not in s.to_json() and "competitors" not in s.to_json() and s.to_json()["search"] is None
    assert s.runs[0]["configurations"][0]["composed"]["val_bleu_epoch0"] == 10.0


@pytest.mark.parametrize("drop, named", [
    (("runs",), "'runs'"), (("target_bleu",), "'target_bleu'"), (("protocol", "cap_epochs"), "protocol.cap_epochs"),
    (("origin", "test_bleu"), "origin.test_bleu"), (("runs", 0, "saving", "ratio_flops"), "runs[0].saving.ratio_flops"),
])
def test_a_summary_missing_a_required_key_is_refused_in_one_line(drop: tuple[Any, ...], named: str) -> None:
    obj = copy.deepcopy(_old())
    at = obj
    for k in drop[:-1]:
        at = at[k]
    del at[drop[-1]]
    with pytest.raises(CtpruneError) as e:
        Summary.from_json(obj, Path("runs/demo/summary.json"))
    msg = str(e.value)
    assert "\n" not in msg and named in msg and "runs/demo/summary.json" in msg


def test_a_side_missing_a_key_and_a_newer_schema_are_refused() -> None:
    obj = copy.deepcopy(_old())
    obj["runs"][0]["configurations"][0]["baseline"] = {k: v for k, v in SIDE.items() if k != "test_bleu_best"}
    with pytest.raises(CtpruneError, match=r"runs\[0\]\.configurations\[0\]\.baseline\.test_bleu_best"):
        Summary.from_json(obj, "s.json")
    with pytest.raises(CtpruneError, match="newer"):
        Summary.from_json({**_old(), "schema_version": SCHEMA_VERSION + 1}, "s.json")
    with pytest.raises(CtpruneError, match="not a JSON object"):
        Summary.from_json([1], "s.json")


def test_the_report_refuses_an_incomplete_summary_in_one_line(tmp_path: Path) -> None:
    from ctprune.run.report import write_report

    obj = _old()
    del obj["runs"][0]["tuned_bank"]
    (tmp_path / "summary.json").write_text(json.dumps(obj))
    with pytest.raises(CtpruneError, match=r"summary.json: not a complete run summary: no runs\[0\]\.tuned_bank"):
        write_report(tmp_path)
    assert not (tmp_path / "report.md").exists()


def test_the_report_refuses_a_summary_missing_a_deeper_field_in_one_line(tmp_path: Path) -> None:
    """A field below what from_json checks (a configuration's latency) is a one-line refusal too."""
    from ctprune.run.report import write_report

    obj = _old()
    Summary.from_json(copy.deepcopy(obj), "s.json")  # complete at the levels from_json checks
    del obj["configurations"][0]["latency"]["ratio"]
    (tmp_path / "summary.json").write_text(json.dumps(obj))
    with pytest.raises(CtpruneError, match=r"summary.json: not a complete run summary \(KeyError: 'ratio'\)"):
        write_report(tmp_path)
    assert not (tmp_path / "report.md").exists()
