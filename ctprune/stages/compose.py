"""Stage `compose`: origin model + bank + configuration I -> a standalone model folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ctprune.errors import CtpruneError
from ctprune.fileio import check_existing, check_output, read_json, temp_dir_beside
from ctprune.model.checkpoint import load_model_folder, save_model_folder
from ctprune.pruning.bank import Bank
from ctprune.pruning.configs import Configuration, load_configurations, model_fingerprint, prunable_modules
from ctprune.stages.args import ComposeArgs


def select_configuration(confs: list[Configuration], n: int, source: Path) -> Configuration:
    if not 0 <= n < len(confs):
        raise CtpruneError(f"-n {n} is out of range: {source} has configurations 0..{len(confs) - 1}")
    return confs[n]


def _is_composed(path: Path) -> bool:
    if not path.is_dir() or path.is_symlink():
        return False
    if not any(path.iterdir()):
        return True
    try:
        return read_json(path / "hparams.json").get("stage") == "compose"
    except (CtpruneError, AttributeError):
        return False


def compose_configuration(model_dir: Path, bank: Path, conf_path: Path, n: int, tokenizer: bool = True
                          ) -> tuple[Any, Any, dict[str, Any]]:
    """(composed model, tokenizer, provenance) of configuration ``n``; checks that bank,
    configuration file and model belong together. ``tokenizer=False``: a Hugging Face origin
    without one composes too (its tokenizer is None)."""
    origin, tok, _ = load_model_folder(model_dir, tokenizer=tokenizer)
    conf = select_configuration(load_configurations(conf_path, prunable_modules(origin)), n, conf_path)
    if all(r == 1 for r in conf.values()) and not Bank.exists(bank):
        # it composes the origin (a control) from any bank of this model, but none is there: say why
        # no bank was made for it rather than only that there is none
        raise CtpruneError(f"configuration {n} of {conf_path} prunes nothing (every keep ratio is 1), and {bank} "
                           "is not a block bank; that configuration is the origin model itself: use the origin "
                           "folder, or give the configuration a keep ratio below 1")
    store = Bank.open(bank)
    store.check_model(model_fingerprint(model_dir))
    model = store.compose(origin, conf)
    stages = sorted({e["provenance"]["stage"] for e in store.variants.values()})
    provenance = {"stage": "compose", "origin": str(model_dir), "bank": str(bank),
                  "bank_variants": "/".join(stages), "configurations": str(conf_path),
                  "configuration_index": n, "configuration": conf}
    return model, tok, provenance


def compose_to_folder(args: ComposeArgs) -> Path:
    """Write configuration ``args.n`` as the model folder ``args.output``; an existing output is
    replaced only if it is empty or an earlier `compose` output."""
    output = args.output
    check_output(output, {"model folder": args.model, "bank": args.bank, "configuration file": args.configurations})
    check_existing(output, _is_composed, "an empty folder or a model folder written by `ctprune compose`")
    model, tok, provenance = compose_configuration(args.model, args.bank, args.configurations, args.n, tokenizer=False)
    # Written whole into a hidden folder beside it, then renamed into place: a failure midway
    # (disk full, a kill) leaves the old output or none, never a half-written model folder.
    tmp = temp_dir_beside(output)
    old = output.parent / f"{tmp.name[:-4]}.old"
    try:
        save_model_folder(tmp, model, tok, provenance)
        if output.exists():
            os.replace(output, old)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not output.exists():
            os.replace(old, output)  # the earlier output back
        raise
    shutil.rmtree(old, ignore_errors=True)
    return output
