"""The `ctprune` command: a map from subcommand to stage function, its options generated from the
stage's ``Args`` dataclass (``ctprune/stages/args.py``): parse -> ``Args(**values)`` -> stage(args)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ctprune.errors import CtpruneError
from ctprune.spec import add_arguments, parsed_args
from ctprune.stages.args import (
    ComposeArgs,
    ConfigsArgs,
    DataCheckArgs,
    DataDownloadArgs,
    EvaluateArgs,
    ExportCommandArgs,
    FinetuneArgs,
    InspectArgs,
    PlanArgs,
    PruneArgs,
    ReportArgs,
    RunArgs,
    ScoreArgs,
    SearchArgs,
    TrainArgs,
    TranslateArgs,
    TuneArgs,
)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default said once: appended as "(default: X)" unless the help already says
    it in words, and never for None (no value) or a switch's False."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help, d = action.help or "", action.default
        if not action.option_strings or "(default" in help or d is None or d is False or d == argparse.SUPPRESS:
            return help
        shown = " ".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d)
        return f"{help} (default: {shown.replace('%', '%%')})"


def cmd_train(a: TrainArgs) -> None:
    from ctprune.stages.train import train_origin

    res = train_origin(a)
    print(f"origin model: {a.output}  best val BLEU {res.best_bleu:.2f}  "
          f"epochs {res.epochs_done}  train time {res.wall_time_s:.0f}s")


def cmd_evaluate(a: EvaluateArgs) -> None:
    from ctprune.stages.evaluate import evaluate

    evaluate(a)


def cmd_translate(a: TranslateArgs) -> None:
    from ctprune.stages.evaluate import translate_stream

    translate_stream(a, sys.stdin, sys.stdout)


def cmd_export(a: ExportCommandArgs) -> None:
    from ctprune.serve.export import ExportArgs, export

    export(ExportArgs(model=a.model, output=a.output, format=a.format, quantize=a.quantize, optimize=a.optimize))


def cmd_inspect(a: InspectArgs) -> None:
    from ctprune.stages.configs import inspect_model

    print("\n".join(inspect_model(a)))


def cmd_configs(a: ConfigsArgs) -> None:
    from ctprune.stages.configs import write_configs

    confs = write_configs(a)
    print(f"{len(confs)} configurations of {len(confs[0])} modules each -> {a.output}")


def cmd_plan(a: PlanArgs) -> None:
    from ctprune.stages.configs import write_plan

    plan = write_plan(a)
    n = sum(len(e["ratios"]) for e in plan["modules"].values())
    print(f"plan: {n} block variants of {len(plan['modules'])} modules -> {a.output}")


def cmd_prune(a: PruneArgs) -> None:
    from ctprune.stages.prune import prune

    index = prune(a)
    print(f"bank: {len(index['variants'])} block variants ({a.criterion} criterion) -> {a.output}")


def cmd_score(a: ScoreArgs) -> None:
    from ctprune.stages.score import score_bank

    s = score_bank(a)
    sub = s["subset"]
    print(f"scores: {s['scored']} variants scored, {s['reused']} reused, on {sub['sentences']} "
          f"{sub['corpus']} {sub['split']} sentences ({sub['target_tokens']} target tokens) in "
          f"{s['wall_time_s']:.1f}s -> {a.bank / 'index.json'}")
    if "latency" in s:
        lat = s["latency"]
        print(f"latency: origin {lat['origin_ms']:.2f} ms per batch of {lat['batch'][0]} "
              f"(spread {lat['origin_spread_ms']:.2f}), measured in {lat['wall_time_s']:.1f}s")


def cmd_search(a: SearchArgs) -> None:
    from ctprune.stages.search import describe_table, search

    problem, report = search(a)
    for note in report["notes"]:  # fewer than k somewhere: said first
        print(f"note: {note}")
    for i, c in enumerate(report["configurations"]):
        costs = "  ".join(f"{r} {c[f'{r}_fraction']:.3f}" for r in ("params", "flops", "latency")
                          if f"{r}_fraction" in c)
        others = "  ".join(f"{o} {e:.4f}" for o, e in c["estimates"].items() if o != a.objective)
        print(f"{i:>3}  budget {c['budget']}  estimate {c['estimate']:.4f} ({others})  {costs}  "
              f"pruned slots {c['pruned_slots']}  "
              + (f"measured {c['measured']:.4f} ({c['source']})" if "measured" in c
                 else f"{c['status']} {c['solver_s']:.3f}s"))
    for i, s in enumerate(report["sweep"]):
        u = s["uniform"]
        print(f"budget {i}: {describe_table(s['budgets'])}: {s['found']} configurations; uniform "
              + ("out of reach" if u is None else f"at {' / '.join(f'{r:g}' for r in u['ratios'])}, estimate "
                 f"{u['estimate']:.4f}, flops {u['flops_fraction']:.3f}, params {u['params_fraction']:.3f}"))
    sv = report["solver"]
    print(f"{sv['found']} configurations (of {a.k} asked per budget) over {report['slots']} slots / "
          f"{report['choices']} choices, solver {sv['total_s']:.3f}s -> {a.output} and "
          f"{a.output.parent / 'search.json'}")
    if a.verify:
        from ctprune.stages.search_verify import print_verify, verify

        print_verify(verify(problem, report, n_random=a.random, sentences=a.verify_sentences, seed=a.seed))


def cmd_compose(a: ComposeArgs) -> None:
    from ctprune.stages.compose import compose_to_folder

    compose_to_folder(a)
    print(f"configuration {a.n} composed -> {a.output}")


def cmd_tune_blocks(a: TuneArgs) -> None:
    from ctprune.stages.tune_blocks import tune_blocks

    index = tune_blocks(a)
    t = index["tuning"]
    print(f"tuned bank: {t['variants']} variants, {t['epochs_done']} epochs, {t['wall_time_s']:.0f}s "
          f"-> {a.output} (history.csv, block_loss.png)")


def cmd_finetune(a: FinetuneArgs) -> None:
    from ctprune.stages import finetune as stage

    if a.all:
        for i, r in enumerate(stage.finetune_all(a)):
            print(f"configuration {i}: best val BLEU {r.best_bleu:.2f} after {r.epochs_done} epochs, "
                  f"{r.wall_time_s:.0f}s")
    else:
        r = stage.finetune(a)
        print(f"configuration {a.n}: best val BLEU {r.best_bleu:.2f} after {r.epochs_done} epochs, "
              f"{r.wall_time_s:.0f}s -> {a.output}")


def cmd_run(a: RunArgs) -> None:
    from ctprune.run.graph import run_experiment

    run_experiment(a.experiment, a.output, execution=a.execution)


def cmd_report(a: ReportArgs) -> None:
    from ctprune.run.report import write_report

    print(f"report: {write_report(a.run_dir)} (and report.html)")


def cmd_data_check(a: DataCheckArgs) -> None:
    from ctprune.data.corpus import check

    print("\n".join(check(a.data_dir)))


def cmd_data_download(a: DataDownloadArgs) -> None:
    from ctprune.data.corpus import download

    print(f"Multi30k files verified in {download(a.output)}")


@dataclass(frozen=True)
class Command:
    """A subcommand: its stage's arguments (the options are generated from them), the function
    that runs it, and its help."""

    args: type
    run: Callable[[Any], None]
    help: str


COMMANDS: dict[str, Command | dict[str, Command]] = {
    "train": Command(TrainArgs, cmd_train, "train the origin model (tokenizer + Transformer) on a corpus"),
    "evaluate": Command(EvaluateArgs, cmd_evaluate, "translate a split and print sacreBLEU (with signature) and chrF"),
    "translate": Command(TranslateArgs, cmd_translate, "translate German lines from stdin to English on stdout"),
    "export": Command(ExportCommandArgs, cmd_export,
                      "write a model for a serving engine: ONNX encoder + decoder-step graphs with per-layer "
                      "key/value sizes, or a CTranslate2 model with heads zero-padded per stack; tokenizer, manifest"),
    "inspect": Command(InspectArgs, cmd_inspect, "list the prunable modules: name, kind, parameters, heads or width"),
    "configs": Command(ConfigsArgs, cmd_configs,
                       "write N default configurations (the prototype's template: every attention block and "
                       "every FFN Linear at keep ratio 0.5, or the ratios given)"),
    "plan": Command(PlanArgs, cmd_plan, "per module, the distinct keep ratios < 1 of a configuration file"),
    "prune": Command(PruneArgs, cmd_prune, "prune every (module, keep ratio) of a plan into a block bank"),
    "score": Command(ScoreArgs, cmd_score,
                     "score every variant of a bank by replacing one block in the origin: KL divergence of the "
                     "next-token distribution and loss on a fixed validation subset, stored in the bank's index "
                     "(reused until bank or origin change)"),
    "search": Command(SearchArgs, cmd_search,
                      "the best configurations under budgets, chosen from a scored bank before any finetuning: "
                      "one choice per module slot (untouched or a variant), summed scores minimised by a MIP"),
    "compose": Command(ComposeArgs, cmd_compose, "build configuration I from a bank as a standalone model folder"),
    "tune-blocks": Command(TuneArgs, cmd_tune_blocks,
                           "pre-tune every block variant of a bank by local distillation against the frozen origin "
                           "(one teacher pass per batch serves all variants)"),
    "finetune": Command(FinetuneArgs, cmd_finetune,
                        "compose configuration I (or --all) from a bank and finetune it end to end; with a pruned "
                        "bank this is the baseline, with a tuned bank the composed model"),
    "run": Command(RunArgs, cmd_run,
                   "the whole experiment from one TOML file: origin -> plan -> prune -> tune-blocks -> baseline "
                   "and composed finetuning -> test evaluation -> report; re-run to resume"),
    "report": Command(ReportArgs, cmd_report, "rebuild report.md / report.html of a run folder"),
    "data": {
        "check": Command(DataCheckArgs, cmd_data_check, "report the Multi30k files found, their sizes and checksums"),
        "download": Command(DataDownloadArgs, cmd_data_download,
                            "fetch the official Multi30k Task 1 files and verify SHA-256"),
    },
}
DATA_HELP = "check or download the Multi30k files"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctprune", formatter_class=_Formatter,
        description="Prune one trained Transformer into many variants cheaply: each distinct "
                    "(module, keep ratio) is pruned and pre-tuned once, then reused by every "
                    "configuration that contains it.\n\nPipeline: data -> train -> configs -> plan "
                    "-> prune -> tune-blocks -> compose -> finetune -> evaluate -> report")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, command in COMMANDS.items():
        help = command.help if isinstance(command, Command) else DATA_HELP
        p = sub.add_parser(name, help=help, description=help, formatter_class=_Formatter)
        p.add_argument("--threads", type=int, default=None, metavar="N",
                       help="CPU threads for PyTorch (default: $CTPRUNE_THREADS, else PyTorch's own "
                            "default, one per physical core); give 1 when other jobs share the machine")
        if isinstance(command, Command):
            _add_command(p, command)
            continue
        actions = p.add_subparsers(dest=f"{name}_command", metavar="ACTION")
        actions.required = True
        for action, c in command.items():
            _add_command(actions.add_parser(action, help=c.help, formatter_class=_Formatter), c)
    return parser


def _add_command(p: argparse.ArgumentParser, command: Command) -> None:
    add_arguments(p, command.args)
    p.set_defaults(command_of=command)


def set_threads(threads: int | None) -> None:
    """Set PyTorch's CPU thread count from ``--threads``, else $CTPRUNE_THREADS; else leave
    PyTorch's default. Two processes that each spin all cores' OpenMP threads on a shared
    machine ran a tiny training about 150x slower, so a job runner should pass this."""
    import os

    env = os.environ.get("CTPRUNE_THREADS")
    if threads is None and env:
        if not env.strip().isdigit():
            raise CtpruneError(f"CTPRUNE_THREADS must be a positive integer, got {env!r}")
        threads = int(env)
    if threads is None:
        return
    if threads < 1:
        raise CtpruneError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        set_threads(getattr(args, "threads", None))
        command: Command = args.command_of
        command.run(parsed_args(command.args, args))  # the arguments check themselves: one line if not
    except CtpruneError as e:
        print(f"ctprune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `ctprune inspect | head -1`: the reader left; stop quietly, as Unix tools do
        with contextlib.suppress(OSError, ValueError):  # no second error at exit's flush
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # permission denied, disk full, a folder where a file belongs: one line
        where = f": {e.filename}" if e.filename else ""
        print(f"ctprune {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ctprune {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
