"""Stage `finetune`: compose configuration I from a bank, then train it end to end.

With a merely pruned bank this is the baseline; with a tuned bank it is the composed model.
BLEU is measured (greedy, on the validation split) before the first epoch and after each one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ctprune.data.corpus import default_splits, load_split
from ctprune.device import resolve_device
from ctprune.errors import CtpruneError
from ctprune.fileio import check_output
from ctprune.model.checkpoint import is_model_folder
from ctprune.pruning.configs import load_configurations, prunable_modules
from ctprune.spec import resolve_target
from ctprune.stages.args import FinetuneArgs
from ctprune.stages.compose import compose_configuration
from ctprune.training.loop import FitResult, fit


def finetune(args: FinetuneArgs) -> FitResult:
    """Finetune configuration ``args.n`` into the model folder ``args.output`` (history.csv,
    plots), until ``target_bleu`` (a BLEU, "origin-X", or None) or the recipe's epochs, at least
    ``budget_epochs``."""
    output, data_dir = args.output, args.data_dir
    check_output(output, {"model folder": args.model, "bank": args.bank, "configuration file": args.configurations,
                          "data folder": data_dir})
    recipe = args.training_recipe()
    dev = resolve_device(args.device)
    assert args.n is not None  # FinetuneArgs: -n or --all
    model, tok, provenance = compose_configuration(args.model, args.bank, args.configurations, args.n)
    train_name, val_name, _ = default_splits(args.corpus)
    train, val = (load_split(args.corpus, s, data_dir) for s in (train_name, val_name))
    target_bleu = resolve_target(args.target_bleu, args.model)
    hparams: dict[str, Any] = {**provenance, "stage": "finetune", "corpus": args.corpus, "target_bleu": target_bleu}
    result = fit(model, tok, train, val, recipe, output, hparams, resume=args.resume, device=dev,
                 eval_before=True, target_bleu=target_bleu, min_epochs=args.budget_epochs,
                 snapshot_epochs=args.snapshot_epochs)
    plot_history(output / "history.csv", output / "history.png", f"configuration {args.n}")
    return result


def finetune_all(args: FinetuneArgs) -> list[FitResult]:
    """Every configuration, one after another, into ``args.output/config-I``; finished ones are
    kept, an interrupted one resumes."""
    from ctprune.fileio import read_json
    from ctprune.model.checkpoint import load_model_folder

    output = args.output
    check_output(output, {"model folder": args.model, "bank": args.bank, "configuration file": args.configurations,
                          "data folder": args.data_dir})
    if output.exists() and not output.is_dir():
        raise CtpruneError(f"output {output} exists and is not a folder (--all writes OUTPUT/config-I)")
    origin, _, _ = load_model_folder(args.model, tokenizer=False)
    confs = load_configurations(args.configurations, prunable_modules(origin))
    results = []
    for i in range(len(confs)):
        out = output / f"config-{i}"
        started = (out / "history.csv").exists()
        if started and (out / "train_summary.json").exists() and is_model_folder(out):
            s = read_json(out / "train_summary.json")
            results.append(FitResult(s["best_val_bleu"], s["epochs_done"], s["wall_time_s"],
                                     s["train_tokens"], s["stopped_early"]))
            continue
        results.append(finetune(dataclasses.replace(args, n=i, all=False, output=out, resume=started)))
    return results


def plot_history(csv_path: Path, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctprune.fileio import atomic_write
    from ctprune.training.history import read_history

    rows = read_history(csv_path)
    if not rows:
        raise CtpruneError(f"{csv_path} has no rows")
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ep = [float(r["epoch"]) for r in rows]  # fractional where evaluated within epochs (eval_every)
    ax[0].plot(ep, [float(r["val_bleu"]) for r in rows], marker="o")
    ax[0].set(xlabel="epoch", ylabel="val BLEU (greedy)", title=title)
    ax[1].plot([float(r["wall_time_s"]) for r in rows], [float(r["val_loss"]) for r in rows], marker="o")
    ax[1].set(xlabel="finetuning wall time (s)", ylabel="val loss")
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
