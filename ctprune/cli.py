"""The `ctprune` command: argument parsing and a map from subcommand to stage function."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ctprune.errors import CtpruneError
from ctprune.spec import (
    CRITERIA,
    LATENCY_REPEATS,
    MAX_TOKENS,
    PRECISIONS,
    RECIPES,
    RUN_EXECUTION_FLAGS,
    SCORE_BATCHES,
    DataSpec,
    ExecutionSpec,
    FinetuningSpec,
    OriginSpec,
    SearchSpec,
    TuningSpec,
    add_option,
    check_option,
    origin_preset,
    spec_default,
)

Handler = Callable[[argparse.Namespace], None]


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default said once: appended as "(default: X)" unless the help already says
    it in words, and never for None (no value) or a switch's False."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help, d = action.help or "", action.default
        if not action.option_strings or "(default" in help or d is None or d is False or d == argparse.SUPPRESS:
            return help
        shown = " ".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d)
        return f"{help} (default: {shown.replace('%', '%%')})"


def _data_options(p: argparse.ArgumentParser, split: str | None = None) -> None:
    add_option(p, DataSpec, "corpus")
    add_option(p, DataSpec, "data_dir")
    if split is not None:
        p.add_argument("--split", default=split,
                       help="split name (multi30k: train, val, test_2016_flickr; synthetic: train, val, test)")


def _subset_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batches", type=int, default=SCORE_BATCHES, help="validation batches of the scoring subset")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="token budget per scoring batch")


def _device_option(p: argparse.ArgumentParser) -> None:
    add_option(p, ExecutionSpec, "device")


def _precision_option(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help=help)


def _recipe_options(p: argparse.ArgumentParser, spec: type) -> None:
    add_option(p, spec, "epochs", "-e", "--epochs")
    p.add_argument("--recipe", choices=RECIPES, default=RECIPES[0],
                   help="fast: warm-up + cosine lr, label smoothing 0.1, token-budget batches; "
                        "original: the prototype's Adam 1e-4, 128-sentence batches, plain cross-entropy; "
                        "finetune: the prototype's optimizer on length-sorted token-budget batches")
    if "lr" in spec.__dataclass_fields__:
        add_option(p, spec, "lr")
    else:
        p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="token budget per batch, padded source+target tokens, of the fast and finetune recipes "
                        "(default: the model's preset's, as `ctprune run` uses)")
    _precision_option(p, "bf16 autocast or plain fp32; auto = the policy of the model's preset (finetune: the "
                         "origin's), bf16 for seed, fp32 for tiny: see ctprune.training.loop.preset_bf16")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in -o from its last finished epoch")




def _recipe(a: argparse.Namespace, preset: str) -> object:
    """The training recipe of `train` / `finetune`: ``preset`` (the model's) sets its precision
    (``--precision auto``) and the finetune recipe's batches, as `ctprune run` sets them."""
    from ctprune.training.loop import preset_max_tokens, preset_recipe

    max_tokens = a.max_tokens
    if max_tokens is None and a.recipe == "finetune":
        max_tokens = preset_max_tokens(preset)
    return preset_recipe(preset, a.recipe, a.precision, epochs=a.epochs, seed=a.seed, lr=a.lr,
                         max_tokens=max_tokens, eval_every=getattr(a, "eval_every", None),
                         select=getattr(a, "select", None))


def cmd_train(a: argparse.Namespace) -> None:
    from ctprune.stages.train import TrainArgs, train_origin

    res = train_origin(TrainArgs(output=Path(a.output), preset=a.preset, arch=a.arch, corpus=a.corpus,
                                 data_dir=a.data_dir, vocab_size=a.vocab_size, device=a.device,
                                 resume=a.resume, recipe=_recipe(a, a.preset)))  # type: ignore[arg-type]
    print(f"origin model: {a.output}  best val BLEU {res.best_bleu:.2f}  "
          f"epochs {res.epochs_done}  train time {res.wall_time_s:.0f}s")


def cmd_evaluate(a: argparse.Namespace) -> None:
    from ctprune.stages.evaluate import evaluate

    if a.engine != "torch":
        from ctprune.serve.engines import evaluate_served

        evaluate_served(a.engine, Path(a.model), corpus=a.corpus, split=a.split, data_dir=a.data_dir, beam=a.beam,
                        output=Path(a.output) if a.output else None)
        return
    evaluate(Path(a.model), corpus=a.corpus, split=a.split, data_dir=a.data_dir, beam=a.beam,
             device=a.device, output=Path(a.output) if a.output else None)


def cmd_translate(a: argparse.Namespace) -> None:
    from ctprune.stages.evaluate import translate_stream

    if a.engine != "torch":
        from ctprune.serve.engines import translate_stream_served

        translate_stream_served(a.engine, Path(a.model), sys.stdin, sys.stdout, beam=a.beam)
        return
    translate_stream(Path(a.model), sys.stdin, sys.stdout, beam=a.beam, device=a.device)


def cmd_export(a: argparse.Namespace) -> None:
    from ctprune.serve.export import ExportArgs, export

    export(ExportArgs(model=Path(a.model), output=Path(a.output), format=a.format, quantize=a.quantize,
                      optimize=a.optimize))


def cmd_inspect(a: argparse.Namespace) -> None:
    from ctprune.stages.configs import inspect_model

    print("\n".join(inspect_model(Path(a.model))))


def cmd_configs(a: argparse.Namespace) -> None:
    from ctprune.stages.configs import write_configs

    confs = write_configs(Path(a.model), a.n, Path(a.output), a.attention, a.linear, a.ffn)
    print(f"{len(confs)} configurations of {len(confs[0])} modules each -> {a.output}")


def cmd_plan(a: argparse.Namespace) -> None:
    from ctprune.stages.configs import write_plan

    plan = write_plan(Path(a.configurations), Path(a.model), Path(a.output))
    n = sum(len(e["ratios"]) for e in plan["modules"].values())
    print(f"plan: {n} block variants of {len(plan['modules'])} modules -> {a.output}")


def cmd_prune(a: argparse.Namespace) -> None:
    from ctprune.stages.prune import prune

    index = prune(Path(a.model), Path(a.output), plan_path=Path(a.plan) if a.plan else None,
                  ratio=a.ratio, criterion=a.criterion, corpus=a.corpus, data_dir=a.data_dir,
                  grid=a.grid, kinds=tuple(a.kinds))
    print(f"bank: {len(index['variants'])} block variants ({a.criterion} criterion) -> {a.output}")


def cmd_score(a: argparse.Namespace) -> None:
    from ctprune.stages.score import score_bank

    s = score_bank(Path(a.model), Path(a.bank), corpus=a.corpus, data_dir=a.data_dir, batches=a.batches,
                   max_tokens=a.max_tokens, latency=a.latency, latency_repeats=a.latency_repeats,
                   force=a.force, device=a.device)
    sub = s["subset"]
    print(f"scores: {s['scored']} variants scored, {s['reused']} reused, on {sub['sentences']} "
          f"{sub['corpus']} {sub['split']} sentences ({sub['target_tokens']} target tokens) in "
          f"{s['wall_time_s']:.1f}s -> {Path(a.bank) / 'index.json'}")
    if "latency" in s:
        lat = s["latency"]
        print(f"latency: origin {lat['origin_ms']:.2f} ms per batch of {lat['batch'][0]} "
              f"(spread {lat['origin_spread_ms']:.2f}), measured in {lat['wall_time_s']:.1f}s")


def cmd_search(a: argparse.Namespace) -> None:
    from ctprune.stages.search import SearchArgs, budget_sweep, describe_table, search

    budgets = budget_sweep({r: getattr(a, r) for r in ("params", "flops", "latency")})
    args = SearchArgs(model=Path(a.model), bank=Path(a.bank), output=Path(a.output), budgets=budgets,
                      k=a.k, min_distance=a.min_distance, objective=a.objective, time_limit=a.time_limit,
                      refine=a.refine, corpus=a.corpus, data_dir=a.data_dir, batches=a.batches, max_tokens=a.max_tokens)
    problem, report = search(args)
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
          f"{Path(a.output).parent / 'search.json'}")
    if a.verify:
        from ctprune.stages.search_verify import print_verify, verify

        print_verify(verify(problem, report, n_random=a.random, sentences=a.verify_sentences, seed=a.seed))


def cmd_compose(a: argparse.Namespace) -> None:
    from ctprune.stages.compose import compose_to_folder

    compose_to_folder(Path(a.model), Path(a.bank), Path(a.configurations), a.n, Path(a.output))
    print(f"configuration {a.n} composed -> {a.output}")


def cmd_tune_blocks(a: argparse.Namespace) -> None:
    from ctprune.stages.tune_blocks import tune_blocks

    index = tune_blocks(Path(a.model), Path(a.bank), Path(a.output), epochs=a.epochs, corpus=a.corpus,
                        data_dir=a.data_dir, lr=a.lr, max_tokens=a.max_tokens, patience=a.patience,
                        resume=a.resume, device=a.device, seed=a.seed,
                        bf16=None if a.precision == "auto" else a.precision == "bf16")
    t = index["tuning"]
    print(f"tuned bank: {t['variants']} variants, {t['epochs_done']} epochs, {t['wall_time_s']:.0f}s "
          f"-> {a.output} (history.csv, block_loss.png)")


def cmd_finetune(a: argparse.Namespace) -> None:
    from ctprune.stages.finetune import finetune, finetune_all

    if (a.n is None) == (not a.all):
        raise CtpruneError("give either -n I (one configuration) or --all")
    check_option(FinetuningSpec, "epochs", a.epochs, "--epochs")
    check_option(FinetuningSpec, "budget_epochs", a.budget_epochs, "--budget-epochs")
    if a.budget_epochs > a.epochs:
        raise CtpruneError(f"--budget-epochs must be at most --epochs, got {a.budget_epochs} > {a.epochs}")
    recipe = _recipe(a, origin_preset(Path(a.model)))  # the origin's preset, as `ctprune run` finetunes
    kw = dict(corpus=a.corpus, data_dir=a.data_dir, target_bleu=a.target_bleu, device=a.device,
              min_epochs=a.budget_epochs)
    if a.all:
        results = finetune_all(Path(a.model), Path(a.bank), Path(a.configurations), Path(a.output),
                               recipe, **kw)  # type: ignore[arg-type]
        for i, r in enumerate(results):
            print(f"configuration {i}: best val BLEU {r.best_bleu:.2f} after {r.epochs_done} epochs, "
                  f"{r.wall_time_s:.0f}s")
    else:
        r = finetune(Path(a.model), Path(a.bank), Path(a.configurations), a.n, Path(a.output), recipe,
                     resume=a.resume, **kw)  # type: ignore[arg-type]
        print(f"configuration {a.n}: best val BLEU {r.best_bleu:.2f} after {r.epochs_done} epochs, "
              f"{r.wall_time_s:.0f}s -> {a.output}")


def cmd_run(a: argparse.Namespace) -> None:
    from ctprune.run.graph import run_experiment

    given = {k: getattr(a, k) for k, _ in RUN_EXECUTION_FLAGS if getattr(a, k) is not None}
    run_experiment(Path(a.experiment), Path(a.output) if a.output else None, execution=given)


def cmd_report(a: argparse.Namespace) -> None:
    from ctprune.run.report import write_report

    print(f"report: {write_report(Path(a.run_dir))} (and report.html)")


def cmd_data_check(a: argparse.Namespace) -> None:
    from ctprune.data.corpus import check

    print("\n".join(check(a.data_dir)))


def cmd_data_download(a: argparse.Namespace) -> None:
    from ctprune.data.corpus import download

    print(f"Multi30k files verified in {download(Path(a.output) if a.output else None)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctprune", formatter_class=_Formatter,
        description="Prune one trained Transformer into many variants cheaply: each distinct "
                    "(module, keep ratio) is pruned and pre-tuned once, then reused by every "
                    "configuration that contains it.\n\nPipeline: data -> train -> configs -> plan "
                    "-> prune -> tune-blocks -> compose -> finetune -> evaluate -> report")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=_Formatter)
        p.set_defaults(handler=handler)
        p.add_argument("--threads", type=int, default=None, metavar="N",
                       help="CPU threads for PyTorch (default: $CTPRUNE_THREADS, else PyTorch's own "
                            "default, one per physical core); give 1 when other jobs share the machine")
        return p

    p = add("train", cmd_train, "train the origin model (tokenizer + Transformer) on a corpus")
    add_option(p, OriginSpec, "preset")
    add_option(p, OriginSpec, "arch")
    _data_options(p)
    p.add_argument("--vocab-size", type=int, default=None,
                   help="sentencepiece vocabulary (default 8000 for multi30k, 1000 for synthetic)")
    _recipe_options(p, OriginSpec)
    _device_option(p)
    p.add_argument("-o", "--output", required=True, help="model folder to write")

    p = add("evaluate", cmd_evaluate, "translate a split and print sacreBLEU (with signature) and chrF")
    p.add_argument("model", help="model folder")
    _data_options(p, split="test_2016_flickr")
    p.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy)")
    _device_option(p)
    p.add_argument("-o", "--output", default=None,
                   help="folder for the hypotheses and the JSON report (default: MODEL/eval)")
    p.add_argument("--engine", choices=("torch", "onnxruntime", "ctranslate2"), default="torch",
                   help="torch: a model folder in PyTorch; onnxruntime, ctranslate2: a folder from "
                        "`ctprune export --format onnx|ctranslate2` (CPU)")

    p = add("translate", cmd_translate, "translate German lines from stdin to English on stdout")
    p.add_argument("model", help="model folder")
    p.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy)")
    _device_option(p)
    p.add_argument("--engine", choices=("torch", "onnxruntime", "ctranslate2"), default="torch",
                   help="torch: a model folder in PyTorch; onnxruntime, ctranslate2: a folder from "
                        "`ctprune export --format onnx|ctranslate2` (CPU)")

    p = add("export", cmd_export, "write a model for a serving engine: ONNX encoder + decoder-step graphs "
                                  "with per-layer key/value sizes, or a CTranslate2 model with heads "
                                  "zero-padded per stack; tokenizer, manifest")
    p.add_argument("model", help="model folder (ctprune's own Transformer; also MarianMT for ctranslate2)")
    p.add_argument("--format", default="onnx", help="onnx or ctranslate2")
    p.add_argument("--quantize", default="none",
                   help="none or int8 (ONNX Runtime: dynamic, per channel; CTranslate2: int8 weights per row)")
    p.add_argument("--optimize", action="store_true",
                   help="onnx only: ONNX Runtime's transformer fusions (heads read per layer), each fused graph "
                        "checked against the unfused one; applied before --quantize")
    p.add_argument("-o", "--output", required=True, help="serving folder to write")

    p = add("inspect", cmd_inspect, "list the prunable modules: name, kind, parameters, heads or width")
    p.add_argument("model", help="model folder")

    p = add("configs", cmd_configs,
            "write N default configurations (the prototype's template: every attention block and "
            "every FFN Linear at keep ratio 0.5, or the ratios given)")
    p.add_argument("model", help="origin model folder")
    p.add_argument("-n", type=int, default=3, help="number of configurations")
    p.add_argument("--attention", type=float, nargs="+", metavar="R",
                   help="keep ratio of all attention blocks, one per configuration")
    p.add_argument("--linear", type=float, nargs="+", metavar="R",
                   help="keep ratio of all FFN Linears (unstructured), one per configuration")
    p.add_argument("--ffn", type=float, nargs="+", metavar="R",
                   help="prune FFNs structured (neurons) at these ratios instead of their Linears")
    p.add_argument("-o", "--output", required=True, help="configuration file (JSON list) to write")

    p = add("plan", cmd_plan, "per module, the distinct keep ratios < 1 of a configuration file")
    p.add_argument("configurations", help="configuration file: JSON list of {module: keep ratio}")
    p.add_argument("-m", "--model", required=True, help="origin model folder (checked and fingerprinted)")
    p.add_argument("-o", "--output", required=True, help="plan file to write")

    p = add("prune", cmd_prune, "prune every (module, keep ratio) of a plan into a block bank")
    p.add_argument("model", help="origin model folder")
    p.add_argument("--plan", default=None, help="plan file from `ctprune plan`")
    p.add_argument("--ratio", type=float, default=None,
                   help="instead of a plan: every prunable module at this keep ratio")
    p.add_argument("--grid", type=float, nargs="+", default=None, metavar="R",
                   help="instead of a plan: a grid bank, every prunable module of --kinds at every ratio")
    add_option(p, SearchSpec, "kinds", help="module kinds of a --grid bank (attention and FFN blocks bring real speed)")
    p.add_argument("--criterion", choices=CRITERIA, default=CRITERIA[0],
                   help="head/neuron importance: original = |sum of q,k,v weights| (FFN: L1), "
                        "l1 = weight L1 norm, activation = output magnitude on training batches")
    _data_options(p)
    p.add_argument("-o", "--output", required=True, help="bank folder to create")

    p = add("score", cmd_score,
            "score every variant of a bank by replacing one block in the origin: KL divergence of the "
            "next-token distribution and loss on a fixed validation subset, stored in the bank's index "
            "(reused until bank or origin change)")
    p.add_argument("model", help="origin model folder")
    p.add_argument("--bank", required=True, help="bank folder (pruned or tuned)")
    _data_options(p)
    _subset_options(p)
    p.add_argument("--latency", action="store_true",
                   help="also measure each variant's latency in context (greedy decoding, fixed steps)")
    p.add_argument("--latency-repeats", type=int, default=LATENCY_REPEATS, help="timed repeats per variant")
    p.add_argument("--force", action="store_true", help="recompute every score even if up to date")
    _device_option(p)

    p = add("search", cmd_search,
            "the best configurations under budgets, chosen from a scored bank before any finetuning: "
            "one choice per module slot (untouched or a variant), summed scores minimised by a MIP")
    p.add_argument("model", help="origin model folder")
    p.add_argument("--bank", required=True, help="bank scored by `ctprune score`")
    for r, what, example in (("params", "non-zero parameters", "10M"), ("flops", "FLOPs per sentence pair", "1.5G"),
                             ("latency", "latency (needs `ctprune score --latency`)", "12ms")):
        p.add_argument(f"--{r}", default=None, metavar="B", nargs="+",
                       help=f"budget(s) on {what}: a fraction of the origin (0.6, 60%%) or absolute ({example}); "
                            "several sweep budgets, k configurations each")
    add_option(p, SearchSpec, "k", "-k")
    for name in ("min_distance", "objective", "time_limit", "refine"):
        add_option(p, SearchSpec, name)
    _data_options(p)
    _subset_options(p)
    # The validation subset defaults to the one the bank was scored on (its fingerprint is checked).
    p.set_defaults(corpus=None, batches=None, max_tokens=None)
    p.add_argument("--verify", action="store_true",
                   help="compose every configuration and random ones at the same budget; measure val loss "
                        "and BLEU before finetuning; print Spearman(estimate, loss)")
    p.add_argument("--random", type=int, default=16, help="random configurations for --verify")
    p.add_argument("--verify-sentences", type=int, default=None, help="val sentences for BLEU (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random configurations")
    p.add_argument("-o", "--output", required=True, help="configuration file to write (search.json goes beside it)")

    p = add("compose", cmd_compose, "build configuration I from a bank as a standalone model folder")
    p.add_argument("model", help="origin model folder")
    p.add_argument("--bank", required=True, help="bank folder")
    p.add_argument("-c", "--configurations", required=True, help="configuration file")
    p.add_argument("-n", type=int, required=True, help="index of the configuration (from 0)")
    p.add_argument("-o", "--output", required=True, help="model folder to write")

    p = add("tune-blocks", cmd_tune_blocks,
            "pre-tune every block variant of a bank by local distillation against the frozen origin "
            "(one teacher pass per batch serves all variants)")
    p.add_argument("model", help="origin model folder")
    p.add_argument("--bank", required=True, help="bank from `ctprune prune`")
    _data_options(p)
    add_option(p, TuningSpec, "epochs", "-e", "--epochs")
    add_option(p, TuningSpec, "lr")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="token budget per batch (default: the origin's preset's, as `ctprune run` uses)")
    add_option(p, TuningSpec, "patience")
    p.add_argument("--seed", type=int, default=0, help="random seed (data order)")
    _precision_option(p, "bf16 autocast or fp32; auto = the precision the origin model was trained with "
                         "(the same policy as finetuning)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted tuning in -o")
    _device_option(p)
    p.add_argument("-o", "--output", required=True, help="tuned bank folder to write")

    p = add("finetune", cmd_finetune,
            "compose configuration I (or --all) from a bank and finetune it end to end; with a pruned "
            "bank this is the baseline, with a tuned bank the composed model")
    p.add_argument("model", help="origin model folder")
    p.add_argument("--bank", required=True, help="bank folder (pruned: baseline; tuned: composed)")
    p.add_argument("-c", "--configurations", required=True, help="configuration file")
    p.add_argument("-n", type=int, default=None, help="index of the configuration (from 0)")
    p.add_argument("--all", action="store_true", help="every configuration, one after another, resumably")
    _data_options(p)
    _recipe_options(p, FinetuningSpec)
    p.set_defaults(recipe="finetune")
    add_option(p, FinetuningSpec, "target_bleu")
    add_option(p, FinetuningSpec, "budget_epochs")
    add_option(p, FinetuningSpec, "eval_every")
    add_option(p, FinetuningSpec, "select")
    _device_option(p)
    p.add_argument("-o", "--output", required=True, help="model folder (with --all: a folder of config-I)")

    p = add("run", cmd_run,
            "the whole experiment from one TOML file: origin -> plan -> prune -> tune-blocks -> baseline "
            "and composed finetuning -> test evaluation -> report; re-run to resume")
    p.add_argument("experiment", help="experiment file, e.g. examples/demo.toml")
    p.add_argument("-o", "--output", default=None, help="run folder (default: runs/EXPERIMENT_NAME)")
    for name, flag in RUN_EXECUTION_FLAGS:
        meta = ExecutionSpec.__dataclass_fields__[name].metadata
        fallback = meta["default_text"] or spec_default(ExecutionSpec, name)
        add_option(p, ExecutionSpec, name, flag, default=None,
                   help=f"{meta['help']} (default: the experiment file's [execution] {name}, else {fallback})")

    p = add("report", cmd_report, "rebuild report.md / report.html of a run folder")
    p.add_argument("run_dir", help="run folder of `ctprune run`")

    p = add("data", lambda a: None, "check or download the Multi30k files")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True
    c = dsub.add_parser("check", help="report the Multi30k files found, their sizes and checksums",
                        formatter_class=_Formatter)
    c.add_argument("--data-dir", default=None, help="Multi30k folder (else $CTPRUNE_DATA_DIR, else the cache)")
    c.set_defaults(handler=cmd_data_check)
    d = dsub.add_parser("download", help="fetch the official Multi30k Task 1 files and verify SHA-256",
                        formatter_class=_Formatter)
    d.add_argument("-o", "--output", default=None, help="destination (default: the download cache)")
    d.set_defaults(handler=cmd_data_download)
    return parser


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
        args.handler(args)
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
