"""The `ctprune` command run as a user would: through a subprocess."""

from __future__ import annotations

import argparse
import json
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


def test_every_option_says_its_default_once_and_right() -> None:
    from ctprune.cli import build_parser

    def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return {name: p for sub in subs for name, p in sub.choices.items()}

    helps = {}
    for name, p in commands(build_parser()).items():
        for sub_name, sub in [(name, p), *commands(p).items()]:
            fmt = sub._get_formatter()
            helps[sub_name] = {a.dest: fmt._expand_help(a) for a in sub._actions if a.option_strings and a.help}
    for command, options in helps.items():
        for dest, text in options.items():
            assert text.count("(default") <= 1 and "(default: None)" not in text, (command, dest, text)
    run = helps["run"]
    assert run["address"].endswith("(default: the experiment file's [execution] address, else a local Ray "
                                   "instance on this machine's cores)")
    assert run["workers"].endswith("(default: the experiment file's [execution] workers, else 1)")
    assert run["output"] == "run folder (default: runs/EXPERIMENT_NAME)"
    assert helps["finetune"]["recipe"].endswith("(default: finetune)")
    assert helps["train"]["recipe"].endswith("(default: fast)")
    assert helps["finetune"]["lr"].endswith("(default: 0.0001)") and "(default" not in helps["finetune"]["resume"]
    assert helps["prune"]["kinds"].endswith("(default: attention ffn)")


@pytest.mark.parametrize("preset", ["tiny", "seed"])
def test_finetune_takes_the_origins_preset_as_run_does(preset: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`ctprune finetune --precision auto` follows the origin model's preset (its hparams.json), so a
    tiny origin is finetuned in fp32 on 1024-token batches, as `ctprune run` finetunes it."""
    import ctprune.stages.finetune as stage
    from ctprune.cli import main
    from ctprune.run.experiment import Experiment
    from ctprune.spec import OriginSpec
    from ctprune.training.loop import FitResult, Recipe

    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / "hparams.json").write_text(json.dumps({"stage": "train", "preset": preset}))
    seen: list[Recipe] = []

    def finetune(model_dir: Path, bank: Path, conf_path: Path, n: int, output: Path, recipe: Recipe,
                 **kwargs: object) -> FitResult:
        seen.append(recipe)
        return FitResult(0.0, 0, 0.0, 0, False)

    monkeypatch.setattr(stage, "finetune", finetune)
    assert main(["finetune", str(origin), "--bank", "b", "-c", "c.json", "-n", "0", "-o", str(tmp_path / "o")]) == 0
    run = Experiment(path=tmp_path / "e.toml", origin=OriginSpec(model="origin"))
    assert (seen[0].bf16, seen[0].max_tokens) == (run.bf16, run.max_tokens) == \
        ((False, 1024) if preset == "tiny" else (True, 4096))
