"""Stage `train`: corpus -> tokenizer -> origin model folder (best checkpoint by val BLEU)."""

from __future__ import annotations

import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ctprune import __version__
from ctprune.arch import get as get_arch
from ctprune.data.corpus import default_splits, load_split
from ctprune.data.tokenizer import Tokenizer
from ctprune.device import resolve_device
from ctprune.fileio import check_output
from ctprune.model.checkpoint import is_model_folder, load_model_folder
from ctprune.model.transformer import PRESETS
from ctprune.stages.args import TrainArgs
from ctprune.training.loop import FitResult, fit

DEFAULT_VOCAB = {"multi30k": 8000, "synthetic": 1000}


def train_origin(args: TrainArgs) -> FitResult:
    """Train the origin model into ``args.output``; ``resume`` continues after the last epoch."""
    recipe = args.training_recipe()
    check_output(args.output, {"data folder": args.data_dir})
    device = resolve_device(args.device)
    train_name, val_name, _ = default_splits(args.corpus)
    train, val = (load_split(args.corpus, s, args.data_dir) for s in (train_name, val_name))
    out = Path(args.output)
    arch = get_arch(args.arch)
    if args.resume and is_model_folder(out / "last"):
        tok = load_model_folder(out / "last")[1]  # the run's own tokenizer, never a retrained one
    else:
        vocab = args.vocab_size or DEFAULT_VOCAB.get(args.corpus, DEFAULT_VOCAB["multi30k"])
        tok = arch.tokenizer_from_spm(Tokenizer.train(train.src + train.tgt, vocab).proto)
    torch.manual_seed(recipe.seed)
    model = arch.from_scratch(PRESETS[args.preset], tok)
    hparams = {
        "stage": "train", "preset": args.preset, "arch": args.arch, "corpus": args.corpus,
        "vocab_size": tok.vocab_size, "device": device, "threads": torch.get_num_threads(),
        "ctprune": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "args": {k: str(v) for k, v in asdict(args).items() if k != "recipe"},
    }
    return fit(model, tok, train, val, recipe, out, hparams, resume=args.resume,
               device=device)
