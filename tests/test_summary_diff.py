"""benchmarks/summary_diff.py: two summaries compared value by value, times and places left out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _summary(bleu: float, seconds: float, folder: str) -> dict:
    side = {"val_bleu_best": bleu, "cost_seconds": seconds, "cost_flops": 1e9, "dir": folder}
    return {"schema_version": 2, "machine": {"threads": 2}, "tuned_bank": folder,
            "runs": [{"configurations": [{"baseline": side, "composed": dict(side)}],
                      "saving": {"ratio_flops": 2.0, "ratio_seconds": seconds}}]}


def _diff(tmp_path: Path, before: dict, after: dict) -> subprocess.CompletedProcess[str]:
    (tmp_path / "a.json").write_text(json.dumps(before))
    (tmp_path / "b.json").write_text(json.dumps(after))
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "summary_diff.py"), str(tmp_path / "a.json"),
                           str(tmp_path / "b.json"), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)


def test_times_and_folders_differ_but_the_summaries_are_equal(tmp_path: Path) -> None:
    before, after = _summary(97.4, 9.6, "x"), _summary(97.4, 12.1, "y")
    after["runs"][0]["new_field"] = 1
    done = _diff(tmp_path, before, after)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["different"] == {} and result["only_after"] == ["runs[0].new_field"]
    assert result["compared"] == 6  # schema, 2 x (bleu, flops), ratio_flops


def test_a_changed_result_is_named_and_fails(tmp_path: Path) -> None:
    done = _diff(tmp_path, _summary(97.4, 9.6, "x"), _summary(97.5, 9.6, "x"))
    assert done.returncode == 1
    assert "runs[0].configurations[0].baseline.val_bleu_best: 97.4 -> 97.5" in done.stdout
    assert "2 differ" in done.stdout
