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


def test_train_tiny_synthetic_one_epoch(small_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny"  # on conftest's small_corpus: the synthetic corpus cut to its first 1000 training pairs
    r = run_cli("train", "--preset", "tiny", "--corpus", "folder:de-en", "--data-dir", str(small_corpus), "--epochs",
                "1", "-o", str(out))
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
    assert helps["finetune"]["recipe_name"].endswith("(default: finetune)")
    assert helps["train"]["recipe_name"].endswith("(default: fast)")
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
    from ctprune.stages.args import FinetuneArgs
    from ctprune.training.loop import FitResult, Recipe

    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / "hparams.json").write_text(json.dumps({"stage": "train", "preset": preset}))
    seen: list[Recipe] = []

    def finetune(args: FinetuneArgs) -> FitResult:
        seen.append(args.training_recipe())
        return FitResult(0.0, 0, 0.0, 0, False)

    monkeypatch.setattr(stage, "finetune", finetune)
    assert main(["finetune", str(origin), "--bank", "b", "-c", "c.json", "-n", "0", "-o", str(tmp_path / "o")]) == 0
    run = Experiment(path=tmp_path / "e.toml", origin=OriginSpec(model="origin"))
    assert (seen[0].bf16, seen[0].max_tokens) == (run.bf16, run.max_tokens) == \
        ((False, 1024) if preset == "tiny" else (True, 4096))


def _commands() -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser by name ("data check" for a nested one)."""
    from ctprune.cli import build_parser

    def subs(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
        found = {}
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, p in action.choices.items():
                    found[prefix + name] = p
                    found.update(subs(p, f"{prefix}{name} "))
        return found

    return {name: p for name, p in subs(build_parser()).items() if "command_of" in p._defaults}


def test_every_option_is_an_args_field_with_its_default_by_construction() -> None:
    """Walk the generated parsers: each option but --help / --threads is a field of the command's
    Args with the field's default, choices and help; each command-line field is an option."""
    import dataclasses

    from ctprune.cli import COMMANDS
    from ctprune.spec import REQUIRED, cli_fields, spec_default

    commands = _commands()
    assert set(commands) == {n for n, c in COMMANDS.items() if not isinstance(c, dict)} | {
        f"{n} {a}" for n, c in COMMANDS.items() if isinstance(c, dict) for a in c}
    for name, p in commands.items():
        cls = p._defaults["command_of"].args
        fields = {f.name: f for f in cli_fields(cls)}
        actions = {a.dest: a for a in p._actions if a.dest not in ("help", "threads")}
        assert set(actions) == set(fields), name
        for dest, a in actions.items():
            f, default = fields[dest], spec_default(cls, dest)
            if default is REQUIRED:
                assert a.required or not a.option_strings, (name, dest)
            else:
                assert a.default == default and type(a.default) is type(default), (name, dest, a.default, default)
            assert a.choices == f.metadata["choices"] and a.help.startswith(f.metadata["help"].replace("%", "%%"))
        # A required field is required on the command line too; the others build with their defaults.
        assert all(f.metadata["cli"] for f in dataclasses.fields(cls) if spec_default(cls, f.name) is REQUIRED)


def test_export_options_have_the_serving_stages_defaults() -> None:
    """`export`'s options are ExportCommandArgs; ctprune.serve.export.ExportArgs checks them: same defaults."""
    import dataclasses

    from ctprune.serve.export import ExportArgs
    from ctprune.stages.args import ExportCommandArgs

    theirs = {f.name: f.default for f in dataclasses.fields(ExportArgs)}
    assert {f.name: f.default for f in dataclasses.fields(ExportCommandArgs)} == theirs
    from ctprune.serve.engines import ENGINES as served
    from ctprune.stages.args import ENGINES

    assert ENGINES == ("torch", *served)


def test_stage_args_check_themselves_naming_the_flag() -> None:
    from ctprune.errors import CtpruneError
    from ctprune.stages.args import FinetuneArgs, ScoreArgs, SearchArgs, TuneArgs

    cases = [
        (lambda: SearchArgs(model="m", bank="b", output="o", flops="0.5", k=0), "-k must be at least 1, got 0"),
        (lambda: SearchArgs(model="m", bank="b", output="o"), "give at least one budget"),
        (lambda: TuneArgs(model="m", bank="b", output="o", lr=float("nan")), "--lr must be a positive number, got nan"),
        (lambda: TuneArgs(model="m", bank="b", output="o", max_tokens=8), "--max-tokens must be at least 64, got 8"),
        (lambda: ScoreArgs(model="m", bank="b", latency_repeats=0), "--latency-repeats must be at least 1, got 0"),
        (lambda: FinetuneArgs(model="m", bank="b", configurations="c", output="o"), "give either -n I"),
        (lambda: FinetuneArgs(model="m", bank="b", configurations="c", output="o", n=0, epochs=2, budget_epochs=3),
         "--budget-epochs must be at most --epochs, got 3 > 2"),
        (lambda: FinetuneArgs(model="m", bank="b", configurations="c", output="o", all=True, select="best"),
         "--select must be one of val_bleu, val_loss, got 'best'"),
    ]
    for build, message in cases:
        with pytest.raises(CtpruneError) as e:
            build()
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert SearchArgs(model="m", bank="b", output="o", flops=("0.5", "0.3")).budgets[1][0].value == 0.3


@pytest.mark.parametrize("args, message", [
    (["score", "m", "--bank", "b", "--batches", "0"], "--batches must be at least 1, got 0"),
    (["search", "m", "--bank", "b", "--flops", "0.5", "-k", "0", "-o", "x"], "-k must be at least 1, got 0"),
    (["search", "m", "--bank", "b", "-o", "x"], "give at least one budget"),
    (["finetune", "m", "--bank", "b", "-c", "c.json", "-o", "x"], "give either -n I (one configuration) or --all"),
    (["finetune", "m", "--bank", "b", "-c", "c.json", "-n", "0", "--lr", "inf", "-o", "x"],
     "--lr must be a positive number, got inf"),
    (["train", "--vocab-size", "10", "-o", "x"], "--vocab-size must be at least 50, got 10"),
    (["prune", "m", "-o", "x"], "give one of --plan PLAN, --ratio R or --grid R [R ...]"),
    (["run", "e.toml", "--tuning-shards", "0"], "--tuning-shards must be at least 1, got 0"),
])
def test_a_bad_value_is_one_line_naming_the_flag(args: list[str], message: str, tmp_path: Path) -> None:
    r = run_cli(*args, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"ctprune {args[0]}: error: {message}"), lines[0]
    assert not (tmp_path / "x").exists()
