"""The `ctprune` command run as a user would: through a subprocess."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import REPO, run_cli


def test_help_explains_every_command() -> None:
    r = run_cli("--help")
    assert r.returncode == 0 and "Pipeline" in r.stdout
    for cmd in ("train", "evaluate", "translate", "data"):
        assert cmd in r.stdout
        sub = run_cli(cmd, "--help")
        assert sub.returncode == 0 and "usage: ctprune " + cmd in sub.stdout


def test_train_tiny_synthetic_one_epoch(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    r = run_cli("train", "--preset", "tiny", "--corpus", "synthetic", "--epochs", "1", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "best val BLEU" in r.stdout
    assert (out / "model.safetensors").is_file() and (out / "history.csv").is_file()


def test_evaluate_and_translate(trained: Path, tmp_path: Path) -> None:
    r = run_cli("evaluate", str(trained), "--corpus", "synthetic", "--split", "test", "-o", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "BLEU = " in r.stdout and "nrefs:1|case:mixed|eff:no|tok:13a" in r.stdout
    assert "chrF2 = " in r.stdout
    hyps = (tmp_path / "test.greedy.en").read_text().splitlines()
    assert len(hyps) == 200
    r = run_cli("translate", str(trained), stdin="Der Mann sieht den Hund .\nDie Frau liest ein Buch .\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2 and all(r.stdout.splitlines())


@pytest.mark.parametrize("args, message", [
    (["evaluate", "no/such/model", "--corpus", "synthetic", "--split", "test"], "model folder not found"),
    (["train", "--preset", "tiny", "--corpus", "multi30k", "--data-dir", "no/such/dir", "-o", "x"],
     "does not exist"),
    (["train", "--preset", "tiny", "--corpus", "synthetic", "--epochs", "-1", "-o", "x"],
     "epochs must be a non-negative integer"),
    (["data", "check", "--data-dir", "no/such/dir"], "not"),
])
def test_bad_input_is_one_line_without_traceback(args: list[str], message: str, tmp_path: Path) -> None:
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_bad_choice_is_refused_by_the_parser(tmp_path: Path) -> None:
    r = run_cli("train", "--preset", "huge", "-o", "x", cwd=tmp_path)
    assert r.returncode == 2 and "invalid choice: 'huge'" in r.stderr and "Traceback" not in r.stderr


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text().split("Run the tests:", 1)[1]
    command = next(line.strip() for line in readme.splitlines() if line.startswith("    "))
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    assert ci == [command] == ["bash scripts/test.sh"]
